# CI only: Prometheus from Debian's package on the CI base image (.ci/container-base), standing
# in for compose's prom/prometheus image where no registry is reachable. Same entrypoint, user
# and data folder as that image, and wget for compose's healthcheck.
ARG BASE_IMAGE=vae-ci-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus /etc/prometheus \
    && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
