"""`RelayClient` against faults: a server killed mid-stream, refused connections, unknown
streams, wrong tokens, early closes, silent streams; and server memory on a 2 GB stream.

Servers that get killed (or whose memory is measured) run in a subprocess
(`ndrelay serve`), always killed by PID at the end.
"""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
from _sources import ServeProcess, bounded, free_port, rss_bytes, stream_threads, wait_until

from ndrelay import (
    AsyncRelayClient,
    AuthError,
    ConnectError,
    RelayClient,
    RelayTimeout,
    StreamInterrupted,
    StreamNotFound,
)

pytestmark = [pytest.mark.e2e, pytest.mark.backends]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def endless_items():
    i = 0
    while True:
        yield np.array([i], dtype=np.int64)
        i += 1


# -- a response cut off ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "name"),
    [("_sources:endless", "endless"), ("_sources:endless_large", "endless-large")],
    ids=["small-items", "1MiB-items"],
)
def test_server_killed_mid_stream_raises_stream_interrupted(source, name):
    proc = ServeProcess("--source", source)
    try:
        with RelayClient(proc.url, read_timeout=5) as client:
            s = client.stream(name, prefetch=2, reconnect=1)
            first = [bounded(lambda: next(s), 20) for _ in range(3)]
            proc.signal(signal.SIGKILL)
            proc.proc.wait(timeout=10)
            got = []

            def drain():
                for item in s:
                    got.append(item)

            with pytest.raises(StreamInterrupted) as info:
                bounded(drain, 20)
            assert not isinstance(info.value, RelayTimeout)
            assert proc.url in str(info.value)
            assert "could not be resumed within 1 s" in str(info.value)
            assert isinstance(info.value.__cause__, ConnectError)  # the relay is gone
            # what arrived before the cut is whole and in order
            values = [int(a[0]) for a in first + got]
            if name == "endless":
                assert values == list(range(len(values)))
            else:
                assert values == [i % 256 for i in range(len(values))]
                assert all(a.shape == (1 << 20,) and (a == a[0]).all() for a in first + got)
            s.close()
    finally:
        proc.stop()


@pytest.mark.anyio
async def test_async_server_killed_mid_stream_raises_stream_interrupted(anyio_backend):
    import anyio

    proc = ServeProcess("--source", "_sources:endless")
    try:
        async with AsyncRelayClient(proc.url, read_timeout=5) as client:
            s = await client.stream("endless", prefetch=2, reconnect=1)
            with anyio.fail_after(20):
                for _ in range(3):
                    await s.__anext__()
            proc.signal(signal.SIGKILL)
            await anyio.to_thread.run_sync(lambda: proc.proc.wait(timeout=10))
            with pytest.raises(StreamInterrupted):
                with anyio.fail_after(20):
                    async for _ in s:
                        pass
            await s.aclose()
    finally:
        proc.stop()


# -- refusals at the start ---------------------------------------------------------------


def test_connection_refused_raises_connect_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with RelayClient(url, timeout=5, read_timeout=5) as client:
        calls = {
            "stream": lambda: client.stream("x"),
            "publish": lambda: client.publish("x", [b"a"]),
            "healthz": client.healthz,
            "streams": client.streams,
            "info": lambda: client.info("x"),
        }
        for what, call in calls.items():
            with pytest.raises(ConnectError) as info:
                bounded(call, 20)
            assert url in str(info.value), what
            assert info.value.url is not None and info.value.url.startswith(url), what


def test_unknown_stream_raises_at_stream_time(server):
    before = len(stream_threads())
    with RelayClient(server.url, read_timeout=5) as client:
        with pytest.raises(StreamNotFound) as info:
            client.stream("no-such-stream")
        assert info.value.stream_name == "no-such-stream"
        with pytest.raises(StreamNotFound):
            client.stream("no-such-stream", batch=4, stack=True)
    assert len(stream_threads()) == before


def test_wrong_or_missing_token_raises_auth_error(serve):
    handle = serve(token="s3cret")
    handle.relay.publish("numbers", [np.arange(3)])
    for token in ("wrong", None):
        with RelayClient(handle.url, token=token, read_timeout=5) as client:
            assert client.healthz()["status"] == "ok"  # no auth on /healthz
            calls = {
                "streams": client.streams,
                "info": lambda c=client: c.info("numbers"),
                "create": lambda c=client: c.create("other"),
                "delete": lambda c=client: c.delete("numbers"),
                "stream": lambda c=client: c.stream("numbers"),
                "publish": lambda c=client: c.publish("other", [b"x"], timeout=10),
            }
            for what, call in calls.items():
                with pytest.raises(AuthError):
                    bounded(call, 20)
                    pytest.fail(f"{what} passed with token {token!r}")
    with RelayClient(handle.url, token="s3cret", read_timeout=5) as client:
        assert [s["name"] for s in client.streams()] == ["numbers"]
        got = bounded(lambda: list(client.stream("numbers")), 20)
        assert [a.tolist() for a in got] == [[0, 1, 2]]


# -- closing early -----------------------------------------------------------------------


def _threads_named(name):
    return [t for t in stream_threads() if t.name == f"ndrelay-stream-{name}"]


@pytest.mark.parametrize("how", ["with-break", "close"])
def test_closing_a_half_read_stream_stops_its_reader(server, how):
    name = f"half-{how}"
    server.relay.publish(name, endless_items(), size=8)
    before = len(stream_threads())
    with RelayClient(server.url, read_timeout=10) as client:
        if how == "with-break":
            with client.stream(name, prefetch=2) as s:
                for i, _item in enumerate(s):
                    if i == 3:
                        break
                assert len(_threads_named(name)) == 1
        else:
            s = client.stream(name, prefetch=2)
            for _ in range(4):
                bounded(lambda: next(s), 20)
            assert client.info(name)["consumers"] == 1
            s.close()
        assert wait_until(lambda: len(stream_threads()) == before, 10)
        assert _threads_named(name) == []
        assert wait_until(lambda: client.info(name)["consumers"] == 0, 10)
        # a closed stream hands out at most what it had read ahead, then ends
        rest = [int(a[0]) for a in bounded(lambda: list(s), 20)]
        assert len(rest) <= 8
        assert rest == list(range(4, 4 + len(rest)))
        with pytest.raises(StopIteration):
            next(s)
        # the stream itself is fine: another reader continues where this one left off
        with client.stream(name) as again:
            assert int(bounded(lambda: next(again), 20)[0]) > 3


def test_client_close_closes_its_open_streams(server):
    server.relay.publish("one", endless_items(), size=8)
    server.relay.publish("two", endless_items(), size=8)
    before = len(stream_threads())
    client = RelayClient(server.url, read_timeout=10)
    streams = [client.stream("one", prefetch=2), client.stream("two", batch=2, prefetch=2)]
    for s in streams:
        bounded(lambda s=s: next(s), 20)
    assert len(stream_threads()) == before + 2
    client.close()
    assert wait_until(lambda: len(stream_threads()) == before, 10)
    with RelayClient(server.url) as observer:
        assert wait_until(
            lambda: [observer.info(n)["consumers"] for n in ("one", "two")] == [0, 0], 10
        )


# -- silence -----------------------------------------------------------------------------


def test_read_timeout_on_a_silent_stream(serve):
    handle = serve(heartbeat_interval=60)
    with RelayClient(handle.url, read_timeout=0.5) as client:
        client.create("silent")
        with client.stream("silent") as s:
            with pytest.raises(RelayTimeout):
                bounded(lambda: next(s), 20)
        assert wait_until(lambda: client.info("silent")["consumers"] == 0, 10)


def test_heartbeats_keep_an_idle_stream_alive(serve):
    handle = serve(heartbeat_interval=0.1)
    # generous read timeout: a loaded CI machine may stall the server for a while
    with RelayClient(handle.url, read_timeout=1.5) as client:
        client.create("idle")
        outcome = {}

        def consume():
            try:
                outcome["items"] = [int(a[0]) for a in client.stream("idle")]
            except BaseException as exc:
                outcome["error"] = exc

        reader = threading.Thread(target=consume, name="test-idle-reader", daemon=True)
        reader.start()
        try:
            assert wait_until(lambda: client.info("idle")["consumers"] == 1, 10)
            time.sleep(3.5)  # idle for over 2 read timeouts; heartbeats every 0.1 s
            assert reader.is_alive(), outcome
            assert outcome == {}
            client.publish("idle", [np.array([i]) for i in range(3)])
        finally:
            reader.join(20)
        assert not reader.is_alive()
        assert outcome == {"items": [0, 1, 2]}


def test_publish_timeout_when_the_relay_takes_no_more(client_for_full_stream):
    client, url = client_for_full_stream
    client.create("full", 2)
    items = (np.zeros(1 << 20, np.uint8) for _ in range(64))  # more than socket buffers
    with pytest.raises(RelayTimeout) as info:
        bounded(lambda: client.publish("full", items, timeout=0.5), 20)
    assert url in str(info.value)
    stream_info = client.info("full")
    assert (stream_info["state"], stream_info["depth"]) == ("open", 2)  # items kept
    client.delete("full")  # the relay lets go of the abandoned upload
    assert wait_until(lambda: client.streams() == [], 10)


@pytest.fixture
def client_for_full_stream(server):
    with RelayClient(server.url, read_timeout=10) as client:
        yield client, server.url


# -- memory ------------------------------------------------------------------------------


ITEM_FLOATS = 1 << 20  # 4 MiB of float32
N_ITEMS = 512  # 2 GiB in all


def test_2gb_stream_keeps_server_rss_bounded():
    proc = ServeProcess()
    pool = [np.full(ITEM_FLOATS, k + 1, dtype=np.float32) for k in range(4)]
    stop = threading.Event()
    peak = [0]

    def sample():
        while not stop.is_set():
            rss = rss_bytes(proc.pid)
            if rss is None:
                return
            peak[0] = max(peak[0], rss)
            time.sleep(0.005)

    def items():
        for i in range(N_ITEMS):
            yield pool[i % 4]  # the same few arrays, never modified

    sampler = threading.Thread(target=sample, name="test-rss-sampler", daemon=True)
    result = {}
    try:
        with RelayClient(proc.url, read_timeout=30) as client:
            client.create("bulk", 64)
            base = rss_bytes(proc.pid)
            assert base is not None
            peak[0] = base
            sampler.start()
            producer = threading.Thread(
                target=lambda: result.update(client.publish("bulk", items(), timeout=60)),
                name="test-bulk-producer",
                daemon=True,
            )
            t0 = time.monotonic()
            producer.start()
            try:

                def consume():
                    n = 0
                    for item in client.stream("bulk", prefetch=8):
                        k = n % 4 + 1
                        assert item.dtype == np.float32 and item.shape == (ITEM_FLOATS,)
                        assert item[0] == k and item[-1] == k, n
                        if n in (0, 1, 257, N_ITEMS - 1):  # checksum a few in full
                            assert float(item.sum(dtype=np.float64)) == k * ITEM_FLOATS
                        n += 1
                    return n

                count = bounded(consume, 120)
            finally:
                producer.join(30)
            elapsed = time.monotonic() - t0
            assert not producer.is_alive()
            assert count == N_ITEMS
            assert result["items"] == N_ITEMS
            assert client.info("bulk")["state"] == "ended"
    finally:
        stop.set()
        if sampler.ident is not None:
            sampler.join(10)
        proc.stop()
    growth = peak[0] - base
    total = N_ITEMS * ITEM_FLOATS * 4
    print(
        f"\n2 GB relay: {total / 2**30:.1f} GiB in {elapsed:.1f} s; server RSS {base / 2**20:.0f}"
        f" MiB at start, peak {peak[0] / 2**20:.0f} MiB, growth {growth / 2**20:.0f} MiB"
    )
    assert growth < 64 * ITEM_FLOATS * 4 + 400 * 2**20
