# Redis for compose.yaml's `scale` profile: Debian's redis-server on the relay's base
# image (no registry image is pulled), persistence on (AOF, fsync every second) in /data,
# which compose mounts as a named volume.
#
#   docker build -f docker/redis.Dockerfile -t ndrelay-redis docker
#
# Not published on the host: only the relay replicas on compose's network reach it, so
# it runs without a password (`protected-mode no`); put `requirepass` in a config of
# your own (and the password in NDRELAY_BACKEND) wherever others share that network.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
# DL3008 (pin apt versions) is ignored: redis-server comes from the base image's Debian
# release, whose repository carries one version of it.
# hadolint ignore=DL3008
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log \
    && groupadd --gid 10002 ndrelay-redis \
    && useradd --uid 10002 --gid 10002 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ndrelay-redis \
    && mkdir -p /data \
    && chown 10002:10002 /data
WORKDIR /data
USER 10002:10002
EXPOSE 6379
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=5 \
    CMD ["redis-cli", "ping"]
# Exec form: redis-server is PID 1 and gets `docker stop`'s SIGTERM (it writes the AOF
# and exits). Never `maxmemory` with an eviction policy: evicting a stream's entries is
# silent loss; the relay bounds every stream itself.
ENTRYPOINT ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data", \
    "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]
