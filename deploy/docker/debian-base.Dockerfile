# A python3.11 base from Debian's own packages, for hosts that cannot pull python:3.11-slim
# (no Docker Hub: an air-gapped registry, or this project's test machines). Made by
# tests/dockerengine.py; by hand:
#
#   debootstrap --variant=minbase bookworm rootfs http://deb.debian.org/debian   # your mirror
#   tar -C rootfs -c . | docker import - m365relay-rootfs:bookworm
#   cp /etc/ssl/certs/ca-certificates.crt .      # the CA bundle pip needs inside the build
#   docker build --network host -f deploy/docker/debian-base.Dockerfile -t m365relay-base:bookworm .
#   docker build --network host --build-arg BASE=m365relay-base:bookworm -t m365relay .
ARG ROOTFS=m365relay-rootfs:bookworm
FROM ${ROOTFS}
# Documentation and translations are never read in a container (what the official slim images
# leave out too): about 45 MB.
RUN printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
      'path-exclude /usr/share/locale/*' > /etc/dpkg/dpkg.cfg.d/m365relay-slim \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3-venv \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# The host's bundle, so pip in the relay's build stage trusts what the host trusts (a TLS proxy).
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
