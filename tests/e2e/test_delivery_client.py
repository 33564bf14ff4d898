"""The client's delivery guarantees end to end (DESIGN.md §5): a worker that stops early
loses and duplicates nothing; a worker killed with SIGKILL loses nothing and duplicates at
most what it had not acknowledged; a cut connection is resumed; a relay that restarted
says the stream is gone; uploads resume after a cut without loss or duplicate.

The relay runs as `ndrelay serve --source _sources:numbered` (2000 numbered items, queue
mode, size 64), as a user would run it; killed workers are real processes.
"""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest
from _proxy import CuttingProxy
from _sources import ServeProcess, bounded, clean_env

from ndrelay import AsyncRelayClient, RelayClient, StreamInterrupted, StreamNotFound

pytestmark = [pytest.mark.e2e, pytest.mark.backends]

N = 2000


@pytest.fixture
def relay(backend):
    proc = ServeProcess("--source", "_sources:numbered", "--lease", "2")
    yield proc
    proc.stop()


def drain(client, **kwargs):
    with client.stream("work", **kwargs) as s:
        return [int(a[0]) for a in s]


def test_break_out_of_with_block_loses_and_duplicates_nothing(relay):
    with RelayClient(relay.url) as client:
        first = []
        with client.stream("work") as s:
            for item in s:
                first.append(int(item[0]))
                if len(first) == 100:
                    break
        rest = bounded(lambda: drain(client), 60)
    assert len(first) == 100
    assert sorted(first + rest) == list(range(N))  # 0 lost, 0 duplicated


def test_break_out_of_a_plain_for_loses_and_duplicates_nothing(relay):
    with RelayClient(relay.url) as client:
        first = []
        for item in client.stream("work"):
            first.append(int(item[0]))
            if len(first) == 100:
                break
        gc.collect()  # CPython closes it at once already; other interpreters at a collection
        rest = bounded(lambda: drain(client), 60)
    assert sorted(first + rest) == list(range(N))


def test_queue_get_takes_count_as_taken(relay):
    with RelayClient(relay.url) as client:
        s = client.stream("work", prefetch=8)
        q = s.queue
        first = [int(q.get()[0]) for _ in range(50)]
        s.close()
        rest = bounded(lambda: drain(client), 60)
    assert sorted(first + rest) == list(range(N))


WORKER = textwrap.dedent(
    """
    import os, signal, sys
    from ndrelay import RelayClient
    client = RelayClient(sys.argv[1])
    for n, item in enumerate(client.stream("work", consumer=sys.argv[2])):
        print(int(item[0]), flush=True)
        if n + 1 == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    """
)


def run_killed_worker(url: str, consumer: str, take: int) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, url, consumer, str(take)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    return [int(line) for line in out.stdout.split()]


@pytest.mark.slow
def test_sigkilled_worker_loses_nothing_and_duplicates_only_unacknowledged(relay):
    killed = run_killed_worker(relay.url, "doomed", 100)
    assert len(killed) == 100
    with RelayClient(relay.url) as client:
        unacked = client.info("work")["pending"]  # the killed worker's: its lease runs
        rest = bounded(lambda: drain(client), 60)
    assert set(killed) | set(rest) == set(range(N))  # nothing lost
    duplicated = len(killed) + len(rest) - N
    assert duplicated == len(set(killed) & set(rest))
    assert 0 <= duplicated <= unacked
    assert len(rest) == len(set(rest))


@pytest.mark.slow
def test_restarted_worker_with_the_same_id_gets_its_items_back_first(relay):
    killed = run_killed_worker(relay.url, "w1", 100)
    with RelayClient(relay.url) as client:
        pending = client.info("work")["pending"]
        assert pending > 0
        with client.stream("work", consumer="w1") as s:
            again = [int(next(s)[0]) for _ in range(pending)]
    # what it had not acknowledged comes first, in the order it was delivered
    assert again[0] <= killed[-1] + 1
    assert set(again) >= set(range(again[0], killed[-1] + 1))


def test_three_workers_with_random_early_exits_see_every_item_once(relay):
    import random

    seen: list[int] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with RelayClient(relay.url) as client:
            while True:
                stop = rng.randint(1, 300)
                got = []
                ended = True
                with client.stream("work", prefetch=rng.choice([1, 8, 64])) as s:
                    for item in s:
                        got.append(int(item[0]))
                        if len(got) == stop:
                            ended = False
                            break
                with lock:
                    seen.extend(got)
                if ended:
                    return

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    with RelayClient(relay.url) as client:
        leftover = bounded(lambda: drain(client), 60)  # released after others had ended
    assert sorted(seen + leftover) == list(range(N))


def test_cut_connection_resumes_without_loss_or_duplicate(relay):
    """The client's connection is cut under it (socket shut down): it reconnects with
    its consumer id and `after=`, and the application sees each item once."""
    with RelayClient(relay.url) as client:
        s = client.stream("work", prefetch=4)
        got = []
        for item in s:
            got.append(int(item[0]))
            if len(got) in (50, 400, 1200):
                s._reader.response._conn.sock.shutdown(2)  # the network drops it
        assert s.reconnects >= 1
        s.close()
    assert sorted(got) == list(range(N))


@pytest.mark.parametrize("prefetch", [1, 64])
def test_network_cut_under_stream_and_acks_resumes_without_loss_or_duplicate(relay, prefetch):
    """A proxy resets every connection of the consumer (its stream and its
    acknowledgements) at once, several times: acknowledgements lost with their connection
    are said again, so the relay never waits for them, and every item arrives once."""
    with CuttingProxy(relay.port) as proxy, RelayClient(proxy.url) as client:
        got: list[int] = []

        def consume() -> None:
            with client.stream("work", prefetch=prefetch) as s:
                for item in s:
                    got.append(int(item[0]))
                    if len(got) in (10, 64, 65, 300, 1000, 1990):
                        proxy.cut_all()

        bounded(consume, 120)
        assert proxy.cuts >= 6
    assert sorted(got) == list(range(N))


@pytest.mark.slow
def test_a_consumer_back_after_its_lease_ran_out_acknowledges_again(relay):
    """The network is down for longer than the consumer's lease: the relay gives the
    consumer's items back to the queue and may forget it, refusing (404) the
    acknowledgement the client says again when the network is back. The reader then
    reconnects with the same consumer id and is handed items again: those must be
    acknowledged too, or the relay would wait for them for good. Nothing is lost."""
    with CuttingProxy(relay.port) as proxy, RelayClient(proxy.url) as client:
        got: list[int] = []

        def consume() -> None:
            with client.stream("work", lease=1, reconnect=30) as s:
                for item in s:
                    got.append(int(item[0]))
                    if len(got) == 40:  # 32 acknowledged (half the window), 8 not yet
                        proxy.refuse(3.0)

        bounded(consume, 120)
        assert proxy.cuts >= 2
    counts = Counter(got)
    assert set(counts) == set(range(N))
    assert sum(c - 1 for c in counts.values()) <= 64  # at most the window, given back


@pytest.mark.slow
def test_relay_restart_on_the_memory_backend_says_the_stream_is_gone():
    proc = ServeProcess("--source", "_sources:numbered")
    port = proc.port
    try:
        with RelayClient(proc.url) as client:
            s = client.stream("work", prefetch=2)
            next(s)
            proc.signal(signal.SIGKILL)
            proc.proc.wait(10)
            again = ServeProcess("--port", str(port), wait=False)  # the last --port wins
            again.port, again.url = port, proc.url
            try:
                again.wait_ready()
                with pytest.raises(StreamNotFound) as info:
                    bounded(lambda: list(s), 30)
                assert "in-memory" in str(info.value)
            finally:
                again.stop()
    finally:
        proc.stop()


@pytest.mark.slow
def test_relay_gone_for_good_raises_stream_interrupted_with_cause(relay):
    with RelayClient(relay.url) as client:
        s = client.stream("work", prefetch=2, reconnect=1.0)
        next(s)
        relay.signal(signal.SIGKILL)
        relay.proc.wait(10)
        start = time.monotonic()
        with pytest.raises(StreamInterrupted) as info:
            bounded(lambda: list(s), 30)
        assert time.monotonic() - start < 20
        assert info.value.__cause__ is not None


@pytest.mark.anyio
async def test_async_client_early_exit_loses_and_duplicates_nothing(relay):
    async with AsyncRelayClient(relay.url) as client:
        first = []
        async with await client.stream("work") as s:
            async for item in s:
                first.append(int(item[0]))
                if len(first) == 100:
                    break
        rest = []
        async with await client.stream("work") as s:
            async for item in s:
                rest.append(int(item[0]))
    assert sorted(first + rest) == list(range(N))


@pytest.mark.anyio
async def test_async_client_resumes_a_cut_stream(relay):
    import anyio

    with CuttingProxy(relay.port) as proxy:
        async with AsyncRelayClient(proxy.url) as client:
            got: list[int] = []
            with anyio.fail_after(120):
                async with await client.stream("work", prefetch=8) as s:
                    async for item in s:
                        got.append(int(item[0]))
                        if len(got) in (100, 1000):
                            proxy.cut_all()
                assert s.reconnects >= 2
    assert sorted(got) == list(range(N))


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_batch_larger_than_the_stream_is_refused_clearly(relay):
    with RelayClient(relay.url) as client:
        with pytest.raises(ValueError, match="batch=100 is larger than stream 'work'"):
            client.stream("work", batch=100)


@pytest.mark.slow
def test_interpreter_exit_releases_what_was_read_ahead(relay):
    code = textwrap.dedent(
        """
        import sys
        from ndrelay import RelayClient
        client = RelayClient(sys.argv[1])
        s = client.stream("work", consumer="leaver")
        print(int(next(s)[0]), flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, relay.url],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    taken = [int(x) for x in out.stdout.split()]
    with RelayClient(relay.url) as client:
        info = client.info("work")
        assert info["pending"] == 0  # released at exit, not waiting for the lease
        rest = bounded(lambda: drain(client), 60)
    assert sorted(taken + rest) == list(range(N))
