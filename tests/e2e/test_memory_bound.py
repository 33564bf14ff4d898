"""The relay-wide memory bound (`--max-memory`): producers wait once the bytes buffered
over all streams reach it, the relay's memory stays near it, and nothing accepted is lost."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
from _sources import ServeProcess, bounded, clean_env, poll, rss_bytes

from ndrelay import Relay, RelayClient
from ndrelay._sizes import available_memory, default_max_memory, parse_size
from ndrelay.server import Settings

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def memory(url: str) -> tuple[int, int]:
    """(bytes buffered, bound) from the headers of `GET /streams`."""
    response = httpx.get(url + "/streams", timeout=10)
    return int(response.headers["ndrelay-memory-bytes"]), int(
        response.headers["ndrelay-memory-limit"]
    )


def upload_thread(url: str, name: str, items, results: dict) -> threading.Thread:
    def run() -> None:
        with RelayClient(url, read_timeout=60) as client:
            results[name] = client.publish(name, items, prefetch=1)

    thread = threading.Thread(target=run, name=f"test-upload-{name}", daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_uploads_wait_at_the_bound_and_rss_stays_near_it():
    """Four producers upload 192 MiB each (3x the bound in all) into four streams with no
    consumer: the relay takes 256 MiB, they wait, RSS stays under the bound plus a
    documented constant; then consumers drain everything, in order, none lost."""
    limit = 256 * MiB
    proc = ServeProcess("--max-memory", "256MiB", env=clean_env())
    try:
        baseline = rss_bytes(proc.pid)
        names = [f"cam{i}" for i in range(4)]
        count, item = 24, 8 * MiB

        def frames(k: int):
            for i in range(count):
                yield np.full(item, (k * 31 + i) % 256, dtype=np.uint8)

        results: dict = {}
        threads = [upload_thread(proc.url, n, frames(k), results) for k, n in enumerate(names)]
        poll(lambda: memory(proc.url)[0] >= limit - item, "the relay to fill to its bound", 60)
        assert memory(proc.url)[1] == limit
        peak = 0
        for _ in range(20):  # the producers keep pushing; the relay holds still
            used, _ = memory(proc.url)
            assert used <= limit
            peak = max(peak, rss_bytes(proc.pid))
            threading.Event().wait(0.1)
        assert all(t.is_alive() for t in threads), "a producer passed the bound"
        with RelayClient(proc.url) as client:
            produced = sum(client.info(n)["produced"] for n in names)
        assert produced * item <= limit
        # documented in README (Configuration): the bound plus about 128 MiB of the
        # process itself and of the frames being read by uploads in progress
        assert peak <= limit + 128 * MiB + baseline, (peak / MiB, baseline / MiB)
        print(f"baseline RSS {baseline / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB at the bound")

        # streams share the bound: one without a consumer can hold all of it, so all
        # four are read at once
        got: dict = {}

        def read(name: str) -> None:
            with RelayClient(proc.url, read_timeout=60) as client:
                got[name] = [int(a[0]) for a in client.stream(name)]

        readers = [threading.Thread(target=read, args=(n,), daemon=True) for n in names]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(120)
        for k, name in enumerate(names):
            assert got[name] == [(k * 31 + i) % 256 for i in range(count)]
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive()
        assert all(results[n]["items"] == count for n in names)
        assert memory(proc.url)[0] == 0
    finally:
        proc.stop()


def test_a_producer_waits_for_another_streams_consumer(serve):
    """The bound is shared: an upload to one stream waits while another stream holds the
    budget, and goes on once a consumer drains that other stream."""
    server = serve(max_memory=4 * MiB)
    relay = server.relay
    relay.publish("held", (np.full(MiB, i, np.uint8) for i in range(4)))
    poll(lambda: memory(server.url)[0] == 4 * MiB, "the first stream to take the budget")
    results: dict = {}
    thread = upload_thread(
        server.url, "waiting", (np.full(MiB, 9, np.uint8) for _ in range(3)), results
    )
    threading.Event().wait(0.5)
    assert thread.is_alive() and "waiting" not in results
    with RelayClient(server.url) as client:
        assert client.info("waiting")["produced"] == 0
        assert [int(a[0]) for a in bounded(lambda: list(client.stream("held")), 30)] == [0, 1, 2, 3]
        thread.join(30)
        assert results["waiting"]["items"] == 3
        assert [int(a[0]) for a in bounded(lambda: list(client.stream("waiting")), 30)] == [9] * 3
    assert memory(server.url) == (0, 4 * MiB)


def test_metrics_show_memory_against_the_bound(serve):
    server = serve(max_memory=64 * MiB)
    server.relay.publish("m", iter([np.zeros(1000, np.uint8)]))
    poll(lambda: memory(server.url)[0] == 1000, "the item to be buffered")
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("ndrelay_memory")
    }
    assert values == {"ndrelay_memory_bytes": 1000, "ndrelay_memory_limit_bytes": 64 * MiB}


def test_fanout_drops_its_own_oldest_rather_than_wait(serve):
    """A fanout stream without `block` consumers makes room in the budget the way it
    makes room in its own buffer: its oldest items go (counted as dropped)."""
    server = serve(max_memory=3 * MiB)
    relay: Relay = server.relay
    stream = relay.publish("live", (np.full(MiB, i, np.uint8) for i in range(10)), mode="fanout")
    poll(lambda: stream.info()["state"] == "ended", "the fanout producer to finish", 30)
    info = stream.info()
    assert info["produced"] == 10 and info["depth"] == 3 and info["bytes"] == 3 * MiB


def test_in_process_producer_threads_wait_and_resume(serve):
    server = serve(max_memory=2 * MiB)
    relay: Relay = server.relay
    a = relay.publish("a", (np.full(MiB, i, np.uint8) for i in range(6)))
    b = relay.publish("b", (np.full(MiB, 100 + i, np.uint8) for i in range(6)))
    poll(lambda: memory(server.url)[0] == 2 * MiB, "the budget to fill")
    threading.Event().wait(0.3)
    assert a.info()["produced"] + b.info()["produced"] == 2
    with RelayClient(server.url) as client:
        got_a: list[int] = []
        reader = threading.Thread(
            target=lambda: got_a.extend(int(x[0]) for x in client.stream("a")), daemon=True
        )
        reader.start()
        got_b = bounded(lambda: [int(x[0]) for x in client.stream("b")], 60)
        reader.join(60)
    assert got_a == list(range(6)) and got_b == [100 + i for i in range(6)]


@pytest.mark.parametrize(
    ("text", "value"),
    [("256MiB", 256 * MiB), ("1GiB", 1 << 30), ("1g", 1 << 30), ("1048576", MiB), ("2 MB", 2e6)],
)
def test_sizes(text, value):
    assert parse_size(text) == value


def test_bad_size_names_the_setting(monkeypatch):
    monkeypatch.setenv("NDRELAY_MAX_MEMORY", "lots")
    with pytest.raises(ValueError, match="NDRELAY_MAX_MEMORY.*'lots'"):
        Settings.from_env()
    monkeypatch.setenv("NDRELAY_MAX_MEMORY", "1GiB")
    assert Settings.from_env().max_memory == 1 << 30


def test_default_is_half_the_memory_the_process_may_use():
    physical = __import__("os").sysconf("SC_PAGE_SIZE") * __import__("os").sysconf("SC_PHYS_PAGES")
    assert 0 < available_memory() <= physical
    assert Settings().max_memory == default_max_memory() == available_memory() // 2


def test_cli_refuses_a_bad_max_memory():
    import subprocess

    from _sources import ndrelay_cmd

    result = subprocess.run(
        ndrelay_cmd("serve", "--max-memory", "12 parsecs"),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--max-memory" in result.stderr and "'12 parsecs'" in result.stderr
