"""Streams through a real nginx (Debian's) run with the repository's own docker/nginx.conf (the
config of compose.yaml's `scale` profile and of README's "Behind a proxy"; ports replaced):
every byte of 1 MiB arrays arrives, read and uploaded; an upload's frames reach a reader
while it lasts (no request buffering) and a reader gets each frame as it comes (no
response buffering); an upload over nginx's default 1 MB body limit is accepted; with two
`ndrelay serve` processes behind it, a replica killed with SIGKILL is passed over. On the
Redis backend (once `ndrelay serve --backend` exists), two replicas on one redis-server
serve one stream across a replica kill, each item exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from _sources import ServeProcess, bounded, free_port
from conftest import need

from ndrelay import (
    MEDIA_TYPE,
    DataFrame,
    EndFrame,
    Relay,
    RelayClient,
    RelayHTTPError,
    encode_frame,
)
from ndrelay.server import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.backends]

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "docker" / "nginx.conf"


def _replace(text: str, pattern: str, new: str) -> str:
    """`text` with the one match of `pattern` replaced: a docker/nginx.conf that no longer
    has the line fails here, loudly, instead of testing something else."""
    got, count = re.subn(pattern, lambda _: new, text, flags=re.MULTILINE)
    assert count == 1, f"docker/nginx.conf: {count} matches of {pattern!r}, want 1"
    return got


def render(port: int, upstreams: tuple[int, ...], body_limit: str | None = None) -> str:
    """docker/nginx.conf listening on 127.0.0.1:`port` in front of relays on 127.0.0.1:
    `upstreams` (one or two) instead of compose's relay-a and relay-b."""
    assert 1 <= len(upstreams) <= 2
    text = _replace(CONF.read_text(), r"^(\s*)listen 8080;", f"        listen 127.0.0.1:{port};")
    text = _replace(text, r"server relay-a:8000 ", f"server 127.0.0.1:{upstreams[0]} ")
    if len(upstreams) == 2:
        text = _replace(text, r"server relay-b:8000 ", f"server 127.0.0.1:{upstreams[1]} ")
    else:
        text = _replace(text, r"^\s*server relay-b:8000 [^\n]*\n", "")
    if body_limit is not None:
        text = _replace(text, r"client_max_body_size 0;", f"client_max_body_size {body_limit};")
    return text


@pytest.fixture
def nginx(tmp_path):
    """Factory: `nginx(*upstream_ports)` runs nginx in the foreground with docker/nginx.conf
    in front of them; its URL. Stopped by PID at teardown."""
    binary = need("nginx")
    procs = []

    def start(*upstreams: int, body_limit: str | None = None) -> str:
        root = tmp_path / f"nginx{len(procs)}"
        root.mkdir()
        os.chmod(root, 0o777)  # workers run as nobody when the test runs as root
        port = free_port()
        conf = root / "nginx.conf"
        conf.write_text(render(port, upstreams, body_limit))
        proc = subprocess.Popen(
            [binary, "-p", f"{root}/", "-c", str(conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {proc.stderr.read().decode()}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not proxy /healthz in time")
            time.sleep(0.05)

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        proc.stderr.close()


def _directives(text: str) -> set[str]:
    """The directive lines of an nginx config, comments and indentation removed."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return {" ".join(line.split()) for line in lines if line}


def test_readmes_nginx_lines_are_docker_nginx_conf_lines():
    """README shows the lines that matter; docker/nginx.conf (tested below) holds them all,
    so the two cannot drift apart."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```nginx\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) == 1, "README: one nginx block (Behind a proxy)"
    missing = _directives(blocks[0]) - _directives(CONF.read_text())
    assert not missing, f"README's nginx lines not in docker/nginx.conf: {sorted(missing)}"


def arrays(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(MiB // 4, dtype=np.float32) for _ in range(n)]


def test_a_served_1mib_stream_through_nginx_arrives_byte_for_byte(serve, nginx, backend):
    items = arrays(40, 1)
    relay = Relay(settings=Settings(backend=backend))
    relay.publish("w1", iter(items), size=8)
    url = nginx(serve(relay).port)
    with RelayClient(url, read_timeout=30) as client:
        got = bounded(lambda: list(client.stream("w1")), 60)
    assert len(got) == len(items)
    for a, b in zip(got, items, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def test_an_upload_and_a_batched_read_through_nginx_arrive_byte_for_byte(server, nginx):
    items = arrays(24, 2)
    url = nginx(server.port)
    with RelayClient(url, read_timeout=30) as client:
        client.create("up", 8)  # smaller than the upload: it waits for the reader
        reader = client.stream("up", batch=5, stack=True)
        answers: list = []
        upload = threading.Thread(
            target=lambda: answers.append(client.publish("up", iter(items))), daemon=True
        )
        upload.start()
        got = bounded(lambda: list(reader), 60)
        upload.join(60)
        assert (answers[0]["items"], answers[0]["next_seq"]) == (24, 24)
    assert [len(b) for b in got] == [5, 5, 5, 5, 4]
    assert np.concatenate(got).tobytes() == np.stack(items).tobytes()


def test_a_proxys_own_413_page_is_one_line_saying_so(server, nginx):
    """nginx with a body limit answers an upload over it with its own HTML page: the
    client's exception says what happened in one line, not the HTML."""
    url = nginx(server.port, body_limit="1k")
    with RelayClient(url, read_timeout=30) as client:
        with pytest.raises(RelayHTTPError) as info:
            bounded(lambda: client.publish("big", iter(arrays(2, 3))), 60)
    message = str(info.value)
    assert message.endswith(
        "the proxy in front of the relay refused the upload: 413 Request Entity Too Large; "
        "see README: behind a proxy"
    ), message
    assert "\n" not in message and "<" not in message
    assert info.value.status == 413


def test_an_uploads_frames_reach_a_reader_through_nginx_while_the_upload_lasts(server, nginx):
    """One long upload, each item produced only once the reader behind nginx has the one
    before: with request or response buffering this would stall at the first item."""
    url = nginx(server.port)
    got: list[int] = []
    arrived = threading.Condition()

    def sensor():
        for i in range(20):
            with arrived:
                if not arrived.wait_for(lambda i=i: len(got) >= i, timeout=30):
                    raise TimeoutError(f"item {i - 1} did not reach the reader during the upload")
            yield np.full(1024, i, np.int32)

    with RelayClient(url, read_timeout=30) as client:
        client.create("live", size=4)
        answers: list = []
        upload = threading.Thread(
            target=lambda: answers.append(client.publish("live", sensor())), daemon=True
        )
        upload.start()

        def read() -> None:
            for item in client.stream("live"):
                with arrived:
                    got.append(int(item[0]))
                    arrived.notify_all()

        bounded(read, 60)
        upload.join(60)
    assert got == list(range(20))
    assert answers and answers[0]["items"] == 20


def test_curl_uploads_a_body_over_1_mb_through_nginx(server, nginx, tmp_path):
    """nginx's default limit answers 413 above 1 MB; the config has none."""
    curl = need("curl")
    url = nginx(server.port)
    items = arrays(3, 4)  # 3 MiB of frames
    body = tmp_path / "frames.msgpack"
    body.write_bytes(
        b"".join(encode_frame(DataFrame(seq=i, data=a)) for i, a in enumerate(items))
        + encode_frame(EndFrame(seq=3))
    )
    done = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "60",
            "-H",
            f"Content-Type: {MEDIA_TYPE}",
            "--data-binary",
            f"@{body}",
            f"{url}/streams/big",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert '"items":3' in done.stdout.replace(" ", ""), done.stdout
    with RelayClient(url, read_timeout=30) as client:
        got = bounded(lambda: list(client.stream("big")), 60)
    assert [a.tobytes() for a in got] == [a.tobytes() for a in items]


def test_a_relay_killed_behind_nginx_is_passed_over(nginx):
    """Two `ndrelay serve` processes behind nginx; one gets SIGKILL: reads and a new
    upload go to the other (an upload too: nothing of it reached the dead one)."""
    a, b = ServeProcess(), ServeProcess()
    try:
        url = nginx(a.port, b.port)
        with httpx.Client(timeout=10) as http:
            assert {http.get(f"{url}/streams").status_code for _ in range(4)} == {200}
            a.signal(signal.SIGKILL)
            a.proc.wait(timeout=10)
            statuses = [http.get(f"{url}/streams").status_code for _ in range(6)]
        assert statuses == [200] * 6
        with RelayClient(url, read_timeout=30) as client:
            answer = client.publish("after", iter([np.arange(3), np.arange(4)]))
            got = bounded(lambda: list(client.stream("after")), 30)
        assert answer["items"] == 2
        assert [x.tolist() for x in got] == [[0, 1, 2], [0, 1, 2, 3]]
    finally:
        a.stop()
        b.stop()


# -- two replicas on one Redis (the Redis backend: `ndrelay serve --backend redis://...`) ----


@pytest.fixture
def redis_url(redis_server):
    """The session's redis-server (tests/conftest.py), flushed."""
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.mark.parametrize("victim", ["reader's", "other"])
def test_two_replicas_on_redis_behind_nginx_lose_nothing_when_one_is_killed(
    nginx, redis_url, victim
):
    """docker/smoke_client.py's `scale` check on the host: 300 numbered items uploaded
    through nginx with a producer id and read with a consumer id; mid-stream, the replica
    serving the read gets SIGKILL, or the other one (which nginx's round robin gave the
    upload); every item arrives exactly once."""
    replicas = [ServeProcess("--backend", redis_url, "--log-level", "info") for _ in range(2)]
    try:
        url = nginx(*(r.port for r in replicas))
        client = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "docker" / "smoke_client.py"),
                url,
                "",
                "scale",
                "scale",
                "300",
                "100",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            hold = bounded(client.stdout.readline, 120)
            assert hold.startswith("hold:"), hold + client.stdout.read()
            serving = [r for r in replicas if "GET /streams/scale?" in r.stdout_text()]
            assert len(serving) == 1, "not one replica logged the consumer's GET"
            killed = serving[0] if victim == "reader's" else replicas[replicas[0] is serving[0]]
            killed.signal(signal.SIGKILL)
            killed.proc.wait(timeout=10)
            client.stdin.write("go\n")
            client.stdin.flush()
            out, _ = client.communicate(timeout=240)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(timeout=10)
        print(hold + out)  # the figures: sent, received, lost, duplicated, reconnects, retries
        assert client.returncode == 0, hold + out
        assert "300 received, 0 lost, 0 duplicated" in out, out
    finally:
        for r in replicas:
            r.stop()
