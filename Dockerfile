# m365relay in a container: docker build -t m365relay .
# Config: a file mounted at /etc/m365relay/m365relay.yaml, or, when there is none, M365RELAY_*
# variables for one app and one mailbox (README: "Operations: Docker" has `docker run` lines).
#
# BASE: any image with python3 (>= 3.11) and its venv module. Where Docker Hub is out of
# reach, deploy/docker/debian-base.Dockerfile makes one from Debian's packages:
#   docker build --network host --build-arg BASE=m365relay-base:bookworm -t m365relay .
ARG BASE=python:3.11-slim

# --- build: the wheel, and a virtualenv with it and its dependencies ----------------------
FROM ${BASE} AS build
# pip settings of the host, if the index is not PyPI or a TLS proxy sits in between (build
# arguments live in this stage only; none reaches the image).
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_CERT
# The wheel's extras: `postgres` (asyncpg) by default, so one image runs both the file spool and
# cluster mode (spool.postgres); `--build-arg EXTRAS=` gives the lean image without it.
ARG EXTRAS=postgres
WORKDIR /src
# Only what the wheel is made of, so edits to tests or docs do not rebuild this layer.
COPY pyproject.toml README.md ./
COPY relay/ relay/
# The venv's own pip builds and installs, then goes: the runtime gets no pip or setuptools.
RUN python3 -m venv /opt/m365relay \
 && /opt/m365relay/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
 && wheel=$(echo /dist/*.whl) \
 && /opt/m365relay/bin/pip install --no-cache-dir --disable-pip-version-check \
      "${wheel}${EXTRAS:+[$EXTRAS]}" \
 && /opt/m365relay/bin/pip uninstall -y -q pip setuptools

# --- runtime: the virtualenv on a slim Python, no compilers, no pip ----------------------
FROM ${BASE}
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
# Docker runs the first probe one interval after the start (20.10 has no --start-interval),
# so the interval is what `healthy` waits for: 10 s, at ~0.1 s of CPU per probe. Probes that
# fail during the start period do not count.
HEALTHCHECK --interval=10s --timeout=10s --start-period=30s --retries=3 \
  CMD ["m365relay", "healthcheck", "--config", "/etc/m365relay/m365relay.yaml", "--config-from-env", "--timeout", "3"]
ENTRYPOINT ["m365relay"]
CMD ["serve", "--config", "/etc/m365relay/m365relay.yaml", "--config-from-env", "--shutdown-timeout", "8"]
