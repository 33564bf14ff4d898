"""Streams through a real nginx (Debian's) in front of the relay, configured as the
README's proxy section says (unbuffered both ways): every byte of 1 MiB arrays arrives,
read and uploaded, with the relay's vectored writes on the served path."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
from _sources import bounded, free_port
from conftest import need

from ndrelay import Relay, RelayClient, RelayHTTPError
from ndrelay.server import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.backends]

MiB = 1 << 20

CONF = """
worker_processes 1;
error_log {root}/error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            client_max_body_size {body_limit};
            proxy_read_timeout 60s;
            proxy_send_timeout 60s;
        }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path):
    """Factory: `nginx(upstream_port)` runs nginx in the foreground in front of it; its
    URL. Stopped by PID at teardown."""
    binary = need("nginx")
    procs = []

    def start(upstream: int, body_limit: str = "0") -> str:
        root = tmp_path / "nginx"
        root.mkdir()
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / sub).mkdir()
        os.chmod(root, 0o777)
        port = free_port()
        conf = root / "nginx.conf"
        conf.write_text(CONF.format(root=root, port=port, upstream=upstream, body_limit=body_limit))
        proc = subprocess.Popen(
            [binary, "-p", str(root), "-c", str(conf), "-g", "daemon off;"],
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
