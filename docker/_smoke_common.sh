# What docker/smoke.sh and docker/smoke-scale.sh share, sourced by both (with `repo` and
# `smoke_name` set, arguments passed on): messages, `--plan`, the prepare script that
# gives podman and a local base image where no registry is reachable (anywhere else the
# base image is pulled as usual), the container engine, its compose command, and curl.
# Sets: plan, prepare, prepared, PODMAN_BUILD_SECRET, BASE_IMAGE, engine, compose_cmd.
# shellcheck shell=bash

fail() { printf '\n%s: FAIL: %s\n' "$smoke_name" "$*" >&2; exit 1; }
step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }

plan=0
case "${1:-}" in
    --plan) plan=1 ;;
    "") ;;
    *) fail "unknown argument $1 (usage: docker/$smoke_name [--plan])" ;;
esac

# This project's own machines reach no container registry: a prepare script makes
# podman and a local base image. Anywhere else the base image is pulled as usual.
prepare=${NDRELAY_SMOKE_PREPARE:-$repo/../shared/container/prepare.sh}
if [ -z "${NDRELAY_SMOKE_PREPARE:-}" ] && [ ! -f "$prepare" ]; then
    # a clone made elsewhere from a local repository: the script next to that one
    origin=$(git -C "$repo" config --get remote.origin.url 2>/dev/null || true)
    if [ -n "$origin" ] && [ -f "$origin/../shared/container/prepare.sh" ]; then
        prepare=$origin/../shared/container/prepare.sh
    fi
fi
prepared=0
PODMAN_BUILD_SECRET=
if [ -f "$prepare" ]; then
    exports=$(bash "$prepare") || fail "$prepare failed"
    eval "$exports"
    prepared=1
fi
BASE_IMAGE=${BASE_IMAGE:-python:3.12-slim}

engine=${NDRELAY_SMOKE_ENGINE:-}
if [ -z "$engine" ]; then
    if [ "$prepared" = 1 ] && command -v podman >/dev/null; then
        engine=podman
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    else
        fail "no container engine: install Docker (and start its daemon) or podman"
    fi
fi
case "$engine" in
    docker | podman) command -v "$engine" >/dev/null || fail "$engine is not installed" ;;
    *) fail "NDRELAY_SMOKE_ENGINE must be docker or podman, not '$engine'" ;;
esac
if [ "$engine" = podman ]; then
    command -v podman-compose >/dev/null || fail "podman-compose is not installed (pip install podman-compose)"
    compose_cmd=(podman-compose)
elif docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose_cmd=(docker-compose)
else
    fail "neither 'docker compose' nor docker-compose is installed"
fi
command -v curl >/dev/null || fail "curl is not installed"
