#!/usr/bin/env bash
# Container smoke test: builds docker/Dockerfile with Docker or podman, runs the image
# and checks it from the host with curl and RelayClient, then runs compose.yaml's demo
# profile.
#
#   docker/smoke.sh                                       # from any directory
#   docker/smoke.sh --plan                                # say what it would use, and stop
#   NDRELAY_SMOKE_PYTHON=/work/venv/bin/python docker/smoke.sh
#
# Needs Docker (with a running daemon) or podman, network access to pull the base
# image (python:3.12-slim; BASE_IMAGE=... for another) and the packages pip installs,
# and curl. Where ../shared/container/prepare.sh sits next to the repository (machines
# with no registry; NDRELAY_SMOKE_PREPARE names another script), it runs that first:
# it installs podman, podman-compose, hadolint and docker-compose and builds a local
# Debian base image, which is then used. Without an engine this fails: it never skips.
#
# NDRELAY_SMOKE_ENGINE: docker or podman (default: docker if its daemon answers, else
# podman; podman where the prepare script ran). NDRELAY_SMOKE_CACERT: a CA bundle for
# pip inside the build (behind a TLS-intercepting proxy). NDRELAY_SMOKE_PYTHON: a python
# that imports ndrelay, for the host-side client (default: the repository's
# .venv/bin/python, which the README's test command makes). Compose: `docker compose`
# (or docker-compose) with Docker, podman-compose with podman. hadolint and
# `docker-compose config` lint first where they are installed.
# It removes every container, network and image it made (all named ndrelay-smoke-*),
# also on failure.
set -euo pipefail
started=$SECONDS
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

smoke_name=smoke.sh
# shellcheck source=docker/_smoke_common.sh
source "$repo/docker/_smoke_common.sh"
# build options: docker writes the docker image format (HEALTHCHECK kept) by itself
build_opts=()
[ "$engine" = podman ] && build_opts+=(--format docker)
if [ -n "${NDRELAY_SMOKE_CACERT:-}" ]; then
    build_opts+=(--secret "id=cacert,src=$NDRELAY_SMOKE_CACERT")
elif [ -n "$PODMAN_BUILD_SECRET" ]; then
    read -r -a secret <<<"$PODMAN_BUILD_SECRET"
    build_opts+=("${secret[@]//\'/}")
fi

if [ "$plan" = 1 ]; then
    echo "engine: $engine"
    echo "compose: ${compose_cmd[*]}"
    echo "base image: $BASE_IMAGE"
    if [ "$prepared" = 1 ]; then echo "prepare: $prepare"; else echo "prepare: none"; fi
    echo "build options: ${build_opts[*]:-none}"
    exit 0
fi

python=${NDRELAY_SMOKE_PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || fail "no python at $python: run the README's test command first," \
    "or set NDRELAY_SMOKE_PYTHON to a python that has ndrelay installed"
"$python" -c 'import ndrelay' || fail "$python cannot import ndrelay"
client() { timeout 120 "$python" "$repo/docker/smoke_client.py" "$@"; }
free_port() {
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

id=$$
tag=localhost/ndrelay-smoke:$id
label=ndrelay-smoke=$id  # on every image and layer this run builds, for the cleanup
relay=ndrelay-smoke-$id-relay
project=ndrelay-smoke-$id
token=smoke-$RANDOM$RANDOM
work=$(mktemp -d)
bg_pids=()
compose_up=0

cleanup() {
    local rc=$?
    set +e
    for pid in "${bg_pids[@]}"; do kill "$pid" 2>/dev/null; done
    if [ "$compose_up" = 1 ]; then
        compose down -t 2 >"$work/compose-down.log" 2>&1
    fi
    local containers
    # Again if a restart policy brought one back meanwhile, or a container that others
    # require was refused while they existed (podman-compose's --requires).
    for _ in 1 2 3 4; do
        containers=$($engine ps -a -q --filter "name=ndrelay-smoke-$id")
        [ -z "$containers" ] && break
        $engine rm -f $containers >/dev/null 2>&1
    done
    [ "$engine" = podman ] && podman pod rm -f "pod_$project" >/dev/null 2>&1
    $engine network rm "${project}_default" >/dev/null 2>&1
    local images
    images=$($engine images -a -q --filter "label=$label")
    [ -z "$images" ] || $engine rmi -f $images >/dev/null 2>&1
    $engine rmi -f "$tag" >/dev/null 2>&1
    rm -rf "$work"
    if [ "$rc" = 0 ]; then
        printf '\nsmoke.sh: PASS in %d s\n' $((SECONDS - started))
    else
        printf '\nsmoke.sh: FAILED (exit %d) after %d s\n' "$rc" $((SECONDS - started)) >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs a command given as text (so the transcript shows $URL and $AUTH, not their
# values), prints it and its output, and keeps the output in $work/last.
URL= AUTH=
t() {
    printf '$ %s\n' "$1"
    # Without pipefail, as in an interactive shell: `curl ... | head` is not a failure.
    (set +o pipefail; eval "$1") >"$work/last" 2>&1 || { cat "$work/last"; fail "command failed: $1"; }
    cat "$work/last"
    [ -z "$(tail -c1 "$work/last")" ] || echo
}
expect() { grep -q -- "$1" "$work/last" || fail "expected '$1' in the output above"; }
# NAME's own HEALTHCHECK passes: podman runs it on demand; Docker runs it on its
# schedule (every 10 s), so wait for its status to become healthy.
healthy() {
    if [ "$engine" = podman ]; then
        podman healthcheck run "$1" >/dev/null 2>&1
        return
    fi
    local _
    for _ in $(seq 60); do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$1" 2>/dev/null)" = healthy ] && return 0
        sleep 1
    done
    return 1
}

step "lint: hadolint docker/Dockerfile, docker-compose config"
if command -v hadolint >/dev/null; then
    hadolint docker/Dockerfile
    ok "hadolint clean"
else
    echo "hadolint is not installed: Dockerfile lint left out"
fi
if command -v docker-compose >/dev/null; then
    docker-compose config -q
    docker-compose --profile demo config -q
    ok "compose.yaml valid (docker-compose config)"
else
    "${compose_cmd[@]}" config >/dev/null
    ok "compose.yaml valid (${compose_cmd[*]} config)"
fi

step "build (BASE_IMAGE=$BASE_IMAGE)"
t0=$SECONDS
$engine build "${build_opts[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --label "$label" -f docker/Dockerfile -t "$tag" . >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log"; fail "$engine build failed"; }
build_seconds=$((SECONDS - t0))
image_id=$($engine image inspect -f '{{.Id}}' "$tag")
image_bytes=$($engine image inspect -f '{{.Size}}' "$tag")
image_mb=$(awk -v b="$image_bytes" 'BEGIN { printf "%.0f", b / 1e6 }')
ok "built $tag in $build_seconds s, $image_mb MB"

step "image: non-root user, healthcheck, exec-form entrypoint, no compilers, pip or caches"
[ "$($engine image inspect -f '{{.Config.User}}' "$tag")" = 10001:10001 ] || fail "USER is not 10001"
$engine image inspect -f '{{json .Config.Healthcheck}}' "$tag" | grep -q healthz \
    || fail "the image has no HEALTHCHECK on /healthz (built without --format docker?)"
$engine image inspect -f '{{json .Config.Entrypoint}}' "$tag" \
    | grep -qx '\["ndrelay","serve","--host","0.0.0.0"\]' || fail "unexpected ENTRYPOINT"
$engine run --rm --name "$relay-check" --user 0 --entrypoint /bin/sh "$tag" -c '
    for tool in gcc cc c++ make pip pip3; do
        if command -v "$tool"; then echo "found $tool"; exit 1; fi
    done
    if ls /var/cache/apt/archives/*.deb /var/lib/apt/lists/*_Packages* 2>/dev/null; then
        echo "apt caches left"; exit 1
    fi
    if [ -e /root/.cache ] || [ -e /wheels ] || [ -e /src ]; then
        echo "pip cache or build files left"; exit 1
    fi' 2>/dev/null || fail "the final image holds build tools or caches"
ok "user 10001, HEALTHCHECK on /healthz, no gcc/make/pip, no apt or pip caches"

step "run the relay (NDRELAY_TOKEN and NDRELAY_DEMO=1 from the environment)"
port=$(free_port)
URL=http://127.0.0.1:$port
AUTH="Authorization: Bearer $token"
$engine run -d --name "$relay" -p "127.0.0.1:$port:8000" \
    -e NDRELAY_TOKEN="$token" -e NDRELAY_DEMO=1 "$tag" >"$work/run.log" 2>&1 \
    || { cat "$work/run.log"; fail "$engine run failed"; }
for _ in $(seq 100); do
    curl -sf --max-time 2 "$URL/healthz" >/dev/null && break
    [ "$($engine inspect -f '{{.State.Running}}' "$relay")" = true ] \
        || { $engine logs "$relay"; fail "the relay exited"; }
    sleep 0.2
done
echo "URL=$URL  AUTH='Authorization: Bearer <token>'"
t 'curl -s $URL/healthz'
expect '"ok"'
t 'curl -s -o /dev/null -w "%{http_code}\n" $URL/streams'
expect 401
t 'curl -s -H "$AUTH" $URL/streams'
expect '"radar"'
t 'curl -s -H "$AUTH" "$URL/streams/count?format=ndjson"'
expect '{"kind":"end","seq":10}'
t 'curl -sN -H "$AUTH" "$URL/streams/radar?format=ndjson" | head -2 | cut -c1-120'
expect '"shape":\[4,8\]'
healthy "$relay" || fail "the healthcheck of $relay does not pass"
ok "$relay: healthcheck passes"

step "the process in the container: PID 1 is ndrelay, not root"
pid1=$($engine exec "$relay" sh -c 'tr "\0" " " </proc/1/cmdline; echo; grep ^Uid: /proc/1/status')
echo "$pid1"
grep -q 'ndrelay serve --host 0.0.0.0' <<<"$pid1" || fail "PID 1 is not ndrelay serve"
grep -Eq '^Uid:[[:space:]]+10001[[:space:]]' <<<"$pid1" || fail "PID 1 runs as root"
ok "PID 1 is ndrelay serve, uid 10001"

step "frames from the host (RelayClient) read back with curl and with the client"
client "$URL" "$token" push to-curl 3
t 'curl -s -H "$AUTH" "$URL/streams/to-curl?format=ndjson"'
expect '"seq":2,"dtype":"<f4","shape":\[2,3\],"data":\[\[2.0,2.0,2.0\],\[2.0,2.0,2.0\]\]'
expect '{"kind":"end","seq":3}'
client "$URL" "$token" roundtrip

step "a producer exception crosses the container as an error frame"
client "$URL" "$token" producer-error
"$python" - "$URL" "$token" <<'EOF'
import sys
import numpy as np
from ndrelay import RelayClient
def sensor():
    yield np.zeros(2)
    raise ValueError("lidar disconnected")
with RelayClient(sys.argv[1], token=sys.argv[2]) as client:
    try:
        client.publish("lidar-curl", sensor())
    except ValueError:
        pass
EOF
t 'curl -s -H "$AUTH" "$URL/streams/lidar-curl?format=ndjson" | cut -c1-150'
expect '"kind":"error","seq":1,"origin":"producer","type":"ValueError","message":"lidar disconnected"'

step "$engine stop: open consumers get the relay's shutdown error frame, exit code 0"
client "$URL" "$token" create hold-client hold-curl
client "$URL" "$token" hold hold-client >"$work/hold-client.out" 2>&1 &
bg_pids+=($!)
hold_client=$!
curl -sN -H "$AUTH" "$URL/streams/hold-curl?format=ndjson" >"$work/hold-curl.out" &
bg_pids+=($!)
hold_curl=$!
client "$URL" "$token" wait-consumers hold-client hold-curl
t0=$SECONDS
$engine stop "$relay" >/dev/null 2>&1
stop_seconds=$((SECONDS - t0))
exit_code=$($engine inspect -f '{{.State.ExitCode}}' "$relay")
wait "$hold_client" || { cat "$work/hold-client.out"; fail "the client consumer did not get the shutdown error"; }
wait "$hold_curl" || true
cat "$work/hold-client.out"
echo '$ curl -sN -H "$AUTH" "$URL/streams/hold-curl?format=ndjson"   # (was running)'
cut -c1-150 "$work/hold-curl.out"
grep -q '"kind":"error","seq":0,"origin":"relay","type":"[A-Za-z]*","message":"server shutting down"' \
    "$work/hold-curl.out" || fail "curl did not get the shutdown error frame"
echo "container logs (tail):"
$engine logs "$relay" 2>&1 | tail -6 | sed 's/^/  /'
[ "$exit_code" = 0 ] || fail "the container exited $exit_code after $engine stop"
[ "$stop_seconds" -lt 10 ] || fail "$engine stop took $stop_seconds s: SIGTERM was not handled in time"
ok "$engine stop took $stop_seconds s; container exit code $exit_code"

step "compose: relay + demo producer and consumer (${compose_cmd[*]}, profile demo)"
cport=$(free_port)
export NDRELAY_IMAGE=$tag NDRELAY_HOST_PORT=$cport NDRELAY_TOKEN=$token BUILDAH_FORMAT=docker
if [ -n "${NDRELAY_SMOKE_CACERT:-}" ]; then
    export BUILD_CACERT=$NDRELAY_SMOKE_CACERT
elif [ "$prepared" = 1 ]; then
    export BUILD_CACERT=/etc/ssl/certs/ca-certificates.crt  # what prepare's secret names
fi
# Bounded: podman-compose waits without end on a dependency that never starts.
compose() {
    if [ "$engine" = podman ]; then
        timeout 600 podman-compose -p "$project" --podman-build-args "--label $label" --profile demo "$@"
    else
        timeout 600 "${compose_cmd[@]}" -p "$project" --profile demo "$@"
    fi
}
t0=$SECONDS
compose build relay >"$work/compose-build.log" 2>&1 \
    || { tail -40 "$work/compose-build.log"; fail "compose build failed"; }
if [ "$($engine image inspect -f '{{.Id}}' "$tag")" = "$image_id" ]; then
    ok "compose build relay: $((SECONDS - t0)) s, the same image (layer cache)"
else
    # Not a failure: files in the context changed since the build above, say.
    missed=$(awk '/STEP [0-9]+\/[0-9]+:/ { if (step != "" && !cached) { print step; exit }
                                            step = / FROM / ? "" : $0; cached = 0 }
                  /Using cache/ { cached = 1 }' "$work/compose-build.log" | cut -c1-100)
    ok "compose build relay: $((SECONDS - t0)) s, rebuilt from ${missed:-?}"
fi
compose_up=1
compose up -d >"$work/compose-up.log" 2>&1 \
    || { tail -40 "$work/compose-up.log"; fail "compose up failed"; }
# podman-compose answers 0 even when a container failed to start.
if grep -q 'unable to start container' "$work/compose-up.log"; then
    grep -m3 'unable to start container' "$work/compose-up.log"; fail "compose up: a container did not start"
fi
consumer=$($engine ps -a --filter "label=com.docker.compose.project=$project" \
    --filter label=com.docker.compose.service=consumer --format '{{.Names}}')
[ -n "$consumer" ] || fail "no consumer container"
# The consumer waits for the producer's stream, then reports every 2 s.
for _ in $(seq 60); do
    $engine logs "$consumer" >"$work/consumer.log" 2>&1 || true
    [ "$(grep -c 'items/s' "$work/consumer.log")" -ge 2 ] && break
    sleep 1
done
grep -q 'items/s' "$work/consumer.log" || {
    compose logs >"$work/compose.log" 2>&1; tail -40 "$work/compose.log"
    fail "the demo consumer shows no items/s lines"; }
echo "\$ $engine logs $consumer | grep -m4 items/s"
grep -m4 'items/s' "$work/consumer.log" | sed 's/^/  /'
URL=http://127.0.0.1:$cport
t 'curl -s -H "$AUTH" $URL/streams/demo/info'
expect '"name":"demo"'
crelay=$($engine ps -a --filter "label=com.docker.compose.project=$project" \
    --filter label=com.docker.compose.service=relay --format '{{.Names}}')
settings=$($engine inspect -f '{{.HostConfig.Memory}} {{.HostConfig.RestartPolicy.Name}}' "$crelay")
[ "$settings" = "1073741824 unless-stopped" ] \
    || fail "compose relay: memory limit and restart policy are '$settings'"
healthy "$crelay" || fail "compose relay: healthcheck failed"
ok "compose relay $crelay: memory limit 1 GiB, restart unless-stopped, healthcheck healthy"
compose down -t 5 >"$work/compose-down.log" 2>&1 \
    || { tail -20 "$work/compose-down.log"; fail "compose down failed"; }
compose_up=0
[ -z "$($engine ps -a -q --filter "label=com.docker.compose.project=$project")" ] \
    || fail "containers left after compose down"
ok "the consumer container received the producer container's frames; compose down clean"

step "summary"
echo "image: $tag, $image_mb MB ($image_bytes bytes) on $BASE_IMAGE"
echo "build time: $build_seconds s"
echo "$engine stop (graceful shutdown): $stop_seconds s, exit code $exit_code"
