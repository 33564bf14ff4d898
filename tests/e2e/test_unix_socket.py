"""`ndrelay serve --uds PATH` (or `NDRELAY_UDS`) and `unix:///PATH` clients: same-host
traffic over a Unix socket, through the sync and async clients and curl."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess

import anyio
import numpy as np
import pytest
from _sources import ServeProcess, bounded
from conftest import need

from ndrelay import AsyncRelayClient, ConnectError, RelayClient, StreamNotFound

pytestmark = [pytest.mark.e2e, pytest.mark.backends]

LIMIT = 20


@pytest.fixture
def uds_serve(tmp_path, backend):
    """Factory: `ndrelay serve --uds <tmp>/relay.sock <args>`; killed by PID at teardown."""
    procs = []

    def start(*args, uds_env=False):
        proc = ServeProcess(*args, uds=str(tmp_path / "relay.sock"), uds_env=uds_env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_sync_client_over_a_unix_socket(uds_serve, how):
    proc = uds_serve("--demo", uds_env=how == "env")
    assert proc.url.startswith("unix:///")
    assert stat.S_ISSOCK(os.stat(proc.uds).st_mode)
    big = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: the zero-copy read path
    with RelayClient(proc.url, read_timeout=LIMIT) as client:
        assert client.healthz()["status"] == "ok"
        assert {"radar", "count"} <= {s["name"] for s in client.streams()}
        got = bounded(lambda: list(client.stream("count")), LIMIT)
        assert [a.tolist() for a in got] == [[i, i * i, i * i * i] for i in range(10)]
        answer = client.publish("big", (big + i for i in range(5)))
        assert (answer["items"], answer["next_seq"]) == (5, 5)
        assert client.info("big")["state"] == "ended"
        batches = bounded(lambda: list(client.stream("big", batch=2, stack=True)), LIMIT)
        assert [b.shape for b in batches] == [(2, 1 << 18), (2, 1 << 18), (1, 1 << 18)]
        np.testing.assert_array_equal(
            np.concatenate(batches), np.stack([big + i for i in range(5)])
        )
        with pytest.raises(StreamNotFound):
            client.stream("missing")


def test_async_client_over_a_unix_socket(uds_serve):
    proc = uds_serve("--demo")

    async def main():
        async with AsyncRelayClient(proc.url, read_timeout=LIMIT) as client:
            assert (await client.healthz())["status"] == "ok"
            with anyio.fail_after(LIMIT):
                got = [a async for a in await client.stream("count")]
            assert [a.tolist() for a in got] == [[i, i * i, i * i * i] for i in range(10)]
            items = [np.full(1000, i, np.int32) for i in range(4)]
            answer = await client.publish("up", items)
            assert answer["items"] == 4
            with anyio.fail_after(LIMIT):
                back = [a async for a in await client.stream("up")]
            assert [a.tolist() for a in back] == [a.tolist() for a in items]

    anyio.run(main)


def test_curl_reads_the_unix_socket(uds_serve):
    curl = need("curl")
    proc = uds_serve("--demo")
    out = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "10",
            "--unix-socket",
            proc.uds,
            "http://localhost/streams/count?format=ndjson",
        ],
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x["kind"] for x in lines] == ["data"] * 10 + ["end"]


def test_sigterm_removes_the_socket_file_and_the_data_path_then_fails_to_connect(uds_serve):
    proc = uds_serve()
    url = proc.url
    proc.signal(signal.SIGTERM)
    assert proc.proc.wait(timeout=20) == 0, proc.stderr_text()
    assert not os.path.exists(proc.uds)
    with RelayClient(url, timeout=5) as client:
        with pytest.raises(ConnectError):
            client.stream("count")
        with pytest.raises(ConnectError):
            client.publish("up", [b"x"])


@pytest.mark.parametrize("url", ["unix://relative.sock", "unix://host/path.sock", "unix://"])
def test_a_malformed_unix_url_is_refused_clearly(url):
    with pytest.raises(ValueError, match="unix:///"):
        RelayClient(url)
