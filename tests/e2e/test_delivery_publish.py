"""`publish` with a producer id (DESIGN.md §5, idempotent uploads), end to end: an upload
whose connection a proxy cuts mid-body resumes from the relay's position, a producer
killed with SIGKILL and restarted with the same id sends only what the relay lacks, and
the consumer gets every item exactly once. A publish held by a full stream stops after
`timeout` and says how many items the relay took.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from _proxy import CuttingProxy
from _sources import ServeProcess, bounded, clean_env, wait_until

from ndrelay import (
    AsyncRelayClient,
    RelayClient,
    RelayTimeout,
    StreamClosed,
    StreamNotFound,
    UploadRefused,
)

pytestmark = pytest.mark.e2e

N = 3000


def numbered(n: int, start: int = 0):
    """1 KiB int64 items; element 0 of item i holds i."""
    for i in range(start, n):
        yield np.full(128, i, np.int64)


def drain_in_thread(url: str, name: str, out: list[int]) -> threading.Thread:
    def run() -> None:
        with RelayClient(url) as client, client.stream(name, prefetch=8) as s:
            out.extend(int(a[0]) for a in s)

    thread = threading.Thread(target=run, name="test-consumer", daemon=True)
    thread.start()
    return thread


def keep_cutting(proxy: CuttingProxy, cuts: int, every: int, stop: threading.Event) -> None:
    """Arm the proxy again after each cut, `cuts` times."""
    for _ in range(cuts):
        proxy.arm(every)
        while proxy.armed and not stop.wait(0.01):
            pass


@pytest.mark.parametrize("window", [None, 256 * 1024], ids=["one-upload", "windowed"])
def test_upload_cut_mid_body_resumes_without_loss_or_duplicate(server, window):
    with RelayClient(server.url) as client:
        client.create("up", 64)
    got: list[int] = []
    consumer = drain_in_thread(server.url, "up", got)
    stop = threading.Event()
    with CuttingProxy(server.port) as proxy:
        cutter = threading.Thread(target=keep_cutting, args=(proxy, 3, 100_000, stop))
        cutter.start()
        try:
            with RelayClient(proxy.url) as client:
                extra = {} if window is None else {"window": window}
                answer = bounded(lambda: client.publish("up", numbered(N), **extra), 120)
        finally:
            stop.set()
            cutter.join(10)
        assert proxy.cuts == 3
    consumer.join(60)
    assert not consumer.is_alive()
    assert sorted(got) == list(range(N))  # 0 lost, 0 duplicated
    assert answer["reconnects"] >= 3
    assert answer["items"] == N
    assert answer["expected_seq"] == N


@pytest.mark.anyio
async def test_async_publish_resumes_after_a_cut(server):
    import anyio

    with RelayClient(server.url) as client:
        client.create("up", 64)
    got: list[int] = []
    consumer = drain_in_thread(server.url, "up", got)
    with CuttingProxy(server.port) as proxy:
        proxy.arm(200_000)
        async with AsyncRelayClient(proxy.url) as client:
            with anyio.fail_after(120):
                answer = await client.publish("up", numbered(N), producer="async-1")
        assert proxy.cuts == 1
    await anyio.to_thread.run_sync(lambda: consumer.join(60))
    assert sorted(got) == list(range(N))
    assert answer["producer"] == "async-1"
    assert answer["reconnects"] >= 1


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_the_same_producer_id_again_sends_only_what_the_relay_lacks(server):
    with RelayClient(server.url) as client:
        client.create("again", 1000)
        first = client.publish("again", numbered(100), producer="cam-1", end=False)
        second = client.publish("again", numbered(250), producer="cam-1")
        with client.stream("again") as s:
            got = [int(a[0]) for a in s]
    assert (first["items"], first["expected_seq"]) == (100, 100)
    assert (second["items"], second["duplicates"], second["expected_seq"]) == (150, 100, 250)
    assert got == list(range(250))


def test_a_finished_stream_refuses_more_from_a_named_producer(server):
    with RelayClient(server.url) as client:
        client.publish("done", numbered(10), producer="p")
        # the same items again (a producer restarted after it had finished): nothing to do
        again = client.publish("done", numbered(10), producer="p")
        assert (again["items"], again["duplicates"]) == (0, 10)
        with pytest.raises(StreamClosed, match="has ended.*holds 10 items of producer 'p'"):
            client.publish("done", numbered(20), producer="p")
        with pytest.raises(StreamClosed, match="has ended"):
            client.publish("done", numbered(10))  # another producer


def test_publish_timeout_when_held_by_a_full_stream_says_what_was_accepted(server):
    """Small items fit in the socket buffers: the upload waits for its answer, and that
    wait is the `timeout`, not the read timeout (60 s here)."""
    with RelayClient(server.url, read_timeout=60) as client:
        client.create("full", 2)
        with pytest.raises(RelayTimeout) as info:
            bounded(lambda: client.publish("full", numbered(5), timeout=1), 30)
        assert info.value.accepted_items == 2
        assert "accepted 2 items" in str(info.value)
        assert client.info("full")["depth"] == 2


def test_a_stream_deleted_under_a_publish_is_not_created_again(server):
    with RelayClient(server.url) as client:
        client.create("gone", 2)
        failure: list[BaseException] = []

        def publish() -> None:
            try:
                client.publish("gone", numbered(10))
            except Exception as exc:
                failure.append(exc)

        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        assert wait_until(lambda: client.info("gone")["depth"] == 2, 10)
        client.delete("gone")
        thread.join(30)
        assert not thread.is_alive()
        assert failure and isinstance(failure[0], UploadRefused)
        assert "closed by the relay: stream deleted" in str(failure[0])
        assert "accepted 2 items" in str(failure[0])
        assert client.streams() == []


def test_bad_producer_id_is_refused_before_sending(server):
    with RelayClient(server.url) as client:
        with pytest.raises(ValueError, match="producer"):
            client.publish("x", numbered(1), producer="no spaces")
        assert client.streams() == []


PRODUCER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from ndrelay import RelayClient
    url, n = sys.argv[1], int(sys.argv[2])
    items = (np.full(2048, i, np.int64) for i in range(n))  # 16 KiB: more than socket buffers
    with RelayClient(url) as client:
        print(json.dumps(client.publish("work", items, producer="producer-1")), flush=True)
    """
)


@pytest.mark.slow
def test_producer_sigkilled_mid_upload_and_restarted_loses_and_duplicates_nothing():
    relay = ServeProcess()
    try:
        with RelayClient(relay.url) as client:
            client.create("work", 64)
        got: list[int] = []
        consumer = drain_in_thread(relay.url, "work", got)
        cmd = [sys.executable, "-c", PRODUCER, relay.url, str(N)]
        first = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: len(got) >= 500, 60)
            first.send_signal(signal.SIGKILL)  # mid-upload: the stream holds it back
        finally:
            first.kill()
            first.wait(10)
        assert first.returncode == -signal.SIGKILL
        with RelayClient(relay.url) as client:
            had = client.info("work")["produced"]
        assert 500 <= had < N
        second = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        answer = json.loads(second.stdout)
        consumer.join(60)
        assert not consumer.is_alive()
        assert sorted(got) == list(range(N))  # 0 lost, 0 duplicated
        # what the dead process had in its socket may still have reached the relay after
        # the kill: the relay had at least `had` items when the second one started
        assert answer["duplicates"] >= had
        assert answer["items"] + answer["duplicates"] == N
    finally:
        relay.stop()


@pytest.mark.slow
def test_relay_restart_on_the_memory_backend_fails_publish_clearly():
    """The relay is killed and started again on the same port mid-publish: it has lost
    the items it had confirmed, and publish says so (`StreamNotFound`) instead of sending
    the rest into a new, empty stream."""
    relay = ServeProcess()
    again = None
    try:
        with RelayClient(relay.url) as client:
            client.create("work", 64)
        got: list[int] = []
        done = threading.Event()

        def consume() -> None:
            try:
                drain_into(relay.url, "work", got)
            except Exception:
                pass  # the relay went away under it: not what this test is about
            done.set()

        threading.Thread(target=consume, daemon=True).start()
        outcome: list[BaseException] = []

        def publish() -> None:
            with RelayClient(relay.url) as client:
                try:
                    client.publish("work", numbered(100_000), window=64 * 1024)
                except Exception as exc:
                    outcome.append(exc)

        producer = threading.Thread(target=publish, daemon=True)
        producer.start()
        assert wait_until(lambda: len(got) >= 500, 60)  # several uploads confirmed
        relay.signal(signal.SIGKILL)
        relay.proc.wait(10)
        again = ServeProcess("--port", str(relay.port), wait=False)  # the last --port wins
        again.port, again.url = relay.port, relay.url
        again.wait_ready()
        producer.join(60)
        assert not producer.is_alive()
        assert outcome and isinstance(outcome[0], StreamNotFound), outcome
        assert "in-memory backend" in str(outcome[0])
        with RelayClient(again.url) as client:
            assert client.streams() == []  # nothing sent into a new stream
    finally:
        relay.stop()
        if again is not None:
            again.stop()


def drain_into(url: str, name: str, out: list[int]) -> None:
    with RelayClient(url) as client, client.stream(name, prefetch=8, reconnect=0) as s:
        out.extend(int(a[0]) for a in s)
