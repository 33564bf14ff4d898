# nginx for compose.yaml's `scale` profile: Debian's nginx on the relay's base image,
# balancing the relay replicas with docker/nginx.conf (streams pass through unbuffered
# both ways). Runs unprivileged on port 8080.
#
#   docker build -f docker/nginx.Dockerfile -t ndrelay-nginx docker
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
# DL3008 ignored: nginx is the one version of the base's Debian release.
# hadolint ignore=DL3008
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends nginx >/dev/null \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log \
    && groupadd --gid 10003 ndrelay-nginx \
    && useradd --uid 10003 --gid 10003 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ndrelay-nginx \
    && mkdir -p /var/lib/ndrelay-nginx \
    && chown 10003:10003 /var/lib/ndrelay-nginx
COPY nginx.conf /etc/nginx/ndrelay.conf
# The prefix (-p) holds the pid file and temp directories, which the config names
# relative to it; logs go to the container's stdout/stderr.
WORKDIR /var/lib/ndrelay-nginx
USER 10003:10003
EXPOSE 8080
ENTRYPOINT ["nginx", "-p", "/var/lib/ndrelay-nginx/", "-c", "/etc/nginx/ndrelay.conf", \
    "-g", "daemon off;"]
