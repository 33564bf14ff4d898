#!/usr/bin/env bash
# Scale-out smoke test: compose.yaml's `scale` profile (redis with AOF on a volume, two
# relay replicas on the Redis backend, nginx balancing them with docker/nginx.conf) built
# and run with podman-compose (or Docker compose); a queue stream crosses the balancer
# while the replica serving its reader is killed (`kill`, SIGKILL), and the reader must
# end with every item exactly once.
#
#   docker/smoke-scale.sh                     # from any directory
#   docker/smoke-scale.sh --plan              # say what it would use, and stop
#
# Needs what docker/smoke.sh needs (a container engine and its compose, curl, the Python
# of the README's test command, network access for the base image and apt/pip packages;
# ../shared/container/prepare.sh runs first where it sits next to the repository) and an
# ndrelay with the Redis backend (`ndrelay serve --backend`): without it the replicas do
# not share streams, which this says and fails on. Without an engine this fails: it never
# skips. It removes every container, network, volume and image it made (all named
# ndrelay-smoke-scale-*), also on failure.
set -euo pipefail
started=$SECONDS
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

smoke_name=smoke-scale.sh
# shellcheck source=docker/_smoke_common.sh
source "$repo/docker/_smoke_common.sh"

if [ "$plan" = 1 ]; then
    echo "engine: $engine"
    echo "compose: ${compose_cmd[*]}"
    echo "base image: $BASE_IMAGE"
    if [ "$prepared" = 1 ]; then echo "prepare: $prepare"; else echo "prepare: none"; fi
    exit 0
fi

python=${NDRELAY_SMOKE_PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || fail "no python at $python: run the README's test command first," \
    "or set NDRELAY_SMOKE_PYTHON to a python that has ndrelay installed"
"$python" -c 'import ndrelay' || fail "$python cannot import ndrelay"
client() { timeout 300 "$python" "$repo/docker/smoke_client.py" "$@"; }
free_port() {
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

id=$$
project=ndrelay-smoke-scale-$id
label=ndrelay-smoke-scale=$id  # on every image this run builds, for the cleanup
token=smoke-$RANDOM$RANDOM
work=$(mktemp -d)
bg_pids=()
compose_up=0
export NDRELAY_IMAGE=localhost/$project:relay \
    NDRELAY_REDIS_IMAGE=localhost/$project:redis \
    NDRELAY_NGINX_IMAGE=localhost/$project:nginx \
    NDRELAY_TOKEN=$token BUILDAH_FORMAT=docker BASE_IMAGE
if [ -n "${NDRELAY_SMOKE_CACERT:-}" ]; then
    export BUILD_CACERT=$NDRELAY_SMOKE_CACERT
elif [ "$prepared" = 1 ]; then
    export BUILD_CACERT=/etc/ssl/certs/ca-certificates.crt  # what prepare's secret names
fi

# Bounded: podman-compose waits without end on a dependency that never starts.
compose() {
    if [ "$engine" = podman ]; then
        timeout 900 podman-compose -p "$project" --podman-build-args "--label $label" \
            --profile scale "$@"
    else
        timeout 900 "${compose_cmd[@]}" -p "$project" --profile scale "$@"
    fi
}
# The container of a compose service.
container() {
    $engine ps -a --filter "label=com.docker.compose.project=$project" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1
}

cleanup() {
    local rc=$?
    set +e
    for pid in "${bg_pids[@]}"; do kill "$pid" 2>/dev/null; done
    { exec 3>&-; } 2>/dev/null
    if [ "$compose_up" = 1 ]; then
        compose down -t 2 >"$work/compose-down.log" 2>&1
    fi
    local containers
    for _ in 1 2 3 4; do
        containers=$($engine ps -a -q --filter "label=com.docker.compose.project=$project")
        [ -z "$containers" ] && break
        $engine rm -f $containers >/dev/null 2>&1
    done
    [ "$engine" = podman ] && podman pod rm -f "pod_$project" >/dev/null 2>&1
    $engine network rm "${project}_default" >/dev/null 2>&1
    $engine volume rm -f "${project}_redis-data" >/dev/null 2>&1
    local images
    images=$($engine images -a -q --filter "label=$label")
    [ -z "$images" ] || $engine rmi -f $images >/dev/null 2>&1
    $engine rmi -f "$NDRELAY_IMAGE" "$NDRELAY_REDIS_IMAGE" "$NDRELAY_NGINX_IMAGE" >/dev/null 2>&1
    rm -rf "$work"
    if [ "$rc" = 0 ]; then
        printf '\nsmoke-scale.sh: PASS in %d s\n' $((SECONDS - started))
    else
        printf '\nsmoke-scale.sh: FAILED (exit %d) after %d s\n' "$rc" $((SECONDS - started)) >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "lint: hadolint docker/redis.Dockerfile docker/nginx.Dockerfile, compose config"
if command -v hadolint >/dev/null; then
    hadolint docker/redis.Dockerfile docker/nginx.Dockerfile
    ok "hadolint clean"
else
    echo "hadolint is not installed: Dockerfile lint left out"
fi
if command -v docker-compose >/dev/null; then
    docker-compose --profile scale config -q
    ok "compose.yaml's scale profile valid (docker-compose config)"
else
    compose config >/dev/null
    ok "compose.yaml's scale profile valid (${compose_cmd[*]} config)"
fi

step "build: redis, the relay, nginx (BASE_IMAGE=$BASE_IMAGE)"
t0=$SECONDS
compose build redis relay-a nginx >"$work/compose-build.log" 2>&1 \
    || { tail -40 "$work/compose-build.log"; fail "compose build failed"; }
ok "built in $((SECONDS - t0)) s"

step "up: nginx and what it depends on (redis, relay-a, relay-b)"
port=$(free_port)
export NDRELAY_SCALE_PORT=$port
URL=http://127.0.0.1:$port
compose_up=1
compose up -d nginx >"$work/compose-up.log" 2>&1 \
    || { tail -40 "$work/compose-up.log"; fail "compose up failed"; }
# podman-compose answers 0 even when a container failed to start.
if grep -q 'unable to start container' "$work/compose-up.log"; then
    grep -m3 'unable to start container' "$work/compose-up.log"; fail "compose up: a container did not start"
fi
for service in redis relay-a relay-b nginx; do
    [ -n "$(container "$service")" ] || fail "no $service container"
done
[ -z "$(container relay)" ] || fail "the single in-memory relay was started too"
redis=$(container redis) relay_a=$(container relay-a) relay_b=$(container relay-b)
nginx=$(container nginx)
# podman-compose with podman < 4.6 ignores `service_healthy`: everything starts at once.
for _ in $(seq 150); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$URL/healthz")" = 200 ] && break
    sleep 0.2
done
[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$URL/healthz")" = 200 ] || {
    compose logs >"$work/compose.log" 2>&1; tail -40 "$work/compose.log"
    fail "nginx does not answer /healthz on $URL"; }
ok "nginx on $URL answers /healthz"

step "redis: AOF on (fsync every second), data on the named volume"
aof=$($engine exec "$redis" redis-cli config get appendonly | tail -1)
fsync=$($engine exec "$redis" redis-cli config get appendfsync | tail -1)
[ "$aof $fsync" = "yes everysec" ] || fail "redis: appendonly $aof, appendfsync $fsync"
mounts=$($engine inspect -f '{{range .Mounts}}{{.Name}}:{{.Destination}} {{end}}' "$redis")
grep -q "${project}_redis-data:/data" <<<"$mounts" || fail "redis: /data is not the volume ($mounts)"
ok "appendonly yes, appendfsync everysec, /data on volume ${project}_redis-data"

step "the replicas share streams (one made on relay-a is seen by relay-b)"
# Each replica asked inside its own container, past nginx.
in_relay() {
    $engine exec -e NDRELAY_TOKEN="$token" "$1" python3 -c '
import json, os, sys, urllib.request
method, path, body = sys.argv[1], sys.argv[2], sys.argv[3].encode() or None
req = urllib.request.Request("http://127.0.0.1:8000" + path, data=body, method=method,
    headers={"Authorization": "Bearer " + os.environ["NDRELAY_TOKEN"],
             "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
' "$2" "$3" "${4:-}"
}
made=$(in_relay "$relay_a" PUT /streams/shared-check '{"size": 4}')
echo "relay-a: PUT /streams/shared-check -> $made"
case "$made" in 20[01]*) ;; *) fail "relay-a could not create a stream: $made" ;; esac
seen=$(in_relay "$relay_b" GET /streams/shared-check/info)
echo "relay-b: GET /streams/shared-check/info -> ${seen:0:120}"
case "$seen" in
    200*) ;;
    *) fail "relay-b does not see the stream made on relay-a: the replicas do not share" \
        "streams (does this ndrelay have the Redis backend, \`ndrelay serve --backend\`?" \
        "relay-a says: $($engine logs "$relay_a" 2>&1 | head -1))" ;;
esac
ok "a stream made on relay-a is seen by relay-b"

step "a queue stream through nginx; the replica serving its reader is killed mid-stream"
mkfifo "$work/go"
client "$URL" "$token" scale scale-smoke 400 150 <"$work/go" >"$work/scale.out" 2>&1 &
scale_pid=$!
bg_pids+=("$scale_pid")
exec 3>"$work/go"  # the client's stdin, held open until the go-ahead
for _ in $(seq 600); do
    grep -q '^hold:' "$work/scale.out" && break
    kill -0 "$scale_pid" 2>/dev/null || { cat "$work/scale.out"; fail "the scale client exited early"; }
    sleep 0.2
done
grep -q '^hold:' "$work/scale.out" || { cat "$work/scale.out"; fail "the reader got no items in 120 s"; }
cat "$work/scale.out"
victim=
for c in "$relay_a" "$relay_b"; do
    $engine logs "$c" 2>&1 | grep -q 'GET /streams/scale-smoke?' && victim=$c
done
[ -n "$victim" ] || fail "no replica logged the reader's GET /streams/scale-smoke"
echo "\$ $engine kill $victim   # serves the reader"
$engine kill "$victim" >/dev/null || fail "$engine kill $victim failed"
echo go >&3
exec 3>&-
wait "$scale_pid" || { cat "$work/scale.out"; fail "the stream did not finish with every item once"; }
grep -v '^hold:' "$work/scale.out"
grep -q '400 received, 0 lost, 0 duplicated' "$work/scale.out" || fail "items lost or duplicated"
ok "every item exactly once across the kill of $victim"

step "after the kill: the survivor serves everything through nginx"
info=$(curl -s -H "Authorization: Bearer $token" "$URL/streams/scale-smoke/info")
echo "GET /streams/scale-smoke/info -> ${info:0:300}"
grep -q '"state":"ended"' <<<"$info" || fail "the stream is not ended: $info"
for _ in 1 2 3 4; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
        -H "Authorization: Bearer $token" "$URL/streams")
    [ "$code" = 200 ] || fail "GET /streams through nginx answered $code after the kill"
done
ok "the stream ended; GET /streams answered 200 four times in a row"

compose down -t 5 >"$work/compose-down.log" 2>&1 \
    || { tail -20 "$work/compose-down.log"; fail "compose down failed"; }
compose_up=0
[ -z "$($engine ps -a -q --filter "label=com.docker.compose.project=$project")" ] \
    || fail "containers left after compose down"
ok "compose down clean"
