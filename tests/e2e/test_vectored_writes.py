"""The served path's vectored writes (`ndrelay.server.protocol`): the hook into uvicorn
applies (a uvicorn upgrade that stops it fails here, loudly), and the body stays standard
HTTP/1.1 chunked coding, byte for byte, whatever mix of frames and however slow the reader."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import httpx
import msgpack
import numpy as np
import pytest
import uvicorn
from _sources import ServeProcess, bounded, poll
from conftest import need
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ndrelay import Relay, RelayClient, create_app
from ndrelay.server import VectoredHttpProtocol, uvicorn_config
from ndrelay.server.protocol import RECEIVE_EXTENSION

pytestmark = pytest.mark.e2e

MiB = 1 << 20
HOOK_BROKEN = (
    "the vectored-write hook no longer applies: uvicorn {} changed what "
    "ndrelay.server.protocol.VectoredHttpProtocol relies on (its http= protocol class, "
    "HttpToolsProtocol.on_headers_complete/cycle); fix the hook or the uvicorn pin"
)


def vectored_bytes(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("ndrelay_vectored_write_bytes_total "):
            return float(line.split()[1])
    raise AssertionError("/metrics has no ndrelay_vectored_write_bytes_total")


def test_the_protocol_class_is_uvicorns_own_extended():
    config = uvicorn_config(create_app(Relay()))
    config.load()
    assert config.http_protocol_class is VectoredHttpProtocol, HOOK_BROKEN.format(
        uvicorn.__version__
    )
    assert issubclass(VectoredHttpProtocol, HttpToolsProtocol)


def test_ndrelay_serve_writes_large_payloads_straight_from_the_arrays():
    proc = ServeProcess("--source", "_sources:endless_large")
    try:
        before = vectored_bytes(proc.url)
        with RelayClient(proc.url, read_timeout=20) as client:
            stream = client.stream("endless-large", prefetch=2)
            got = bounded(lambda: [next(stream) for _ in range(8)], 30)
            stream.close()
        seqs = [int(a[0]) for a in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == 8
        for a in got:
            assert a.shape == (MiB,) and (a == a[0]).all()
        moved = vectored_bytes(proc.url) - before
        assert moved >= 8 * MiB, HOOK_BROKEN.format(uvicorn.__version__) + f" (moved {moved})"
    finally:
        proc.stop()


def _mixed(n: int) -> list:
    """Small and large arrays and bytes, interleaved: coalesced runs and large views."""
    out = []
    for i in range(n):
        if i % 5 == 0:
            out.append(np.full(MiB // 4 + i, i, dtype=np.float32))  # ~1 MiB, odd sizes
        elif i % 5 == 1:
            out.append(bytes([i % 256]) * (3000 + i))
        else:
            out.append(np.arange(16, dtype=np.int16) + i)
    return out


def test_curl_gets_every_byte_of_a_mixed_stream_from_a_slow_reader(serve, tmp_path):
    curl = need("curl")
    relay = Relay()
    items = _mixed(60)
    relay.publish("mixed", iter(items), size=8)
    server = serve(relay)
    out = tmp_path / "body.msgpack"
    # --limit-rate: the reader is slower than the writer, so writes meet a full socket
    subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "60",
            "--limit-rate",
            "20M",
            "-o",
            str(out),
            f"{server.url}/streams/mixed",
        ],
        check=True,
        timeout=90,
    )
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 * MiB)
    unpacker.feed(out.read_bytes())
    frames = list(unpacker)
    assert [f["kind"] for f in frames] == ["data"] * len(items) + ["end"]
    for i, (frame, item) in enumerate(zip(frames, items, strict=False)):
        assert frame["seq"] == i
        if isinstance(item, bytes):
            assert frame["data"] == item
        else:
            assert (frame["dtype"], frame["shape"]) == (item.dtype.str, list(item.shape))
            assert frame["data"] == item.tobytes()


def test_a_reader_that_vanishes_mid_payload_frees_its_slot(serve):
    relay = Relay()

    def endless():
        while True:
            yield np.zeros(4 * MiB, np.uint8)

    relay.publish("big", endless(), size=2, mode="fanout")
    server = serve(relay)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.sendall(b"GET /streams/big HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    poll(lambda: relay.registry.get("big").info()["consumers"] == 1, "the consumer")
    time.sleep(0.5)  # the server is now blocked on a full socket inside a 4 MiB payload
    sock.close()
    poll(lambda: relay.registry.get("big").info()["consumers"] == 0, "the slot's release", 20)
    with RelayClient(server.url, read_timeout=20) as client:  # still serving
        with client.stream("big", policy="latest") as stream:
            assert bounded(lambda: next(stream), 20).nbytes == 4 * MiB


def test_uploads_arrive_in_unjoined_pieces_through_the_receive_extension():
    """An ASGI app under `uvicorn_config` gets `ndrelay.receive_chunks`: the body in the
    parser's pieces, every byte, in order (the hook applies under this uvicorn)."""
    seen: dict = {}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        chunked = scope.get("extensions", {}).get(RECEIVE_EXTENSION)
        seen["offered"] = chunked is not None
        pieces = []
        more = True
        while more and chunked is not None:
            message = await chunked()
            if message["type"] != "http.request":
                break
            pieces += message["chunks"]
            more = message["more_body"]
        seen["pieces"] = len(pieces)
        body = b"".join(pieces)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d %d" % (len(body), hash(body))})

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        poll(lambda: server.started, "the server")
        payload = np.random.default_rng(3).bytes(3 * MiB)

        def body():
            for i in range(0, len(payload), 100_000):
                yield payload[i : i + 100_000]

        answer = httpx.post(
            f"http://127.0.0.1:{port}/", content=body(), headers={"Expect": "100-continue"}
        )
        assert answer.text == f"{len(payload)} {hash(payload)}"
        assert seen["offered"], HOOK_BROKEN.format(uvicorn.__version__)
        assert seen["pieces"] > 1
    finally:
        server.should_exit = True
        thread.join(10)
