# m365relay in a container: docker build -t m365relay .
# Config: a file mounted at /etc/m365relay/m365relay.yaml, or, when there is none, M365RELAY_*
# variables for one app and one mailbox (README: "Operations: Docker" has `docker run` lines).

# --- build: the wheel, and a virtualenv with it and its dependencies ----------------------
FROM python:3.11-slim AS build
WORKDIR /src
# Only what the wheel is made of, so edits to tests or docs do not rebuild this layer.
COPY pyproject.toml README.md ./
COPY relay/ relay/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip /opt/m365relay \
 && python -m pip --python /opt/m365relay/bin/python install --no-cache-dir /dist/*.whl

# --- runtime: the virtualenv on a slim Python, no compilers, no pip ----------------------
FROM python:3.11-slim
ENV PATH=/opt/m365relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
# A fixed uid/gid, so a bind-mounted spool or secret can be chowned to it from the host.
RUN groupadd --system --gid 10025 m365relay \
 && useradd --system --uid 10025 --gid m365relay --home-dir /var/spool/m365relay \
      --shell /usr/sbin/nologin m365relay \
 && install -d -o m365relay -g m365relay -m 0750 /var/spool/m365relay \
 && install -d -m 0755 /etc/m365relay
COPY --from=build /opt/m365relay /opt/m365relay
USER 10025:10025
# Queued mail survives a new container only on a volume.
VOLUME ["/var/spool/m365relay"]
# Unprivileged ports inside (no capability needed); publish them as 25/587 outside if wanted.
EXPOSE 2525 587
# `docker stop` waits 10 s before SIGKILL: the relay drains for 8 (raise both together).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["m365relay", "healthcheck", "--config", "/etc/m365relay/m365relay.yaml", "--config-from-env", "--timeout", "3"]
ENTRYPOINT ["m365relay"]
CMD ["serve", "--config", "/etc/m365relay/m365relay.yaml", "--config-from-env", "--shutdown-timeout", "8"]
