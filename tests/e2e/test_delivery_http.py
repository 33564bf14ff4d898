"""Delivery guarantees over plain HTTP (DESIGN.md §5), against a real uvicorn on 127.0.0.1:
consumer ids, pending items and acknowledgements, release, leases, resume with `after=`,
uploads without `seq`, idempotent uploads with `?producer=`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import msgpack
import numpy as np
import pytest

from ndrelay import DataFrame, EndFrame, ErrorFrame, FrameDecoder, encode_frame

pytestmark = [pytest.mark.e2e, pytest.mark.backends]


def frames_of(*items, end=True, seq=True):
    """An upload body: one data frame per int64 item (`seq` left out if not `seq`)."""
    out = b""
    for i, value in enumerate(items):
        if seq:
            out += encode_frame(DataFrame(i, np.array([value], np.int64)))
        else:
            a = np.array([value], np.int64)
            out += msgpack.packb(
                {"kind": "data", "dtype": a.dtype.str, "shape": [1], "data": a.tobytes()}
            )
    if end:
        out += msgpack.packb({"kind": "end"}) if not seq else encode_frame(EndFrame(len(items)))
    return out


class Reader:
    """A streaming GET read frame by frame in this thread; `close()` drops the connection."""

    def __init__(self, url: str, idle: float = 20, **params):
        self.client = httpx.Client(timeout=httpx.Timeout(10, read=idle))
        self.cm = self.client.stream("GET", url, params=params)
        self.response = self.cm.__enter__()
        self.decoder = FrameDecoder()
        self.chunks = self.response.iter_raw()
        self.consumer = self.response.headers.get("ndrelay-consumer")

    def frames(self, n, partial=False):
        """The next `n` frames (heartbeats skipped), data frames as (seq, value); with
        `partial`, fewer if nothing more comes within the reader's `idle` seconds."""
        out = []
        while len(out) < n:
            for frame in self.decoder.frames():
                if isinstance(frame, DataFrame):
                    out.append((frame.seq, int(frame.data[0])))
                elif isinstance(frame, EndFrame):
                    out.append("end")
                    return out
                elif isinstance(frame, ErrorFrame):
                    raise AssertionError(f"error frame: {frame.message}")
                if len(out) == n:
                    return out
            try:
                self.decoder.feed(next(self.chunks))
            except httpx.ReadTimeout:
                if partial:
                    return out
                raise
        return out

    def close(self):
        with contextlib.suppress(Exception):
            self.cm.__exit__(None, None, None)
        self.client.close()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=20) as client:
        yield client


def fill(http, name, n, size=64, end=True):
    assert http.put(f"/streams/{name}", json={"size": size}).status_code == 201
    r = http.post(f"/streams/{name}", content=frames_of(*range(n), end=end))
    assert r.status_code == 200, r.text


def ack(http, name, consumer, upto, release=None):
    body = {"consumer": consumer, "upto": upto}
    if release is not None:
        body["release"] = release
    return http.post(f"/streams/{name}/ack", json=body)


# -- consumer ids and acknowledgements -----------------------------------------------------


def test_anonymous_reader_gets_an_id_and_everything_then_the_end(server, http):
    fill(http, "q", 10)
    r = http.get("/streams/q", params={"format": "ndjson"})
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert r.headers["ndrelay-consumer"]
    assert [line["seq"] for line in lines[:-1]] == list(range(10))
    assert lines[-1]["kind"] == "end"
    info = http.get("/streams/q/info").json()
    assert info["pending"] == 0 and info["acked"] == 10


def test_named_consumer_items_stay_pending_until_acknowledged(server, http):
    fill(http, "q", 5)
    reader = Reader(f"{server.url}/streams/q", consumer="w1")
    try:
        assert reader.consumer == "w1"
        assert reader.frames(5) == [(i, i) for i in range(5)]
        info = http.get("/streams/q/info").json()
        assert (info["pending"], info["depth"]) == (5, 0)
        r = ack(http, "q", "w1", 2)
        assert r.status_code == 200
        assert r.json() == {"acked": 3, "released": 0, "pending": 2, "acks": 1}
        assert http.get("/streams/q/info").json()["pending"] == 2
        assert ack(http, "q", "w1", 2).json()["acked"] == 0  # a repeated ack is harmless
        assert reader.frames(1) == ["end"]  # its own pending items do not hold the end
        assert ack(http, "q", "w1", 4).json()["acked"] == 2
        assert http.get("/streams/q/info").json()["pending"] == 0
    finally:
        reader.close()


def test_ack_of_unknown_consumer_is_404_and_of_undelivered_seq_409(server, http):
    fill(http, "q", 6)
    a = Reader(f"{server.url}/streams/q", consumer="a")
    try:
        got = a.frames(6)
        assert len(got) == 6
        r = ack(http, "q", "nobody", 0)
        assert r.status_code == 404
        assert r.json()["error"] == "ConsumerNotFound" and r.json()["consumer"] == "nobody"
        r = ack(http, "no-such-stream", "a", 0)
        assert r.status_code == 404 and r.json()["error"] == "StreamNotFound"
        r = ack(http, "q", "a", 99)
        assert r.status_code == 409
        assert r.json()["error"] == "AckConflict" and r.json()["seq"] == 99
        assert "99" in r.json()["message"]
        bad = http.post("/streams/q/ack", json={"consumer": "a", "upto": "x"})
        assert bad.status_code == 400 and "upto" in bad.json()["message"]
        bad = http.post("/streams/q/ack", json={"consumer": "a", "up_to": 1})
        assert bad.status_code == 400 and "up_to" in bad.json()["message"]
        assert http.post("/streams/nope/ack", json={"consumer": "a", "upto": 1}).status_code == 404
    finally:
        a.close()


def test_seq_delivered_to_another_consumer_is_409(server, http):
    fill(http, "q", 4, size=4, end=False)
    a = Reader(f"{server.url}/streams/q", consumer="a")
    try:
        assert a.frames(4) == [(i, i) for i in range(4)]
        b = Reader(f"{server.url}/streams/q", consumer="b")
        try:
            r = ack(http, "q", "b", 1)
            assert r.status_code == 409
        finally:
            b.close()
    finally:
        a.close()


def test_release_gives_the_rest_back_at_once_in_seq_order(server, http):
    fill(http, "q", 8)
    a = Reader(f"{server.url}/streams/q", consumer="a")
    try:
        assert len(a.frames(8)) == 8
        r = ack(http, "q", "a", 2, release=True)
        assert r.json() == {"acked": 3, "released": 5, "pending": 0, "acks": 1}
    finally:
        a.close()
    b = Reader(f"{server.url}/streams/q", consumer="b")
    try:
        assert b.frames(5) == [(i, i) for i in range(3, 8)]
        assert ack(http, "q", "b", 7).status_code == 200
        assert b.frames(1) == ["end"]
    finally:
        b.close()
    # the released consumer is gone
    r = ack(http, "q", "a", 2)
    assert r.status_code == 404 and r.json()["error"] == "ConsumerNotFound"


def test_acks_stream_as_ndjson_lines_in_one_request(server, http):
    fill(http, "q", 6)
    a = Reader(f"{server.url}/streams/q", consumer="a")
    try:
        a.frames(6)
        body = "".join(json.dumps({"consumer": "a", "upto": s}) + "\n" for s in (0, 2, 5))
        r = http.post(
            "/streams/q/ack", content=body, headers={"content-type": "application/x-ndjson"}
        )
        assert r.json() == {"acked": 6, "released": 0, "pending": 0, "acks": 3}
    finally:
        a.close()


def test_fanout_stream_has_nothing_to_acknowledge(server, http):
    assert http.put("/streams/f", json={"size": 8, "mode": "fanout"}).status_code == 201
    a = Reader(f"{server.url}/streams/f", consumer="a")
    try:
        r = ack(http, "f", "a", 0)
        assert r.status_code == 409 and "after" in r.json()["message"]
    finally:
        a.close()


# -- leases and reconnects ---------------------------------------------------------------


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_departed_consumers_items_return_after_its_lease(server, http):
    fill(http, "q", 6)
    a = Reader(f"{server.url}/streams/q", consumer="a", lease="0.5")
    assert len(a.frames(6)) == 6
    assert ack(http, "q", "a", 1).status_code == 200
    a.close()  # gone without acknowledging 2..5 nor releasing
    wait_for(lambda: http.get("/streams/q/info").json()["consumers"] == 0)
    b = Reader(f"{server.url}/streams/q", consumer="b")
    try:
        assert b.frames(4) == [(i, i) for i in range(2, 6)]  # after the lease, in seq order
        assert ack(http, "q", "b", 5).status_code == 200
        assert b.frames(1) == ["end"]
    finally:
        b.close()


def test_reconnect_within_the_lease_gets_its_own_items_first(server, http):
    fill(http, "q", 10, end=False)
    a = Reader(f"{server.url}/streams/q", consumer="a", lease="30")
    got = a.frames(10)
    assert got == [(i, i) for i in range(10)]
    assert ack(http, "q", "a", 3).status_code == 200
    a.close()
    wait_for(lambda: http.get("/streams/q/info").json()["consumers"] == 0)
    other = Reader(f"{server.url}/streams/q", consumer="other")
    try:
        http.post("/streams/q", content=frames_of(100, 101, end=False))
        assert other.frames(2) == [(10, 100), (11, 101)]  # new items only: 4..9 wait for a
        # back with after=6: it had up to 6, so 7, 8, 9 come first
        a2 = Reader(f"{server.url}/streams/q", consumer="a", after="6")
        try:
            assert a2.frames(3) == [(7, 7), (8, 8), (9, 9)]
            assert ack(http, "q", "a", 9).json()["acked"] == 6
        finally:
            a2.close()
    finally:
        other.close()


def test_reconnect_without_after_gets_everything_pending_again(server, http):
    fill(http, "q", 4, end=False)
    a = Reader(f"{server.url}/streams/q", consumer="a")
    assert len(a.frames(4)) == 4
    a.close()
    wait_for(lambda: http.get("/streams/q/info").json()["consumers"] == 0)
    a2 = Reader(f"{server.url}/streams/q", consumer="a")
    try:
        assert a2.frames(4) == [(i, i) for i in range(4)]
        assert http.get("/streams/q/info").json()["redelivered"] == 4
    finally:
        a2.close()


def test_a_newer_connection_of_the_same_id_takes_over(server, http):
    fill(http, "q", 3, end=False)
    a = Reader(f"{server.url}/streams/q", consumer="a")
    try:
        assert len(a.frames(3)) == 3
        a2 = Reader(f"{server.url}/streams/q", consumer="a", after="0")
        try:
            assert a2.frames(2) == [(1, 1), (2, 2)]
            # the old connection is told, by a relay error frame, and ends
            frame = None
            deadline = time.monotonic() + 20
            while frame is None and time.monotonic() < deadline:
                for f in a.decoder.frames():
                    frame = f
                if frame is None:
                    a.decoder.feed(next(a.chunks))
            assert frame is not None and frame.origin == "relay"
        finally:
            a2.close()
    finally:
        a.close()


def test_an_ack_racing_the_lease_counts_once(server, http):
    """Either the ack wins (acknowledged, never redelivered) or the lease does (404, the
    consumer is gone and its items redelivered): never both, never neither."""
    for attempt in range(6):
        name = f"race{attempt}"
        fill(http, name, 5)
        a = Reader(f"{server.url}/streams/{name}", consumer="a", lease=str(0.05 * attempt))
        assert len(a.frames(5)) == 5
        a.close()
        r = ack(http, name, "a", 4)
        b = Reader(f"{server.url}/streams/{name}", consumer="b")
        try:
            if r.status_code == 200:
                assert r.json()["acked"] == 5
                assert b.frames(1) == ["end"]
            else:
                assert r.status_code == 404 and r.json()["error"] == "ConsumerNotFound"
                assert b.frames(5) == [(i, i) for i in range(5)]
                assert ack(http, name, "b", 4).status_code == 200
                assert b.frames(1) == ["end"]
        finally:
            b.close()
        info = http.get(f"/streams/{name}/info").json()
        assert info["acked"] == 5 and info["pending"] == 0 and info["depth"] == 0


def test_three_workers_with_early_exits_share_every_item_exactly_once(server, http):
    import random

    rng = random.Random(7)
    n = 300
    assert http.put("/streams/work", json={"size": 32}).status_code == 201
    seen: list[int] = []
    done = threading.Event()

    def producer():
        body = b"".join(
            encode_frame(DataFrame(0, np.array([v], np.int64))) for v in range(n)
        ) + encode_frame(EndFrame(0))
        with httpx.Client(base_url=server.url, timeout=60) as http2:
            assert http2.post("/streams/work", content=body).status_code == 200
        done.set()

    threading.Thread(target=producer, daemon=True).start()
    worker = 0
    finished = False
    while not finished:
        worker += 1
        cid = f"w{worker % 3}"
        r = Reader(f"{server.url}/streams/work", idle=1.0, consumer=cid)
        try:
            take = rng.randint(1, 60)
            got = r.frames(take, partial=True)
            items = [g for g in got if g != "end"]
            keep = items[: rng.randint(0, len(items))]
            # done once a worker saw the end and gave nothing back
            finished = "end" in got and len(keep) == len(items)
            seen += [v for _, v in keep]
            # ack what it kept, give back the rest
            upto = keep[-1][0] if keep else -1
            if items:
                assert ack(http, "work", cid, upto, release=True).status_code == 200
            elif not finished:
                assert ack(http, "work", cid, None, release=True).status_code in (200, 404)
        finally:
            r.close()
        assert worker < 2000
    assert done.wait(30)
    assert sorted(seen) == list(range(n))


# -- fanout resume -------------------------------------------------------------------------


def test_fanout_after_replays_and_shows_the_gap(server, http):
    assert http.put("/streams/f", json={"size": 4, "mode": "fanout"}).status_code == 201
    http.post("/streams/f", content=frames_of(*range(10), end=False))  # keeps 6..9
    r = Reader(f"{server.url}/streams/f", after="7")
    try:
        assert r.frames(2) == [(8, 8), (9, 9)]
    finally:
        r.close()
    r = Reader(f"{server.url}/streams/f", after="2", policy="drop_oldest")
    try:
        assert r.frames(4) == [(6, 6), (7, 7), (8, 8), (9, 9)]  # 3, 4, 5 were dropped
    finally:
        r.close()
    assert http.get("/streams/f/info").json()["dropped"] >= 3


# -- uploads -----------------------------------------------------------------------------


def test_upload_without_seq_is_accepted(server, http):
    r = http.post("/streams/noseq", content=frames_of(5, 6, 7, seq=False))
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 4, "items": 3, "next_seq": 3, "duplicates": 0}
    lines = http.get("/streams/noseq", params={"format": "ndjson"}).text.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [0, 1, 2, 3]
    assert [json.loads(line)["data"] for line in lines[:3]] == [[5], [6], [7]]


def test_producer_retries_are_idempotent(server, http):
    assert http.put("/streams/p", json={"size": 64}).status_code == 201
    first = http.post(
        "/streams/p", params={"producer": "cam"}, content=frames_of(0, 1, 2, end=False)
    )
    assert first.json()["expected_seq"] == 3 and first.json()["duplicates"] == 0
    # the retry re-sends 1 and 2 (already in), then 3 and 4
    body = b"".join(encode_frame(DataFrame(s, np.array([s], np.int64))) for s in range(1, 5))
    again = http.post("/streams/p", params={"producer": "cam"}, content=body)
    assert again.status_code == 200
    answer = again.json()
    assert answer["duplicates"] == 2 and answer["items"] == 2 and answer["expected_seq"] == 5
    # a gap: seq 7 when 5 is expected
    gap = http.post(
        "/streams/p",
        params={"producer": "cam"},
        content=encode_frame(DataFrame(7, np.array([7], np.int64))),
    )
    assert gap.status_code == 409
    assert gap.json()["expected_seq"] == 5 and "5" in gap.json()["message"]
    # where do I stand: an empty body
    assert http.post("/streams/p", params={"producer": "cam"}).json()["expected_seq"] == 5
    # another producer has its own numbering
    other = http.post("/streams/p", params={"producer": "lidar"}, content=frames_of(0, end=False))
    assert other.json()["expected_seq"] == 1 and other.json()["items"] == 1
    info = http.get("/streams/p/info").json()
    assert info["produced"] == 6  # 0..4 of cam, 0 of lidar: nothing twice


def _read_values(url: str, name: str, into: list[int]) -> None:
    """Read a stream of one-value arrays to its end, into `into` (a reader thread)."""
    with contextlib.suppress(httpx.HTTPError):  # (cut at teardown if the test failed)
        text = httpx.get(f"{url}/streams/{name}", params={"format": "ndjson"}, timeout=60).text
        frames = [json.loads(line) for line in text.splitlines()]
        into.extend(f["data"][0] for f in frames if f["kind"] == "data")


def test_a_long_producer_upload_into_a_small_stream_keeps_its_numbering(server, http):
    """Thousands of small frames in one body (offered to the stream in pieces while a
    reader makes room): duplicates skipped and a gap refused at the right frame, however
    the body is cut into pieces."""
    assert http.put("/streams/long", json={"size": 100}).status_code == 201
    got: list[int] = []
    reader = threading.Thread(target=_read_values, args=(server.url, "long", got))
    reader.start()

    def body(seqs):
        return b"".join(encode_frame(DataFrame(s, np.array([s], np.int64))) for s in seqs)

    first = http.post("/streams/long", params={"producer": "imu"}, content=body(range(1500)))
    assert first.json()["expected_seq"] == 1500, first.text
    # a retry from 1000 on, then a gap at frame 2600 (seq 3100 where 3000 is expected)
    seqs = [*range(1000, 3000), *range(3100, 3200)]
    again = http.post("/streams/long", params={"producer": "imu"}, content=body(seqs))
    assert again.status_code == 409, again.text
    answer = again.json()
    assert answer["frame_index"] == 2000 and answer["expected_seq"] == 3000
    assert answer["duplicates"] == 500 and answer["accepted"] == 2000
    end = http.post("/streams/long", content=encode_frame(EndFrame(seq=0)))
    assert end.status_code == 200, end.text
    reader.join(60)
    assert got == list(range(3000))


def test_a_batched_producer_upload_into_a_small_stream_keeps_its_numbering(server, http):
    """Frames of 10 rows into a 25-item stream, a retry that starts inside a frame the
    relay already has part of, then a gap: every row once, in order, the gap named."""
    assert http.put("/streams/rows", json={"size": 25}).status_code == 201
    got: list[int] = []
    reader = threading.Thread(target=_read_values, args=(server.url, "rows", got))
    reader.start()

    def body(firsts):
        return b"".join(
            encode_frame(DataFrame(f, np.arange(f, f + 10, dtype=np.int64).reshape(10, 1), 10))
            for f in firsts
        )

    params = {"producer": "lidar"}
    first = http.post("/streams/rows", params=params, content=body(range(0, 300, 10)))
    assert first.json()["expected_seq"] == 300, first.text
    # from 295 (inside the last frame sent), then a gap: 700 where 605 is expected
    again = http.post("/streams/rows", params=params, content=body([*range(295, 600, 10), 700]))
    assert again.status_code == 409, again.text
    answer = again.json()
    assert answer["expected_seq"] == 605 and answer["frame_index"] == 31
    assert answer["duplicates"] == 5
    end = http.post("/streams/rows", content=encode_frame(EndFrame(seq=0)))
    assert end.status_code == 200, end.text
    reader.join(60)
    assert got == list(range(605))


def test_producer_end_frame_retry_says_where_it_stands(server, http):
    r = http.post("/streams/pe", params={"producer": "x"}, content=frames_of(0, 1))
    assert r.status_code == 200
    again = http.post("/streams/pe", params={"producer": "x"}, content=frames_of(0, 1))
    assert again.status_code == 409
    assert again.json()["expected_seq"] == 2 and again.json()["error"] == "StreamClosed"


def test_bad_producer_and_consumer_ids_are_422(server, http):
    assert http.put("/streams/x", json={"size": 4}).status_code == 201
    assert http.post("/streams/x", params={"producer": "a b"}).status_code == 422
    assert http.get("/streams/x", params={"consumer": "x" * 65}).status_code == 422
    assert http.get("/streams/x", params={"lease": "-1"}).status_code == 422
