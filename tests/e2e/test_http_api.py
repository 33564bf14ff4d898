"""The HTTP API of DESIGN.md §3 through a real server, with plain httpx calls.

Every endpoint and status code, uploads (good, bad, truncated, oversize, cut off by
the client), the consumer formats and headers, heartbeats, sticky terminal frames and
auth. Bodies are decoded with `ndrelay.FrameDecoder` or `msgpack.Unpacker`, never
with the client library, so these tests pin the wire contract itself.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from _sources import poll

from ndrelay import (
    DataFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    FrameDecoder,
    HeartbeatFrame,
    RelayClient,
    RemoteError,
    encode_frame,
)
from ndrelay.registry import StreamSpec

pytestmark = [pytest.mark.e2e, pytest.mark.backends]

#: Upper bound of every network call and polling loop: nothing should come close.
WAIT = 10.0


# -- helpers ------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def arr(i: int, shape: tuple[int, ...] = (2, 3), dtype: Any = np.float32) -> np.ndarray:
    return np.full(shape, i, dtype=dtype)


def data(seq: int, item: Any, count: int | None = None) -> bytes:
    return encode_frame(DataFrame(seq, item, count))


def end(seq: int) -> bytes:
    return encode_frame(EndFrame(seq))


def decode(body: bytes) -> list[Frame]:
    """Every frame of a response body, which must not end inside a frame."""
    decoder = FrameDecoder()
    decoder.feed(body)
    frames = list(decoder.frames())
    decoder.feed_eof()
    return frames


def data_frames(frames: list[Frame]) -> list[DataFrame]:
    return [f for f in frames if isinstance(f, DataFrame)]


@pytest.fixture
def http(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=WAIT) as client:
        yield client


def info(http: httpx.Client, name: str) -> dict[str, Any]:
    r = http.get(f"/streams/{name}/info")
    assert r.status_code == 200, r.text
    return r.json()


def upload(http: httpx.Client, name: str, *frames: bytes) -> httpx.Response:
    return http.post(
        f"/streams/{name}",
        content=b"".join(frames),
        headers={"content-type": "application/x-msgpack"},
    )


def read_all(http: httpx.Client, name: str, **params: Any) -> list[Frame]:
    """GET a stream that has finished (or will) and decode its whole body."""
    r = http.get(f"/streams/{name}", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-msgpack"
    return decode(r.content)


# -- service endpoints ---------------------------------------------------------------------


def test_healthz(http):
    r = http.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_streams_lists_infos(http):
    assert http.get("/streams").json() == []
    assert http.put("/streams/a", json={"size": 4}).status_code == 201
    assert http.put("/streams/b", json={"size": 8, "mode": "fanout"}).status_code == 201
    listing = http.get("/streams").json()
    assert sorted(s["name"] for s in listing) == ["a", "b"]
    by_name = {s["name"]: s for s in listing}
    assert by_name["b"]["mode"] == "fanout" and by_name["b"]["size"] == 8
    assert by_name["a"] == info(http, "a")


def test_docs_and_openapi(http):
    r = http.get("/docs")
    assert r.status_code == 200
    assert "text/html" in r.headers["content-type"]
    spec = http.get("/openapi.json").json()
    description = spec["info"]["description"]
    for kind in ("data", "end", "error", "heartbeat"):
        assert f"`{kind}`" in description
    assert "msgpack" in description
    for path in ("/streams", "/streams/{name}", "/streams/{name}/info", "/metrics"):
        assert path in spec["paths"]


def test_metrics_has_per_stream_series(http):
    assert upload(http, "m1", data(0, arr(0)), data(1, arr(1)), data(2, arr(2))).status_code == 200
    assert http.put("/streams/m2", json={"mode": "fanout"}).status_code == 201
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text

    def series(metric: str, stream: str) -> float:
        pattern = rf'^{metric}\{{[^}}]*stream="{stream}"[^}}]*\}} (\S+)$'
        match = re.search(pattern, text, re.MULTILINE)
        assert match, f"no {metric} series for {stream!r} in:\n{text}"
        return float(match.group(1))

    assert series("ndrelay_stream_produced_total", "m1") == 3
    assert series("ndrelay_stream_depth", "m1") == 3
    assert series("ndrelay_stream_consumed_total", "m1") == 0
    assert series("ndrelay_stream_dropped_total", "m2") == 0
    assert series("ndrelay_stream_consumers", "m2") == 0
    assert re.search(r'stream="m2"[^}]*mode="fanout"|mode="fanout"[^}]*stream="m2"', text)


# -- create / info / delete -----------------------------------------------------------------


def test_create_identical_and_conflicting(http):
    spec = {"size": 16, "mode": "fanout", "dtype": "<f4", "shape": [2, 3]}
    r = http.put("/streams/s", json=spec)
    assert r.status_code == 201
    assert r.json()["name"] == "s"
    assert http.put("/streams/s", json=spec).status_code == 200
    r = http.put("/streams/s", json={**spec, "size": 17})
    assert r.status_code == 409
    assert "error" in r.json()
    assert http.put("/streams/s", json={**spec, "mode": "queue"}).status_code == 409
    assert info(http, "s")["size"] == 16


_INVALID_BODIES = [
    {"size": 0},
    {"size": "many"},
    {"mode": "broadcast"},
    {"max_bytes": 0},
    {"dtype": "O"},
    {"dtype": "not-a-dtype"},
    {"shape": [-1, 2]},
    [1, 2],
    {"max_byte": 1000},  # a misspelt key must not quietly leave the stream unbounded
    {"size": 4, "modes": "fanout"},
]


def test_create_invalid_body_422(http):
    for body in _INVALID_BODIES:
        r = http.put("/streams/s", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"] == "application/json"
    assert http.get("/streams").json() == []


def test_create_body_not_json_422(http):
    r = http.put("/streams/s", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_invalid_names_422(http):
    for name in ["-x", ".x", "_x", "x" * 129, "a%20b", "a%3Ab", "caf%C3%A9", "a%00"]:
        _check_invalid_name(http, name)
    assert http.get("/streams").json() == []


def _check_invalid_name(http: httpx.Client, name: str) -> None:
    for method, path in [
        ("PUT", f"/streams/{name}"),
        ("GET", f"/streams/{name}/info"),
        ("GET", f"/streams/{name}"),
        ("POST", f"/streams/{name}"),
        ("DELETE", f"/streams/{name}"),
    ]:
        kwargs: dict[str, Any] = {"json": {}} if method == "PUT" else {}
        if method == "POST":
            kwargs = {"content": end(0)}
        r = http.request(method, path, **kwargs)
        assert r.status_code == 422, (method, path, r.status_code, r.text)
        assert "name" in r.text


def test_valid_name_edges(http):
    for name in ["x" * 128, "0", "a.b_c-d", "Z9"]:
        assert http.put(f"/streams/{name}", json={}).status_code == 201, name
        assert info(http, name)["name"] == name


def test_info_fields_and_states(http):
    r = http.put("/streams/s", json={"size": 5, "max_bytes": 1000, "dtype": "<i2", "shape": [3]})
    assert r.status_code == 201
    first = info(http, "s")
    assert set(first) >= {
        "name",
        "mode",
        "size",
        "dtype",
        "shape",
        "state",
        "depth",
        "produced",
        "consumed",
        "dropped",
        "bytes",
        "producers",
        "consumers",
    }
    assert first["name"] == "s"
    assert first["mode"] == "queue"
    assert first["size"] == 5
    assert first["max_bytes"] == 1000
    assert first["dtype"] == "<i2"
    assert first["shape"] == [3]
    assert first["state"] == "open"
    assert (first["depth"], first["produced"], first["consumed"], first["bytes"]) == (0, 0, 0, 0)
    assert (first["producers"], first["consumers"]) == (0, 0)

    items = [np.arange(3, dtype="<i2") + i for i in range(3)]
    assert upload(http, "s", *(data(i, a) for i, a in enumerate(items))).status_code == 200
    now = info(http, "s")
    assert (now["depth"], now["produced"], now["bytes"], now["state"]) == (3, 3, 18, "open")

    with http.stream("GET", "/streams/s") as r:
        assert r.status_code == 200
        poll(lambda: info(http, "s")["consumers"] == 1, "one consumer")
        got: list[Frame] = []
        decoder = FrameDecoder()
        for chunk in r.iter_raw():
            decoder.feed(chunk)
            got.extend(decoder.frames())
            if len(data_frames(got)) == 3:
                break
    assert [f.seq for f in data_frames(got)] == [0, 1, 2]
    poll(lambda: info(http, "s")["consumers"] == 0, "the consumer to leave")
    now = info(http, "s")
    assert (now["depth"], now["consumed"], now["bytes"], now["state"]) == (0, 3, 0, "open")

    assert upload(http, "s", end(3)).status_code == 200
    assert info(http, "s")["state"] == "ended"

    assert upload(http, "f", data(0, b"x"), pack(_error_map(1))).status_code == 200
    assert info(http, "f")["state"] == "failed"


def test_unknown_stream_404(http):
    for method, path in [
        ("GET", "/streams/nope/info"),
        ("GET", "/streams/nope"),
        ("GET", "/streams/nope/latest"),
        ("DELETE", "/streams/nope"),
    ]:
        r = http.request(method, path)
        assert r.status_code == 404, (method, path)
        assert r.json()["error"] == "StreamNotFound"
        assert "nope" in r.json()["message"]


def test_delete_gives_consumers_a_relay_error(http):
    assert http.put("/streams/d", json={"mode": "fanout"}).status_code == 201
    with (
        http.stream("GET", "/streams/d") as r1,
        http.stream("GET", "/streams/d?format=ndjson") as r2,
    ):
        assert r1.status_code == r2.status_code == 200
        poll(lambda: info(http, "d")["consumers"] == 2, "two consumers")
        assert http.delete("/streams/d").status_code == 204
        frames = decode(r1.read())
        lines = [json.loads(line) for line in r2.read().splitlines()]
    assert len(frames) == 1
    (frame,) = frames
    assert isinstance(frame, ErrorFrame)
    assert frame.origin == "relay"
    assert frame.type and frame.message
    assert lines[-1]["kind"] == "error" and lines[-1]["origin"] == "relay"
    assert http.get("/streams/d/info").status_code == 404
    assert http.delete("/streams/d").status_code == 404
    assert http.get("/streams").json() == []


def test_delete_with_items_waiting(http):
    assert upload(http, "d", data(0, arr(0)), data(1, arr(1))).status_code == 200
    assert http.delete("/streams/d").status_code == 204
    # the name is free again: a new stream, from seq 0
    assert http.put("/streams/d", json={"size": 3}).status_code == 201
    assert info(http, "d")["produced"] == 0


def test_latest(http):
    assert http.put("/streams/l", json={"mode": "fanout"}).status_code == 201
    r = http.get("/streams/l/latest")
    assert r.status_code == 204
    assert r.content == b""
    assert upload(http, "l", *(data(i, arr(i)) for i in range(3))).status_code == 200
    for _ in range(2):  # not consumed by reading it
        r = http.get("/streams/l/latest")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-msgpack"
        (frame,) = decode(r.content)
        assert isinstance(frame, DataFrame)
        assert frame.seq == 2
        np.testing.assert_array_equal(frame.data, arr(2))
    r = http.get("/streams/l/latest", params={"format": "ndjson"})
    assert r.status_code == 200
    assert json.loads(r.text) == {
        "kind": "data",
        "seq": 2,
        "dtype": "<f4",
        "shape": [2, 3],
        "data": arr(2).tolist(),
    }
    assert info(http, "l")["consumed"] == 0


# -- uploads -------------------------------------------------------------------------------


def test_upload_appends_then_end_finishes(http):
    r = upload(http, "u", data(0, arr(0)), data(1, arr(1)))
    assert r.status_code == 200
    assert r.json() == {"accepted": 2, "items": 2, "next_seq": 2, "duplicates": 0}
    st = info(http, "u")
    assert (st["state"], st["produced"], st["mode"], st["size"]) == ("open", 2, "queue", 64)

    r = upload(http, "u", data(2, b"raw bytes"), data(3, arr(3)))
    assert r.json() == {"accepted": 2, "items": 2, "next_seq": 4, "duplicates": 0}
    r = upload(http, "u", end(4))
    assert r.status_code == 200
    assert r.json() == {"accepted": 1, "items": 0, "next_seq": 4, "duplicates": 0}
    assert info(http, "u")["state"] == "ended"

    r = upload(http, "u", data(4, arr(4)))
    assert r.status_code == 409
    assert info(http, "u")["produced"] == 4

    frames = read_all(http, "u")
    assert [f.seq for f in data_frames(frames)] == [0, 1, 2, 3]
    assert frames[2].data == b"raw bytes"
    np.testing.assert_array_equal(frames[3].data, arr(3))
    assert frames[-1] == EndFrame(4)


def test_upload_frames_after_end_in_same_body(http):
    r = upload(http, "u", data(0, arr(0)), end(1), data(1, arr(1)))
    assert r.status_code == 400
    body = r.json()
    assert body["frame_index"] == 2
    assert body["accepted"] == 2
    st = info(http, "u")
    assert (st["state"], st["produced"]) == ("ended", 1)


def test_upload_empty_body_leaves_no_stream_behind(http):
    r = upload(http, "e")
    assert r.status_code == 200
    assert r.json() == {"accepted": 0, "items": 0, "next_seq": 0, "duplicates": 0}
    assert http.get("/streams/e/info").status_code == 404  # PUT creates an empty stream


def test_empty_upload_to_an_existing_stream_keeps_it(http):
    assert http.put("/streams/e2", json={"size": 4}).status_code == 201
    assert upload(http, "e2").status_code == 200
    assert info(http, "e2")["state"] == "open"


def _error_map(seq: int) -> dict[str, Any]:
    return {
        "kind": "error",
        "seq": seq,
        "origin": "producer",
        "type": "ValueError",
        "message": "camera unplugged",
        "traceback": "Traceback (most recent call last):\n  ...\nValueError: camera unplugged\n",
    }


_GOOD = np.arange(6, dtype="<f4").reshape(2, 3)
_BAD_FRAMES = {
    "unknown-kind": (pack({"kind": "blob", "seq": 3, "data": b"x"}), "kind"),
    "no-kind": (pack({"seq": 3, "data": b"x"}), "kind"),
    "bad-dtype": (
        pack({"kind": "data", "seq": 3, "dtype": "<q9", "shape": [2], "data": b"\0" * 16}),
        "dtype",
    ),
    "object-dtype": (
        pack({"kind": "data", "seq": 3, "dtype": "|O", "shape": [1], "data": b"\0" * 8}),
        "dtype",
    ),
    "byte-length": (
        pack({"kind": "data", "seq": 3, "dtype": "<f4", "shape": [2, 3], "data": b"\0" * 20}),
        "data",
    ),
    "shape-not-list": (
        pack({"kind": "data", "seq": 3, "dtype": "<f4", "shape": 6, "data": b"\0" * 24}),
        "shape",
    ),
    "count-mismatch": (
        pack(
            {
                "kind": "data",
                "seq": 3,
                "dtype": "<f4",
                "shape": [2, 3],
                "count": 3,
                "data": b"\0" * 24,
            }
        ),
        "count",
    ),
    "data-not-bin": (pack({"kind": "data", "seq": 3, "data": "text"}), "data"),
    "seq-negative": (pack({"kind": "data", "seq": -1, "data": b"x"}), "seq"),
    "not-a-map": (pack([1, 2, 3]), None),
    "error-missing-type": (
        pack({"kind": "error", "seq": 3, "origin": "producer", "message": "m"}),
        "type",
    ),
}


def test_upload_bad_frame_in_the_middle(http):
    for case, (bad, key) in _BAD_FRAMES.items():
        _check_bad_frame(http, case, bad, key)


def _check_bad_frame(http: httpx.Client, name: str, bad: bytes, key: str | None) -> None:
    good = [data(i, _GOOD + i) for i in range(6)]
    body = [*good[:3], bad, *good[4:]]
    r = upload(http, name, *body)
    assert r.status_code == 400, (name, r.text)
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert answer["frame_index"] == 3
    assert answer["accepted"] == 3
    assert answer["next_seq"] == 3
    assert answer["reason"]
    assert "frame 3" in answer["message"]
    if key is not None:
        assert answer.get("key") == key, (name, answer)

    st = info(http, name)
    assert (st["state"], st["produced"], st["depth"]) == ("open", 3, 3)

    # the stream stays usable: a further upload appends, from seq 3
    r = upload(http, name, data(3, _GOOD + 3), end(4))
    assert r.status_code == 200
    assert r.json() == {"accepted": 2, "items": 1, "next_seq": 4, "duplicates": 0}
    frames = read_all(http, name)
    assert [f.seq for f in data_frames(frames)] == [0, 1, 2, 3]
    for f in data_frames(frames):
        np.testing.assert_array_equal(f.data, _GOOD + f.seq)
    assert frames[-1] == EndFrame(4)


def test_upload_malformed_msgpack(http):
    # 0xc1 is never used in msgpack
    r = upload(http, "b", data(0, b"a"), data(1, b"b"), b"\xc1\xc1\xc1")
    assert r.status_code == 400
    body = r.json()
    assert (body["frame_index"], body["accepted"]) == (2, 2)
    assert info(http, "b")["produced"] == 2


def test_upload_frame_over_limit_413(serve):
    server = serve(max_frame_bytes=1024)
    with httpx.Client(base_url=server.url, timeout=WAIT) as http:
        # 4 KiB: refused by msgpack's limits; 1 MiB: by the large-frame (spill) path
        for name, payload in [("small", 4096), ("large", 1 << 20)]:
            _check_too_large(http, name, payload)


def _check_too_large(http: httpx.Client, name: str, payload: int) -> None:
    r = upload(http, name, data(0, b"a" * 100), data(1, b"b" * 100), data(2, b"c" * payload))
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["frame_index"] == 2
    assert body["accepted"] == 2
    assert "1024" in body["reason"]
    st = info(http, name)
    assert (st["state"], st["produced"]) == ("open", 2)
    # frames up to the limit still go in
    assert upload(http, name, data(2, b"d" * 900)).status_code == 200
    assert info(http, name)["produced"] == 3


def test_upload_against_schema_422(http):
    spec = {"dtype": "<f4", "shape": [2, 3]}
    assert http.put("/streams/sc", json=spec).status_code == 201
    good = np.zeros((2, 3), "<f4")
    r = upload(
        http, "sc", data(0, good), data(1, b"bytes are not checked"), data(2, good.astype("<f8"))
    )
    assert r.status_code == 422, r.text
    body = r.json()
    assert (body["frame_index"], body["accepted"], body["next_seq"]) == (2, 2, 2)
    assert "<f8" in body["reason"] or "float64" in body["reason"]

    r = upload(http, "sc", data(2, np.zeros((3, 2), "<f4")))
    assert r.status_code == 422
    assert r.json()["frame_index"] == 0
    assert "(3, 2)" in r.json()["reason"]

    # a batched frame is checked item by item: rows of shape (2, 3) are fine
    r = upload(http, "sc", data(2, np.zeros((4, 2, 3), "<f4"), count=4))
    assert r.status_code == 200
    assert r.json()["items"] == 4
    st = info(http, "sc")
    assert (st["state"], st["produced"]) == ("open", 6)


def test_upload_truncated_body(http):
    whole = b"".join(data(i, arr(i)) for i in range(3))
    cut = data(3, arr(3))
    r = upload(http, "t", whole, cut[: len(cut) // 2])
    assert r.status_code == 400
    body = r.json()
    assert (body["frame_index"], body["accepted"], body["next_seq"]) == (3, 3, 3)
    assert "truncated" in body["reason"]
    st = info(http, "t")
    assert (st["state"], st["produced"]) == ("open", 3)


def test_upload_truncated_large_frame(http):
    big = np.arange(100_000, dtype="<f8")  # over the decoder's spill threshold
    cut = data(1, big)
    r = upload(http, "t", data(0, arr(0)), cut[: len(cut) - 1000])
    assert r.status_code == 400
    assert (r.json()["frame_index"], r.json()["accepted"]) == (1, 1)
    assert info(http, "t")["produced"] == 1


def test_upload_batched_frames(http):
    stacked = np.stack([arr(i) for i in range(5)])
    r = upload(http, "bt", data(0, stacked, count=5), data(5, arr(5)), end(6))
    assert r.status_code == 200
    assert r.json() == {"accepted": 3, "items": 6, "next_seq": 6, "duplicates": 0}
    frames = read_all(http, "bt")
    items = data_frames(frames)
    assert [f.seq for f in items] == list(range(6))
    assert all(f.count is None for f in items)
    for f in items:
        np.testing.assert_array_equal(f.data, arr(f.seq))
    assert frames[-1] == EndFrame(6)


def test_upload_error_frame_reaches_consumers(server, http):
    r = upload(http, "err", data(0, arr(0)), pack(_error_map(1)))
    assert r.status_code == 200
    assert r.json()["accepted"] == 2
    assert info(http, "err")["state"] == "failed"

    frames = read_all(http, "err")
    assert [f.seq for f in data_frames(frames)] == [0]
    error = frames[-1]
    assert isinstance(error, ErrorFrame)
    assert (error.origin, error.type, error.message) == (
        "producer",
        "ValueError",
        "camera unplugged",
    )
    assert "Traceback" in error.traceback

    assert upload(http, "err2", data(0, arr(0)), pack(_error_map(1))).status_code == 200
    with RelayClient(server.url, timeout=WAIT, read_timeout=WAIT) as client:
        got = []
        with pytest.raises(ValueError, match="camera unplugged") as caught:
            for item in client.stream("err2"):
                got.append(item)
    assert isinstance(caught.value, RemoteError)
    assert len(got) == 1
    assert upload(http, "err", data(1, arr(1))).status_code == 409


def test_upload_while_consumer_waits(server, http):
    """Items uploaded while a consumer is connected reach it as they come."""
    with http.stream("GET", "/streams/live?format=ndjson") as r:
        assert r.status_code == 404  # a consumer does not create streams
        r.read()
    assert http.put("/streams/live", json={}).status_code == 201
    with http.stream("GET", "/streams/live?format=ndjson") as r:
        lines = r.iter_lines()
        for i in range(3):
            assert upload(http, "live", data(i, arr(i, (2,), np.int32))).status_code == 200
            line = json.loads(next(lines))
            assert (line["seq"], line["data"]) == (i, [i, i])
        assert upload(http, "live", end(3)).status_code == 200
        assert json.loads(next(lines)) == {"kind": "end", "seq": 3}


def _chunked_head(port: int, name: str) -> bytes:
    return (
        f"POST /streams/{name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/x-msgpack\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()


def _chunk(body: bytes) -> bytes:
    return b"%x\r\n" % len(body) + body + b"\r\n"


def test_client_disconnect_mid_upload(server, http):
    for name, cut_inside_frame in [("mid-frame", True), ("frame-boundary", False)]:
        _check_disconnect(server, http, name, cut_inside_frame)


def _check_disconnect(server: Any, http: httpx.Client, name: str, cut_inside_frame: bool) -> None:
    frames = [data(i, arr(i)) for i in range(3)]

    def status() -> dict[str, Any] | None:
        r = http.get(f"/streams/{name}/info")
        return r.json() if r.status_code == 200 else None

    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        # a chunked upload that has sent two whole frames and is still going
        sock.sendall(_chunked_head(server.port, name) + _chunk(frames[0] + frames[1]))
        poll(
            lambda: (st := status()) and st["produced"] == 2 and st["producers"] == 1,
            "the first frames to be accepted",
        )
        if cut_inside_frame:
            sock.sendall(_chunk(frames[2][:10]))
        # ... and then the client goes away without finishing the body

    st = poll(lambda: (st := status()) and st["producers"] == 0 and st, "the upload to end")
    assert (st["state"], st["produced"], st["depth"]) == ("open", 2, 2), st

    # still consistent: later uploads append from seq 2, and every frame reads back
    r = upload(http, name, frames[2], end(3))
    assert r.status_code == 200
    assert r.json() == {"accepted": 2, "items": 1, "next_seq": 3, "duplicates": 0}
    got = read_all(http, name)
    assert [f.seq for f in data_frames(got)] == [0, 1, 2]
    for f in data_frames(got):
        np.testing.assert_array_equal(f.data, arr(f.seq))
    assert got[-1] == EndFrame(3)


def test_upload_waiting_on_a_full_stream_ends_when_its_client_leaves(server, http):
    assert http.put("/streams/full", json={"size": 2}).status_code == 201
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        # five frames for a buffer of two: the upload waits for room
        sock.sendall(
            _chunked_head(server.port, "full") + _chunk(b"".join(data(i, arr(i)) for i in range(5)))
        )
        poll(lambda: info(http, "full")["depth"] == 2, "the buffer to fill")
        assert info(http, "full")["producers"] == 1
    # the client went away: the relay stops waiting on its behalf
    st = poll(lambda: (st := info(http, "full"))["producers"] == 0 and st, "the upload to end")
    assert (st["state"], st["depth"]) == ("open", 2)
    assert upload(http, "full", end(2)).status_code == 200
    assert [f.seq for f in data_frames(read_all(http, "full"))] == [0, 1]


def test_chunked_upload_over_raw_socket(server, http):
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        head = _chunked_head(server.port, "raw")
        sock.sendall(head + _chunk(data(0, arr(0))) + _chunk(end(1)) + b"0\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
        "accepted": 2,
        "items": 1,
        "next_seq": 1,
        "duplicates": 0,
    }


# -- consumers -----------------------------------------------------------------------------


def test_producer_exception_becomes_error_frame(server, http):
    def sensor() -> Iterator[np.ndarray]:
        yield arr(0)
        yield arr(1)
        raise KeyError("lidar disconnected")

    server.relay.publish("p", sensor())
    frames = read_all(http, "p")
    assert [f.seq for f in data_frames(frames)] == [0, 1]
    error = frames[-1]
    assert isinstance(error, ErrorFrame)
    assert error.origin == "producer"
    assert error.type == "KeyError"
    assert "lidar disconnected" in error.message
    assert error.seq == 2
    assert "Traceback" in error.traceback and "in sensor" in error.traceback
    assert info(http, "p")["state"] == "failed"

    # the same through msgpack.Unpacker: plain maps with the documented keys
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(http.get("/streams/p").content)
    maps = list(unpacker)
    assert maps == [
        {
            "kind": "error",
            "seq": 2,
            "origin": "producer",
            "type": "KeyError",
            "message": error.message,
            "traceback": error.traceback,
        }
    ]


def test_end_frame_through_network(server, http):
    server.relay.publish("n", (arr(i) for i in range(4)))
    frames = read_all(http, "n")
    assert [f.seq for f in data_frames(frames)] == [0, 1, 2, 3]
    assert frames[-1] == EndFrame(4)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(http.get("/streams/n").content)
    assert list(unpacker) == [{"kind": "end", "seq": 4}]


def _mixed_stream(http: httpx.Client, name: str) -> None:
    body = [
        data(0, np.array([[1.5, 2.0], [3.0, -4.25]], "<f4")),
        data(1, b"\x00\xffhello"),
        data(2, np.array([1, 2, 3], "<i8")),
        end(3),
    ]
    assert upload(http, name, *body).status_code == 200


def test_ndjson_format(http):
    _mixed_stream(http, "nj")
    r = http.get("/streams/nj", params={"format": "ndjson"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert r.text.endswith("\n")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines == [
        {
            "kind": "data",
            "seq": 0,
            "dtype": "<f4",
            "shape": [2, 2],
            "data": [[1.5, 2.0], [3.0, -4.25]],
        },
        {
            "kind": "data",
            "seq": 1,
            "encoding": "base64",
            "data": base64.b64encode(b"\x00\xffhello").decode(),
        },
        {"kind": "data", "seq": 2, "dtype": "<i8", "shape": [3], "data": [1, 2, 3]},
        {"kind": "end", "seq": 3},
    ]


def _parse_sse(text: str) -> list[dict[str, Any]]:
    """The events of an SSE body; its `retry:` block and comment lines are checked and
    left out."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        if block.startswith("retry: "):
            assert int(block.removeprefix("retry: ")) > 0
            continue
        event: dict[str, Any] = {}
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            assert field in ("id", "event", "data"), line
            event[field] = value
        event["data"] = json.loads(event["data"])
        events.append(event)
    return events


def test_sse_format(server, http):
    _mixed_stream(http, "ev")
    r = http.get("/streams/ev", params={"format": "sse"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _parse_sse(r.text)
    assert [(e.get("id"), e["event"]) for e in events] == [
        ("0", "data"),
        ("1", "data"),
        ("2", "data"),
        ("3", "end"),
    ]
    assert events[0]["data"]["data"] == [[1.5, 2.0], [3.0, -4.25]]
    assert events[1]["data"]["encoding"] == "base64"
    assert events[3]["data"] == {"kind": "end", "seq": 3}

    def failing() -> Iterator[np.ndarray]:
        yield arr(0)
        raise RuntimeError("boom")

    server.relay.publish("ev2", failing())
    events = _parse_sse(http.get("/streams/ev2?format=sse").text)
    # not `error`: EventSource fires its own `error` event for connection failures
    assert events[-1]["event"] == "stream-error"
    assert events[-1]["id"] == "1"
    assert events[-1]["data"]["kind"] == "error"
    assert events[-1]["data"]["origin"] == "producer"
    assert events[-1]["data"]["type"] == "RuntimeError"


def test_accept_header_selects_format(http):
    _mixed_stream(http, "acc")
    for accept, media in [
        ("text/event-stream", "text/event-stream"),
        ("application/x-ndjson", "application/x-ndjson"),
        ("application/x-msgpack", "application/x-msgpack"),
        ("*/*", "application/x-msgpack"),
        ("", "application/x-msgpack"),
    ]:
        r = http.get("/streams/acc", headers={"accept": accept})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith(media), (accept, r.headers)
        if media == "text/event-stream":
            assert _parse_sse(r.text)[-1]["event"] == "end"
        elif media == "application/x-ndjson":
            assert json.loads(r.text.splitlines()[-1]) == {"kind": "end", "seq": 3}
        else:
            assert decode(r.content)[-1] == EndFrame(3)


def test_format_parameter_beats_accept(http):
    _mixed_stream(http, "acc")
    r = http.get("/streams/acc?format=ndjson", headers={"accept": "text/event-stream"})
    assert r.headers["content-type"].startswith("application/x-ndjson")


def test_unknown_format_or_bad_batch_422(http):
    assert http.put("/streams/q", json={}).status_code == 201
    assert http.get("/streams/q?format=xml").status_code == 422
    assert http.get("/streams/q?batch=0").status_code == 422
    assert http.get("/streams/q?policy=random").status_code == 422
    assert info(http, "q")["consumers"] == 0


def test_stream_headers(http):
    assert upload(http, "h", data(0, arr(0)), end(1)).status_code == 200
    assert http.put("/streams/open", json={}).status_code == 201
    for path in ["/streams/h", "/streams/open"]:
        for fmt in ["msgpack", "ndjson", "sse"]:
            # the headers come at once, before any frame
            with http.stream("GET", f"{path}?format={fmt}") as r:
                assert r.status_code == 200
                assert r.headers["cache-control"] == "no-cache", (path, fmt)
                assert r.headers["x-accel-buffering"] == "no", (path, fmt)


def test_batch_parameter_stacks_waiting_items(http):
    items = [arr(i, (3,), np.int16) for i in range(10)]
    assert (
        upload(http, "bq", *(data(i, a) for i, a in enumerate(items)), end(10)).status_code == 200
    )
    frames = read_all(http, "bq", batch=4)
    batches = data_frames(frames)
    assert [(f.seq, f.count) for f in batches] == [(0, 4), (4, 4), (8, 2)]
    for f in batches:
        assert f.data.shape == (f.count, 3)
        np.testing.assert_array_equal(f.data, np.stack(items[f.seq : f.seq + f.count]))
    assert frames[-1] == EndFrame(10)


def test_batch_parameter_ndjson_and_mixed_items(http):
    body = [data(0, arr(0, (2,))), data(1, arr(1, (2,))), data(2, b"b"), data(3, arr(3, (2,)))]
    assert upload(http, "bn", *body, data(4, arr(4, (3,))), end(5)).status_code == 200
    r = http.get("/streams/bn", params={"batch": 8, "format": "ndjson"})
    lines = [json.loads(line) for line in r.text.splitlines()]
    # only equal-layout arrays with consecutive seqs stack; bytes never do
    assert [(line.get("seq"), line.get("count")) for line in lines] == [
        (0, 2),
        (2, None),
        (3, None),
        (4, None),
        (5, None),
    ]
    assert lines[0]["shape"] == [2, 2]
    assert lines[0]["data"] == [[0.0, 0.0], [1.0, 1.0]]
    assert lines[-1]["kind"] == "end"


def test_heartbeats_on_idle_stream(serve):
    server = serve(heartbeat_interval=0.2)
    with httpx.Client(base_url=server.url, timeout=WAIT) as http:
        assert http.put("/streams/idle", json={}).status_code == 201
        decoder = FrameDecoder()
        frames: list[Frame] = []
        raw = b""
        until = time.monotonic() + 1.0
        with http.stream("GET", "/streams/idle") as r:
            for chunk in r.iter_raw():
                raw += chunk
                decoder.feed(chunk)
                frames.extend(decoder.frames())
                if time.monotonic() > until and len(frames) >= 2:
                    break
        assert pack({"kind": "heartbeat"}) * 2 in raw
        assert len(frames) >= 2
        assert all(isinstance(f, HeartbeatFrame) for f in frames)

        # the human formats carry them too
        with http.stream("GET", "/streams/idle?format=ndjson") as r:
            assert json.loads(next(r.iter_lines())) == {"kind": "heartbeat"}
        with http.stream("GET", "/streams/idle?format=sse") as r:
            text = ""
            for chunk in r.iter_text():
                text += chunk
                if text.count("\n\n") >= 2:
                    break
            # a comment line after the `retry:`: EventSource skips it by itself
            assert text.startswith("retry: 3000\n\n: heartbeat\n\n")

        # a heartbeat is not an item: nothing counted
        st = info(http, "idle")
        assert (st["produced"], st["consumed"]) == (0, 0)


def test_terminal_frames_are_sticky(http):
    for mode in ["queue", "fanout"]:
        _check_sticky_end(http, mode)


def _check_sticky_end(http: httpx.Client, mode: str) -> None:
    name = f"st-{mode}"
    assert http.put(f"/streams/{name}", json={"mode": mode}).status_code == 201
    assert upload(http, name, *(data(i, arr(i)) for i in range(3)), end(3)).status_code == 200
    if mode == "fanout":
        # a fanout consumer joins at the head: the items before it are not its own
        assert read_all(http, name) == [EndFrame(3)]
    else:
        first = read_all(http, name)
        assert [f.seq for f in data_frames(first)] == [0, 1, 2]
        assert first[-1] == EndFrame(3)
    for _ in range(2):  # late consumers get the end at once, in every format
        assert read_all(http, name) == [EndFrame(3)]
        r = http.get(f"/streams/{name}?format=ndjson")
        assert r.text == '{"kind":"end","seq":3}\n'
    assert info(http, name)["state"] == "ended"
    assert any(s["name"] == name for s in http.get("/streams").json())


def test_failed_stream_stays_listed_with_sticky_error(http):
    assert upload(http, "fl", data(0, arr(0)), pack(_error_map(1))).status_code == 200
    for _ in range(2):
        frames = read_all(http, "fl")
        assert isinstance(frames[-1], ErrorFrame)
        assert frames[-1].message == "camera unplugged"
    assert info(http, "fl")["state"] == "failed"


def test_consumer_sees_items_then_terminal_of_in_process_publish(server, http):
    """`end.seq` is the number of items the stream ever held, through the network."""
    server.relay.publish("c", (b"%d" % i for i in range(5)))
    frames = read_all(http, "c")
    assert [f.data for f in data_frames(frames)] == [b"0", b"1", b"2", b"3", b"4"]
    assert frames[-1] == EndFrame(5)


# -- auth ----------------------------------------------------------------------------------

_PROTECTED = [
    ("GET", "/streams"),
    ("GET", "/metrics"),
    ("PUT", "/streams/a"),
    ("GET", "/streams/a/info"),
    ("GET", "/streams/a"),
    ("GET", "/streams/a/latest"),
    ("POST", "/streams/a"),
    ("DELETE", "/streams/a"),
    ("GET", "/streams/nope/info"),  # 401 before 404: no probing for names
    ("DELETE", "/streams/nope"),
]


def _request(http: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    if method == "PUT":
        kwargs.setdefault("json", {"size": 4})
    if method == "POST":
        kwargs.setdefault("content", data(0, arr(0)))
    return http.request(method, path, **kwargs)


@pytest.fixture
def secured(serve: Any) -> Iterator[httpx.Client]:
    server = serve(token="s3cret")
    server.relay.registry.create_blocking("a", StreamSpec(size=4))
    with httpx.Client(base_url=server.url, timeout=WAIT) as client:
        yield client


def test_auth_401_without_or_with_wrong_token(secured):
    for method, path in _PROTECTED:
        _check_refused(secured, method, path)
    # nothing happened behind the refusals
    assert secured.get("/streams/a/info", params={"token": "s3cret"}).json()["produced"] == 0
    assert len(secured.get("/streams", params={"token": "s3cret"}).json()) == 1


def _check_refused(secured: httpx.Client, method: str, path: str) -> None:
    for headers, params in [
        ({}, {}),
        ({"authorization": "Bearer wrong"}, {}),
        ({"authorization": "Bearer s3cret-but-longer"}, {}),
        ({"authorization": "Basic czNjcmV0"}, {}),
        ({"authorization": "s3cret"}, {}),
        ({}, {"token": "wrong"}),
        ({}, {"token": ""}),
    ]:
        r = _request(secured, method, path, headers=headers, params=params)
        assert r.status_code == 401, (method, path, headers, params, r.status_code)
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"] == "AuthError"
        assert r.headers.get("www-authenticate", "").startswith("Bearer")


def test_auth_healthz_open(secured):
    r = secured.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_auth_bearer_and_query_token(secured):
    bearer = {"authorization": "Bearer s3cret"}
    assert secured.get("/streams", headers=bearer).status_code == 200
    # the auth scheme is case-insensitive (RFC 9110 §11.1)
    for scheme in ("bearer", "BEARER"):
        headers = {"authorization": f"{scheme} s3cret"}
        assert secured.get("/streams", headers=headers).status_code == 200, scheme
    assert secured.get("/streams", params={"token": "s3cret"}).status_code == 200
    assert secured.get("/metrics", headers=bearer).status_code == 200
    r = _request(secured, "POST", "/streams/a", headers=bearer, content=data(0, arr(0)))
    assert r.status_code == 200
    r = _request(secured, "POST", "/streams/a", params={"token": "s3cret"}, content=end(1))
    assert r.status_code == 200
    assert _request(secured, "PUT", "/streams/b", headers=bearer).status_code == 201
    assert secured.get("/streams/a/latest", headers=bearer).status_code == 200

    # EventSource: no headers, the token in the query string
    r = secured.get("/streams/a", params={"format": "sse", "token": "s3cret"})
    assert r.status_code == 200
    assert _parse_sse(r.text)[-1]["data"] == {"kind": "end", "seq": 1}
    assert secured.get("/streams/a", headers=bearer).status_code == 200
    assert secured.delete("/streams/a", headers=bearer).status_code == 204
    assert secured.get("/streams/a/info", headers=bearer).status_code == 404


def test_auth_client_library(serve):
    server = serve(token="s3cret")
    with RelayClient(server.url, token="s3cret", timeout=WAIT, read_timeout=WAIT) as client:
        client.publish("c", (arr(i) for i in range(3)))
        assert [int(a[0, 0]) for a in client.stream("c")] == [0, 1, 2]
