"""Stream modes and backpressure (DESIGN.md §4) through a real server.

Consumers are plain HTTP readers in threads. A "slow" consumer is one that connected
with a small receive buffer and does not read: once the kernel's socket buffers are
full, the server can deliver nothing more to it, which is what falling behind means.
Items are large enough (128 KiB) for that to happen after a bounded number of them.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from _sources import poll

from ndrelay import (
    DataFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    FrameDecoder,
    RelayClient,
    encode_frame,
)

pytestmark = [pytest.mark.e2e, pytest.mark.backends]

#: Upper bound of every network call, join and polling loop.
WAIT = 10.0
#: Payload of the items used to fill socket buffers, and how many of them to send:
#: 200 x 128 KiB is far more than a loopback connection can hold in flight.
BIG = 128 * 1024
MANY = 200


@pytest.fixture
def http(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=WAIT) as client:
        yield client


def info(http: httpx.Client, name: str) -> dict[str, Any]:
    r = http.get(f"/streams/{name}/info")
    assert r.status_code == 200, r.text
    return r.json()


def settle(http: httpx.Client, name: str, key: str, polls: int = 15) -> int:
    """Wait until `info[key]` has kept one value for `polls` polls in a row; that value.

    Used to see a producer being held: its count stops moving. (The assertion is then
    on the value, never on how long anything took.)"""
    until = time.monotonic() + WAIT
    last, same = None, 0
    while same < polls:
        if time.monotonic() > until:
            raise AssertionError(f"{key} of {name!r} never settled")
        value = info(http, name)[key]
        same = same + 1 if value == last else 0
        last = value
        time.sleep(0.03)
    assert last is not None
    return last


def big_item(i: int) -> np.ndarray:
    item = np.zeros(BIG, np.uint8)
    item[:8] = np.frombuffer(np.int64(i).tobytes(), np.uint8)
    return item


def big_seq(item: np.ndarray) -> int:
    return int(item[:8].view(np.int64)[0])


def small_frames(n: int, start: int = 0) -> bytes:
    return b"".join(
        encode_frame(DataFrame(i, np.full(4, i, np.int32))) for i in range(start, start + n)
    )


class Reader:
    """One consumer: opens `GET path` now, reads its frames in a thread until the
    terminal frame. With `rcvbuf`, its socket has that small a receive buffer; with
    `paused`, it reads nothing until `resume()`."""

    def __init__(
        self, url: str, path: str, *, rcvbuf: int | None = None, paused: bool = False
    ) -> None:
        transport = None
        if rcvbuf is not None:
            transport = httpx.HTTPTransport(
                socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)]
            )
        self.client = httpx.Client(base_url=url, timeout=WAIT, transport=transport)
        self._request = self.client.stream("GET", path)
        self.response = self._request.__enter__()
        assert self.response.status_code == 200, self.response.read()
        self.ndjson = self.response.headers["content-type"].startswith("application/x-ndjson")
        self.frames: list[Any] = []
        self.failure: BaseException | None = None
        self._go = threading.Event()
        if not paused:
            self._go.set()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"reader {path}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if not self._go.wait(WAIT):
                return
            if self.ndjson:
                for line in self.response.iter_lines():
                    frame = json.loads(line)
                    self.frames.append(frame)
                    if frame["kind"] in ("end", "error") or self._stop.is_set():
                        return
                return
            decoder = FrameDecoder()
            for chunk in self.response.iter_raw():
                decoder.feed(chunk)
                for frame in decoder.frames():
                    self.frames.append(frame)
                    if isinstance(frame, EndFrame | ErrorFrame):
                        return
                if self._stop.is_set():
                    return
        except BaseException as exc:  # reported by join()
            self.failure = exc

    def resume(self) -> None:
        self._go.set()

    def join(self) -> list[Any]:
        self._go.set()
        self.thread.join(WAIT)
        alive = self.thread.is_alive()
        if alive:
            self._stop.set()
        self.close()
        self.thread.join(WAIT)
        assert not alive, "reader did not finish"
        if self.failure is not None:
            raise self.failure
        return self.frames

    def close(self) -> None:
        self._request.__exit__(None, None, None)
        self.client.close()

    @property
    def seqs(self) -> list[int]:
        """Seqs of the items received (a batched frame counts for its `count` items)."""
        out: list[int] = []
        for f in self.frames:
            if isinstance(f, DataFrame):
                out.extend(range(f.seq, f.seq + (f.count or 1)))
            elif isinstance(f, dict) and f["kind"] == "data":
                out.extend(range(f["seq"], f["seq"] + f.get("count", 1)))
        return out


@pytest.fixture
def readers() -> Iterator[list[Reader]]:
    """Readers a test opens; closed and joined at teardown whatever happened."""
    opened: list[Reader] = []
    yield opened
    for reader in opened:
        reader._stop.set()
        reader._go.set()
        reader.close()
        reader.thread.join(WAIT)


def open_reader(readers: list[Reader], server: Any, path: str, **kwargs: Any) -> Reader:
    reader = Reader(server.url, path, **kwargs)
    readers.append(reader)
    return reader


def metric(http: httpx.Client, name: str, stream: str) -> float:
    text = http.get("/metrics").text
    match = re.search(rf'^{name}\{{[^}}]*stream="{stream}"[^}}]*\}} (\S+)$', text, re.MULTILINE)
    assert match, f"no {name} for {stream!r}"
    return float(match.group(1))


# -- queue ---------------------------------------------------------------------------------


def test_queue_three_consumers_share_every_item_once(server, http, readers):
    n = 3000
    assert http.put("/streams/q", json={"size": 64}).status_code == 201
    group = [
        open_reader(readers, server, "/streams/q"),
        open_reader(readers, server, "/streams/q?batch=16"),
        open_reader(readers, server, "/streams/q?format=ndjson"),
    ]
    poll(lambda: info(http, "q")["consumers"] == 3, "three consumers")

    # one upload of 3000 frames: the relay holds it while the buffer is full
    r = http.post("/streams/q", content=small_frames(n) + encode_frame(EndFrame(n)))
    assert r.status_code == 200
    assert r.json() == {"accepted": n + 1, "items": n, "next_seq": n, "duplicates": 0}

    seen: list[int] = []
    for reader in group:
        frames = reader.join()
        last = frames[-1]
        assert last == EndFrame(n) or last == {"kind": "end", "seq": n}
        assert reader.seqs == sorted(reader.seqs), "a consumer got items out of order"
        seen.extend(reader.seqs)
        for f in frames:  # each item is the one its seq names
            if isinstance(f, DataFrame):
                expect = np.arange(f.seq, f.seq + (f.count or 1), dtype=np.int32)
                np.testing.assert_array_equal(f.data.reshape(-1, 4)[:, 0], expect)
            elif isinstance(f, dict) and f["kind"] == "data":
                assert f["data"] == [f["seq"]] * 4
    assert len(seen) == n, "an item was lost or delivered twice"
    assert sorted(seen) == list(range(n))
    st = info(http, "q")
    assert (st["state"], st["produced"], st["consumed"], st["depth"]) == ("ended", n, n, 0)


def test_queue_with_client_library_consumers(server, http):
    """The same with `RelayClient.stream`, the producer in-process."""
    n = 3000
    assert http.put("/streams/q", json={"size": 32}).status_code == 201
    got: list[list[int]] = [[], [], []]
    failures: list[BaseException] = []

    def consume(client: RelayClient, remote: Any, out: list[int]) -> None:
        try:
            for item in remote:
                out.append(int(item[0]))
        except BaseException as exc:
            failures.append(exc)

    with RelayClient(server.url, timeout=WAIT, read_timeout=WAIT) as client:
        remotes = [client.stream("q") for _ in range(3)]
        threads = [
            threading.Thread(target=consume, args=(client, remote, out), daemon=True)
            for remote, out in zip(remotes, got, strict=True)
        ]
        for t in threads:
            t.start()
        poll(lambda: info(http, "q")["consumers"] == 3, "three consumers")
        server.relay.publish("q", (np.array([i], np.int64) for i in range(n)), size=32)
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
    assert not failures
    everything = [i for out in got for i in out]
    assert len(everything) == n
    assert sorted(everything) == list(range(n))


# -- fanout --------------------------------------------------------------------------------


def test_fanout_every_consumer_gets_every_item_in_order(server, http, readers):
    n = 500
    assert http.put("/streams/f", json={"size": 16, "mode": "fanout"}).status_code == 201
    group = [
        open_reader(readers, server, "/streams/f"),
        open_reader(readers, server, "/streams/f?batch=8"),
        open_reader(readers, server, "/streams/f?format=ndjson"),
    ]
    poll(lambda: info(http, "f")["consumers"] == 3, "three consumers")
    r = http.post("/streams/f", content=small_frames(n) + encode_frame(EndFrame(n)))
    assert r.status_code == 200
    for reader in group:
        frames = reader.join()
        assert reader.seqs == list(range(n))
        assert frames[-1] in (EndFrame(n), {"kind": "end", "seq": n})
    st = info(http, "f")
    assert (st["state"], st["produced"], st["dropped"]) == ("ended", n, 0)
    assert st["consumed"] == 3 * n


def test_fanout_without_consumers_never_waits(server, http):
    """Nobody to hold it back: the producer goes on, the buffer keeps the newest
    `size` items (for /latest), and a consumer joins at the head."""
    assert http.put("/streams/nc", json={"size": 4, "mode": "fanout"}).status_code == 201
    r = http.post("/streams/nc", content=small_frames(100))
    assert r.json() == {"accepted": 100, "items": 100, "next_seq": 100, "duplicates": 0}
    st = info(http, "nc")
    assert (st["produced"], st["depth"], st["dropped"]) == (100, 4, 0)
    latest = FrameDecoder()
    latest.feed(http.get("/streams/nc/latest").content)
    assert next(latest.frames()).seq == 99

    with http.stream("GET", "/streams/nc?format=ndjson") as r:
        poll(lambda: info(http, "nc")["consumers"] == 1, "the consumer")
        body = small_frames(2, start=100) + encode_frame(EndFrame(102))
        assert http.post("/streams/nc", content=body).status_code == 200
        lines = [json.loads(line) for line in r.iter_lines()]
    assert [line.get("seq") for line in lines] == [100, 101, 102]
    assert lines[-1] == {"kind": "end", "seq": 102}


def _publish_big(server: Any, name: str, n: int = MANY, **spec: Any) -> None:
    server.relay.publish(name, (big_item(i) for i in range(n)), mode="fanout", **spec)


def _check_big(reader: Reader, n: int = MANY) -> list[int]:
    """The reader's items carry their own seq; all ends well. Their seqs."""
    frames = reader.frames
    assert frames[-1] == EndFrame(n)
    for f in frames[:-1]:
        assert isinstance(f, DataFrame)
        assert big_seq(f.data) == f.seq
    return reader.seqs


def test_fanout_block_slow_consumer_holds_the_producer(server, http, readers):
    size = 4
    assert http.put("/streams/b", json={"size": size, "mode": "fanout"}).status_code == 201
    fast = open_reader(readers, server, "/streams/b")
    slow = open_reader(readers, server, "/streams/b", rcvbuf=16384, paused=True)
    poll(lambda: info(http, "b")["consumers"] == 2, "two consumers")
    _publish_big(server, "b", size=size)

    held = settle(http, "b", "produced")
    assert held < MANY, "the producer did not wait for the slow consumer"
    st = info(http, "b")
    assert st["state"] == "open"
    assert st["depth"] <= size
    assert st["dropped"] == 0
    # the fast one is not starved: it has everything produced but what is buffered
    poll(lambda: len(fast.seqs) >= held - size, "the fast consumer to catch up")

    slow.resume()  # the producer goes on, and nobody lost anything
    for reader in (fast, slow):
        reader.join()
        assert _check_big(reader) == list(range(MANY))
    st = info(http, "b")
    assert (st["state"], st["produced"], st["dropped"]) == ("ended", MANY, 0)


def test_fanout_block_never_evicts_what_a_block_consumer_needs(server, http, readers):
    """An item that needs several older ones evicted (max_bytes) must wait while a
    `block` consumer still needs any of them, not just the oldest."""
    mib = 1 << 20
    spec = {"size": 1000, "max_bytes": 32 * mib, "mode": "fanout"}
    assert http.put("/streams/e", json=spec).status_code == 201
    slow = open_reader(readers, server, "/streams/e", rcvbuf=16384, paused=True)
    poll(lambda: info(http, "e")["consumers"] == 1, "the consumer")

    def items() -> Iterator[np.ndarray]:
        for i in range(32):  # 32 MiB: exactly fills the buffer
            yield np.full(mib, i % 251, np.uint8)
        yield np.full(24 * mib, 32, np.uint8)  # needs 24 of them evicted
        for i in range(33, 40):
            yield np.full(mib, i, np.uint8)

    server.relay.publish("e", items(), **spec)
    # the slow consumer has taken at most a few MiB: the 24 MiB item must wait
    poll(lambda: info(http, "e")["produced"] >= 32, "the buffer to fill")
    st = info(http, "e")
    assert st["bytes"] <= spec["max_bytes"]
    assert st["depth"] <= spec["size"]

    slow.resume()
    frames = slow.join()
    assert frames[-1] == EndFrame(40)
    assert slow.seqs == list(range(40)), "a block consumer lost items"
    for f in frames[:-1]:
        assert int(f.data[0]) == (f.seq % 251 if f.seq < 32 else f.seq)
    assert info(http, "e")["dropped"] == 0


def test_fanout_drop_oldest_slow_consumer_sees_gaps(server, http, readers):
    size = 4
    assert http.put("/streams/d", json={"size": size, "mode": "fanout"}).status_code == 201
    fast = open_reader(readers, server, "/streams/d")
    slow = open_reader(readers, server, "/streams/d?policy=drop_oldest", rcvbuf=16384, paused=True)
    poll(lambda: info(http, "d")["consumers"] == 2, "two consumers")
    _publish_big(server, "d", size=size)

    # the slow consumer does not hold the producer back: the stream ends
    poll(lambda: info(http, "d")["state"] == "ended", "the producer to finish")
    fast.join()
    assert _check_big(fast) == list(range(MANY)), "a block consumer was affected"

    slow.resume()
    slow.join()
    seqs = _check_big(slow)
    assert seqs == sorted(set(seqs)), "items out of order or repeated"
    assert len(seqs) < MANY
    gaps = [b - a for a, b in zip(seqs, seqs[1:], strict=False) if b - a > 1]
    assert gaps, "drops must show as gaps in seq"
    st = info(http, "d")
    assert st["dropped"] >= MANY - len(seqs) > 0
    assert metric(http, "ndrelay_stream_dropped_total", "d") == st["dropped"]


def test_fanout_latest_consumer_gets_the_newest(server, http, readers):
    size = 4
    assert http.put("/streams/l", json={"size": size, "mode": "fanout"}).status_code == 201
    sleeper = open_reader(readers, server, "/streams/l?policy=latest", rcvbuf=16384, paused=True)
    poll(lambda: info(http, "l")["consumers"] == 1, "the consumer")
    _publish_big(server, "l", size=size)
    poll(lambda: info(http, "l")["state"] == "ended", "the producer to finish")

    sleeper.resume()  # it wakes up: what was in flight, then only the newest
    sleeper.join()
    seqs = _check_big(sleeper)
    assert seqs == sorted(set(seqs))
    assert seqs[-1] == MANY - 1
    # it joined before seq 0: whatever it got in flight, the newest comes after a gap
    before = seqs[-2] if len(seqs) > 1 else -1
    assert before < MANY - 2, "the newest item must come right after the gap"
    assert info(http, "l")["dropped"] > 0


def test_latest_policy_on_a_buffered_backlog(server, http):
    """Without any network buffering in the way: a `latest` consumer that asks when
    several items wait gets just the newest."""
    assert http.put("/streams/lb", json={"size": 8, "mode": "fanout"}).status_code == 201
    with http.stream("GET", "/streams/lb?policy=latest&format=ndjson") as r:
        poll(lambda: info(http, "lb")["consumers"] == 1, "the consumer")
        # one upload: every item is in the buffer before the consumer's next turn,
        # or it sees the items as they come; either way it ends with the newest
        body = small_frames(6) + encode_frame(EndFrame(6))
        assert http.post("/streams/lb", content=body).status_code == 200
        lines = [json.loads(line) for line in r.iter_lines()]
    seqs = [line["seq"] for line in lines if line["kind"] == "data"]
    assert seqs[-1] == 5
    assert seqs == sorted(set(seqs))
    assert lines[-1] == {"kind": "end", "seq": 6}
    assert info(http, "lb")["dropped"] == 6 - len(seqs)


# -- bounded buffers -------------------------------------------------------------------------


def _upload_in_thread(url: str, name: str, body: bytes) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def run() -> None:
        try:
            with httpx.Client(base_url=url, timeout=WAIT) as client:
                result.append(client.post(f"/streams/{name}", content=body))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, name=f"upload {name}", daemon=True)
    thread.start()
    return thread, result


def _drain_watching(
    http: httpx.Client, name: str, check: Callable[[dict[str, Any]], None]
) -> list[Frame]:
    """Read the whole stream slowly, checking its info after every chunk."""
    frames: list[Frame] = []
    decoder = FrameDecoder()
    with http.stream("GET", f"/streams/{name}") as r:
        for chunk in r.iter_raw(64):
            decoder.feed(chunk)
            frames.extend(decoder.frames())
            check(info(http, name))
    decoder.feed_eof()
    return frames


def test_bounded_in_items(server, http):
    size, n = 5, 60
    assert http.put("/streams/bi", json={"size": size}).status_code == 201
    thread, result = _upload_in_thread(
        server.url, "bi", small_frames(n) + encode_frame(EndFrame(n))
    )
    try:
        # no consumer: the upload is held with the buffer full
        poll(lambda: info(http, "bi")["producers"] == 1, "the upload")
        assert settle(http, "bi", "produced") == size
        st = info(http, "bi")
        assert (st["depth"], st["producers"], st["state"]) == (size, 1, "open")
        assert not result

        def check(st: dict[str, Any]) -> None:
            assert st["depth"] <= size, st

        frames = _drain_watching(http, "bi", check)
    finally:
        thread.join(WAIT)
    assert not thread.is_alive()
    assert result[0].status_code == 200
    assert result[0].json() == {"accepted": n + 1, "items": n, "next_seq": n, "duplicates": 0}
    assert [f.seq for f in frames if isinstance(f, DataFrame)] == list(range(n))
    assert frames[-1] == EndFrame(n)


def test_bounded_in_bytes(server, http):
    max_bytes, n = 3500, 12  # three 1000-byte items fit, a fourth does not
    assert http.put("/streams/bb", json={"size": 1000, "max_bytes": max_bytes}).status_code == 201
    body = b"".join(encode_frame(DataFrame(i, bytes([i]) * 1000)) for i in range(n))
    thread, result = _upload_in_thread(server.url, "bb", body + encode_frame(EndFrame(n)))
    try:
        poll(lambda: info(http, "bb")["producers"] == 1, "the upload")
        assert settle(http, "bb", "produced") == 3
        st = info(http, "bb")
        assert (st["depth"], st["bytes"]) == (3, 3000)

        def check(st: dict[str, Any]) -> None:
            assert st["bytes"] <= max_bytes, st

        frames = _drain_watching(http, "bb", check)
    finally:
        thread.join(WAIT)
    assert not thread.is_alive()
    assert result[0].status_code == 200
    items = [f for f in frames if isinstance(f, DataFrame)]
    assert [f.data for f in items] == [bytes([i]) * 1000 for i in range(n)]


def test_item_larger_than_max_bytes_still_goes_through(server, http):
    """At least one item always fits: a frame over `max_bytes` is not a deadlock."""
    assert http.put("/streams/one", json={"max_bytes": 100}).status_code == 201
    body = encode_frame(DataFrame(0, b"x" * 1000)) + encode_frame(DataFrame(1, b"y" * 1000))
    thread, result = _upload_in_thread(server.url, "one", body + encode_frame(EndFrame(2)))
    try:
        assert settle(http, "one", "produced") == 1
        frames = _drain_watching(http, "one", lambda st: None)
    finally:
        thread.join(WAIT)
    assert result[0].status_code == 200
    assert [f.data for f in frames if isinstance(f, DataFrame)] == [b"x" * 1000, b"y" * 1000]


def test_fanout_bounded_while_producer_pushes(server, http, readers):
    size = 6
    assert http.put("/streams/fb", json={"size": size, "mode": "fanout"}).status_code == 201
    slow = open_reader(readers, server, "/streams/fb", rcvbuf=16384, paused=True)
    poll(lambda: info(http, "fb")["consumers"] == 1, "the consumer")
    _publish_big(server, "fb", size=size)
    settle(http, "fb", "produced")
    slow.resume()
    while slow.thread.is_alive():  # sample the info while the producer pushes
        st = info(http, "fb")
        assert st["depth"] <= size, st
        assert st["bytes"] <= size * BIG, st
        slow.thread.join(0.01)
    slow.join()
    assert _check_big(slow) == list(range(MANY))


# -- consumers going away ----------------------------------------------------------------------


def test_idle_consumer_disconnect_releases_its_slot(server, http):
    """Nothing is being written to it (heartbeats every 15 s): the server must notice
    the disconnect by itself."""
    for mode in ("queue", "fanout"):
        name = f"idle-{mode}"
        assert http.put(f"/streams/{name}", json={"mode": mode}).status_code == 201
        with httpx.Client(base_url=server.url, timeout=WAIT) as other:
            with other.stream("GET", f"/streams/{name}") as r:
                assert r.status_code == 200
                poll(lambda: info(http, name)["consumers"] == 1, "the consumer")  # noqa: B023
        poll(lambda: info(http, name)["consumers"] == 0, "the slot", deadline=3)  # noqa: B023


def test_consumer_disconnect_mid_stream(server, http, readers):
    """A fanout `block` consumer that leaves stops holding the producer at once; the
    other consumer is unaffected."""
    size = 4
    assert http.put("/streams/cd", json={"size": size, "mode": "fanout"}).status_code == 201
    stay = open_reader(readers, server, "/streams/cd")
    leave = open_reader(readers, server, "/streams/cd", rcvbuf=16384, paused=True)
    poll(lambda: info(http, "cd")["consumers"] == 2, "two consumers")
    _publish_big(server, "cd", size=size)
    assert settle(http, "cd", "produced") < MANY  # held by `leave`

    leave.close()  # the client goes away mid-stream
    poll(lambda: info(http, "cd")["consumers"] == 1, "the slot", deadline=3)
    poll(lambda: info(http, "cd")["state"] == "ended", "the producer to go on")
    stay.join()
    assert _check_big(stay) == list(range(MANY))
    st = info(http, "cd")
    assert (st["consumers"], st["dropped"]) == (0, 0)


def test_queue_consumer_disconnect_leaves_items_to_others(server, http):
    """In queue mode a consumer that leaves before taking anything takes nothing with it."""
    assert http.put("/streams/qd", json={"size": 8}).status_code == 201
    with httpx.Client(base_url=server.url, timeout=WAIT) as other:
        with other.stream("GET", "/streams/qd") as r:
            assert r.status_code == 200
            poll(lambda: info(http, "qd")["consumers"] == 1, "the consumer")
    poll(lambda: info(http, "qd")["consumers"] == 0, "the slot", deadline=3)
    assert http.post("/streams/qd", content=small_frames(5) + encode_frame(EndFrame(5))).is_success
    r = http.get("/streams/qd")
    decoder = FrameDecoder()
    decoder.feed(r.content)
    frames = list(decoder.frames())
    assert [f.seq for f in frames if isinstance(f, DataFrame)] == list(range(5))
    assert frames[-1] == EndFrame(5)
