"""What an operator does with `curl`: the README's "Try it with curl" lines, run as
written against a server with the demo streams of `ndrelay serve --demo`.

curl is required (CI installs it): a missing curl fails these tests, it does not skip
them. Every call has `--max-time`, and `subprocess.run` a timeout on top.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ndrelay import DataFrame, EndFrame, Frame, FrameDecoder, Relay, encode_frame
from ndrelay.cli.demo import demo_count, demo_radar
from ndrelay.server import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.backends]

CURL = shutil.which("curl")
#: `--max-time` of calls that should finish on their own.
MAX_TIME = 10


@pytest.fixture(autouse=True)
def _need_curl() -> None:
    if CURL is None:
        pytest.fail("curl is not installed: these tests need it (CI installs it)")


@pytest.fixture
def demo(serve: Callable[..., Any], backend: str) -> Any:
    """A server with the streams `ndrelay serve --demo` adds."""
    relay = Relay(settings=Settings(backend=backend))
    relay.publish("radar", demo_radar(), size=64, mode="fanout")
    relay.publish("count", demo_count(), size=64)
    return serve(relay)


def host(server: Any) -> str:
    """The README writes `localhost:8000`; the test server has its own port."""
    return f"localhost:{server.port}"


def sh(command: str, max_time: float = MAX_TIME) -> subprocess.CompletedProcess[bytes]:
    """Run a README line through the shell (pipes and redirections included)."""
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, timeout=max_time + 10, check=False
    )


def curl(*args: str, max_time: float = MAX_TIME) -> tuple[int, bytes, int]:
    """`curl -sS --max-time ... args`: (HTTP status, body, curl's exit code)."""
    assert CURL is not None
    done = subprocess.run(
        [CURL, "-sS", "--max-time", str(max_time), "-w", "\n%{http_code}", *args],
        capture_output=True,
        timeout=max_time + 10,
        check=False,
    )
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status or 0), body, done.returncode


def ndjson(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.decode().splitlines()]


def decode(body: bytes) -> tuple[list[Frame], bool]:
    """Frames of a body, and whether it ends inside a frame."""
    decoder = FrameDecoder()
    decoder.feed(body)
    return list(decoder.frames()), decoder.has_partial


# -- the README, line by line ---------------------------------------------------------------


def test_readme_list_streams(demo):
    done = sh(f"curl -s --max-time {MAX_TIME} {host(demo)}/streams")
    assert done.returncode == 0, done.stderr
    listing = {s["name"]: s for s in json.loads(done.stdout)}
    assert set(listing) == {"radar", "count"}
    assert listing["radar"]["mode"] == "fanout"
    assert listing["count"]["mode"] == "queue"
    assert listing["radar"]["state"] == "open"


def test_readme_count_as_ndjson(demo):
    line = f"curl -s --max-time {MAX_TIME} '{host(demo)}/streams/count?format=ndjson'"
    done = sh(line)
    assert done.returncode == 0, done.stderr
    lines = ndjson(done.stdout)
    assert len(lines) == 11  # 10 JSON lines, then {"kind":"end","seq":10}
    for i, item in enumerate(lines[:10]):
        assert item == {
            "kind": "data",
            "seq": i,
            "dtype": "<i8",
            "shape": [3],
            "data": [i, i * i, i * i * i],
        }
    assert lines[10] == {"kind": "end", "seq": 10}
    # queue mode: the first reader took them; later readers get just the end
    again = sh(line)
    assert again.returncode == 0
    assert ndjson(again.stdout) == [{"kind": "end", "seq": 10}]


def test_readme_radar_as_sse(demo, tmp_path):
    headers = tmp_path / "headers"
    # the README's line runs until Ctrl-C; here --max-time stops it (curl exit code 28)
    done = sh(f"curl -sN --max-time 2 -D {headers} '{host(demo)}/streams/radar?format=sse'", 2)
    assert done.returncode == 28, done.stderr
    head = headers.read_text().lower()
    assert head.startswith("http/1.1 200")
    assert "content-type: text/event-stream" in head
    assert "cache-control: no-cache" in head
    assert "x-accel-buffering: no" in head

    text = done.stdout.decode()
    complete = text[: text.rfind("\n\n") + 2]  # the cut may fall inside an event
    blocks = list(filter(None, complete.split("\n\n")))
    assert blocks[0] == "retry: 3000"  # once, first: the browser's reconnect delay
    events = []
    for block in blocks[1:]:
        if block.startswith(":"):  # a comment (heartbeat)
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append(fields)
    data = [e for e in events if e["event"] == "data"]
    assert len(data) >= 2, text
    ids = [int(e["id"]) for e in data]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "a fanout reader that keeps up"
    for e in data:
        frame = json.loads(e["data"])
        assert frame["kind"] == "data"
        assert frame["seq"] == int(e["id"])
        assert (frame["dtype"], frame["shape"]) == ("<f4", [4, 8])
        assert np.asarray(frame["data"], np.float32).shape == (4, 8)


def test_readme_radar_ndjson_head(demo):
    line = f"curl -sN --max-time {MAX_TIME} '{host(demo)}/streams/radar?format=ndjson' | head -3"
    done = sh(line)
    assert done.returncode == 0, done.stderr  # head's status: it got its 3 lines
    lines = ndjson(done.stdout)
    assert len(lines) == 3
    assert [item["kind"] for item in lines] == ["data"] * 3
    assert [item["seq"] for item in lines] == list(range(lines[0]["seq"], lines[0]["seq"] + 3))


def test_readme_save_push_back_and_read_a_copy(demo, tmp_path):
    h = host(demo)
    save = f"curl -s --max-time {MAX_TIME} {h}/streams/radar?policy=latest | head -c 2000"
    done = sh(f"cd {tmp_path} && {save} > radar.msgpack")
    assert done.returncode == 0, done.stderr
    saved = (tmp_path / "radar.msgpack").read_bytes()
    assert len(saved) == 2000
    frames, cut = decode(saved)
    assert len(frames) >= 2
    assert all(isinstance(f, DataFrame) for f in frames)

    done = sh(
        f"cd {tmp_path} && curl -s --max-time {MAX_TIME} -w '\\n%{{http_code}}' "
        f"--data-binary @radar.msgpack {h}/streams/copy"
    )
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition(b"\n")
    answer = json.loads(body)
    if cut:  # the README's note: every whole frame kept, 400 naming the cut-off one
        assert int(status) == 400
        assert answer["frame_index"] == len(frames)
        assert answer["accepted"] == len(frames)
        assert "truncated" in answer["reason"]
    else:
        assert int(status) == 200
        assert answer == {"accepted": len(frames), "items": len(frames), "next_seq": len(frames)}

    # `copy` is open and quiet: curl sees no reason to stop after head has its two
    # lines (it would sit there until Ctrl-C), so --max-time ends it
    done = sh(f"curl -s --max-time 1 '{h}/streams/copy?format=ndjson' | head -2", 1)
    assert done.returncode == 0, done.stderr  # head's status
    copy = ndjson(done.stdout)
    assert [item["seq"] for item in copy] == [0, 1]
    for item, frame in zip(copy, frames, strict=False):
        np.testing.assert_array_equal(np.asarray(item["data"], np.float32), frame.data)

    done = sh(f"curl -s --max-time {MAX_TIME} {h}/streams/copy/info")
    assert done.returncode == 0, done.stderr
    st = json.loads(done.stdout)
    assert st["state"] == "open"  # no end frame was pushed: it stays open for more
    assert st["produced"] == len(frames)
    assert st["consumed"] >= 2


# -- pushing files of frames ---------------------------------------------------------------


def _items() -> list[Any]:
    return [
        np.arange(12, dtype="<f4").reshape(3, 4),
        b"\x00\x01raw\xff",
        np.array([[1, -2], [3, -4]], "<i2"),
        np.array(7.5, "<f8"),
        np.zeros((0, 3), "|u1"),
    ]


def test_push_a_file_of_frames_and_read_it_back(serve, tmp_path):
    server = serve()
    url = f"{host(server)}/streams/pushed"
    items = _items()
    path = tmp_path / "frames.msgpack"
    path.write_bytes(
        b"".join(encode_frame(DataFrame(i, item)) for i, item in enumerate(items))
        + encode_frame(EndFrame(len(items)))
    )

    status, body, rc = curl("--data-binary", f"@{path}", url)
    assert (status, rc) == (200, 0), body
    assert json.loads(body) == {
        "accepted": len(items) + 1,
        "items": len(items),
        "next_seq": 5,
        "duplicates": 0,
    }

    # back as msgpack, byte for byte the same items
    out = tmp_path / "back.msgpack"
    status, _, rc = curl("-o", str(out), url)
    assert (status, rc) == (200, 0)
    frames, cut = decode(out.read_bytes())
    assert not cut
    assert frames[-1] == EndFrame(5)
    for frame, item in zip(frames[:-1], items, strict=True):
        if isinstance(item, bytes):
            assert frame.data == item
        else:
            assert (frame.data.dtype, frame.data.shape) == (item.dtype, item.shape)
            np.testing.assert_array_equal(frame.data, item)

    # a finished stream: later reads get just the end, pushes are refused
    status, body, _ = curl(f"{url}?format=ndjson")
    assert (status, ndjson(body)) == (200, [{"kind": "end", "seq": 5}])
    status, body, _ = curl("--data-binary", f"@{path}", url)
    assert status == 409
    assert json.loads(body)["error"] == "StreamClosed"


def test_push_in_parts_from_stdin_and_read_ndjson(serve, tmp_path):
    server = serve()
    url = f"{host(server)}/streams/parts"
    items = _items()
    parts = [
        b"".join(encode_frame(DataFrame(i, items[i])) for i in range(3)),
        b"".join(encode_frame(DataFrame(i, items[i])) for i in range(3, 5)),
        encode_frame(EndFrame(5)),
    ]
    next_seqs = []
    for n, part in enumerate(parts):
        path = tmp_path / f"part{n}"
        path.write_bytes(part)
        done = sh(f"cat {path} | curl -s --max-time {MAX_TIME} --data-binary @- {url}")
        assert done.returncode == 0, done.stderr
        next_seqs.append(json.loads(done.stdout)["next_seq"])
    assert next_seqs == [3, 5, 5]

    status, body, rc = curl(f"{url}?format=ndjson")
    assert (status, rc) == (200, 0)
    lines = ndjson(body)
    assert lines[0] == {
        "kind": "data",
        "seq": 0,
        "dtype": "<f4",
        "shape": [3, 4],
        "data": items[0].tolist(),
    }
    assert lines[1] == {
        "kind": "data",
        "seq": 1,
        "encoding": "base64",
        "data": base64.b64encode(items[1]).decode(),
    }
    assert lines[2]["data"] == [[1, -2], [3, -4]]
    assert (lines[3]["shape"], lines[3]["data"]) == ([], 7.5)
    assert (lines[4]["shape"], lines[4]["data"]) == ([0, 3], [])
    assert lines[5] == {"kind": "end", "seq": 5}


def test_push_a_bad_file_names_the_frame(serve, tmp_path):
    server = serve()
    url = f"{host(server)}/streams/bad"
    good = [encode_frame(DataFrame(i, np.full(2, i, np.int32))) for i in range(4)]
    wrong = bytearray(good[2])
    wrong[wrong.index(b"<i4")] = ord("?")  # dtype "?i4"
    path = tmp_path / "bad.msgpack"
    path.write_bytes(good[0] + good[1] + bytes(wrong) + good[3])
    status, body, rc = curl("--data-binary", f"@{path}", url)
    assert rc == 0
    assert status == 400
    answer = json.loads(body)
    assert (answer["frame_index"], answer["accepted"], answer.get("key")) == (2, 2, "dtype")
    status, body, _ = curl(f"{url}/info")
    assert (json.loads(body)["produced"], json.loads(body)["state"]) == (2, "open")


# -- the rest of the API, as curl users call it --------------------------------------------


def test_create_delete_latest_metrics_with_curl(demo):
    h = host(demo)
    spec = '{"size": 4, "mode": "fanout"}'
    status, body, _ = curl(
        "-X", "PUT", "-H", "content-type: application/json", "-d", spec, f"{h}/streams/cam"
    )
    assert status == 201
    assert json.loads(body)["mode"] == "fanout"
    status, _, _ = curl(
        "-X", "PUT", "-H", "content-type: application/json", "-d", spec, f"{h}/streams/cam"
    )
    assert status == 200
    status, body, _ = curl(
        "-X", "PUT", "-H", "content-type: application/json", "-d", '{"size": 5}', f"{h}/streams/cam"
    )
    assert status == 409

    status, body, _ = curl(f"{h}/streams/cam/latest")
    assert (status, body) == (204, b"")
    # the radar demo keeps its newest frames even with nobody reading
    status, body, _ = curl(f"{h}/streams/radar/latest?format=ndjson")
    assert status == 200
    assert json.loads(body)["shape"] == [4, 8]

    status, body, _ = curl(f"{h}/metrics")
    assert status == 200
    text = body.decode()
    for stream in ("radar", "count", "cam"):
        assert f'stream="{stream}"' in text
    assert "ndrelay_stream_produced_total{" in text

    status, body, _ = curl("-X", "DELETE", f"{h}/streams/cam")
    assert (status, body) == (204, b"")
    status, body, _ = curl(f"{h}/streams/cam/info")
    assert status == 404
    assert json.loads(body)["error"] == "StreamNotFound"


def test_curl_with_a_token(serve, backend):
    relay = Relay(settings=Settings(token="s3cret", backend=backend))
    relay.publish("count", demo_count(), size=64)
    server = serve(relay)
    h = host(server)
    status, body, _ = curl(f"{h}/streams")
    assert status == 401
    assert json.loads(body)["error"] == "AuthError"
    status, body, _ = curl("-H", "Authorization: Bearer s3cret", f"{h}/streams")
    assert status == 200
    assert [s["name"] for s in json.loads(body)] == ["count"]
    status, body, _ = curl(f"{h}/healthz")
    assert status == 200
    # EventSource style: the token in the query string
    status, body, _ = curl(f"{h}/streams/count?format=sse&token=s3cret")
    assert status == 200
    assert body.decode().rstrip("\n").endswith('data: {"kind":"end","seq":10}')
