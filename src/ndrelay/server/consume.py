"""The consumer's response: a stream's frames as they come, in msgpack, NDJSON or SSE."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .._codec import encode_batch, encode_data_parts, encode_frame, encode_items
from .._frames import DataFrame, Frame, HeartbeatFrame
from ..registry import Block, Consumer, ReplicaLeaving, Stream
from .formats import FORMATS, ndjson_line, sse_event
from .protocol import EXTENSION
from .relay import Settings

__all__ = ["FrameStreamResponse"]

log = logging.getLogger("ndrelay.server")

#: Small frames are coalesced into writes of about this size.
_COALESCE_BYTES = 256 * 1024
#: A consumer takes at most this many bytes from its buffer per round.
_TAKE_BYTES = 4 * 1024 * 1024
_STREAM_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _rows(items: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """`(seq, item)` pairs with every `Block` opened into its rows."""
    if not any(type(item) is Block for _, item in items):
        return items
    out: list[tuple[int, Any]] = []
    for seq, item in items:
        if type(item) is Block:
            out += item.rows(seq)
        else:
            out.append((seq, item))
    return out


def _runs(items: list[tuple[int, Any]], limit: int) -> list[tuple[int, Any]]:
    """Split `(seq, item)` pairs into runs of up to `limit` arrays of one dtype and shape
    and consecutive seqs (lists), or `Block`s of up to `limit` rows; any other item is a
    run of its own. (A queue consumer's items need not have consecutive seqs: items given
    back by another consumer come first.)"""
    runs: list[tuple[int, Any]] = []
    layout: Any = None
    current: list[Any] = []
    start = 0
    for seq, item in items:
        if type(item) is Block:
            array = item.array
            runs += [(seq + i, Block(array[i : i + limit])) for i in range(0, len(array), limit)]
            layout = None
            continue
        key = (item.dtype, item.shape) if type(item) is np.ndarray else None
        if key is None or key != layout or len(current) >= limit or seq != start + len(current):
            current = [item]
            runs.append((seq, current))
            layout = key
            start = seq
        else:
            current.append(item)
    return runs


def _batched_frames(items: list[tuple[int, Any]], limit: int) -> list[DataFrame]:
    """`?batch=N` for the human formats: the runs as (batched) frames."""
    frames = []
    for seq, run in _runs(items, limit):
        if type(run) is Block:
            frames.append(DataFrame(seq, run.array, len(run.array)))
        elif len(run) == 1:
            frames.append(DataFrame(seq, run[0]))
        else:
            frames.append(DataFrame(seq, np.stack(run), len(run)))
    return frames


def _batched_buffers(items: list[tuple[int, Any]], limit: int) -> list[Any]:
    """`?batch=N` in msgpack: the runs as (batched) frames, ready to write; a `Block`
    goes out as it is, its payload not copied."""
    buffers: list[Any] = []
    for seq, run in _runs(items, limit):
        if type(run) is Block:
            buffers += encode_data_parts(seq, run.array, len(run.array))
        elif len(run) == 1:
            buffers += encode_items([(seq, run[0])])
        else:
            buffers += encode_batch(seq, run)
    return buffers


class FrameStreamResponse(Response):
    """A consumer's response: frames as they come, heartbeats when idle.

    It listens for the client's disconnect while it waits, so a consumer that goes
    away releases its slot at once instead of at the next write.
    """

    def __init__(
        self,
        stream: Stream,
        consumer: Consumer,
        fmt: str,
        batch: int,
        settings: Settings,
        unavailable: tuple[type[Exception], ...] = (),
    ) -> None:
        self.stream = stream
        self.unavailable = unavailable
        self.consumer = consumer
        self.fmt = fmt
        self.batch = batch
        self.settings = settings
        self.status_code = 200
        self.background = None
        spec = stream.spec
        self.raw_headers = [
            (b"content-type", FORMATS[fmt].encode()),
            *_STREAM_HEADERS,
            # who it is (to resume and acknowledge as), and the window acks keep open
            (b"ndrelay-consumer", consumer.id.encode()),
            (b"ndrelay-mode", spec.mode.encode()),
            (b"ndrelay-size", str(spec.size).encode()),
            (b"ndrelay-max-bytes", str(spec.max_bytes).encode()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # `VectoredHttpProtocol` (how `ndrelay serve` runs uvicorn) writes the body
        # from the arrays' memory; under another server, uvicorn's `send` does.
        self._vectored = scope.get("extensions", {}).get(EXTENSION)
        self._over = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            watch = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                await asyncio.wait([pump, watch], return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._over = True  # the pump stops at its next round, cancelled or not
                for task in (pump, watch):
                    task.cancel()
                # a cancellation swallowed by a timeout expiring at the same moment
                # (Python 3.11) must not leave the pump running: cancel it again
                while not pump.done():
                    await asyncio.wait([pump], timeout=1.0)
                    pump.cancel()
                await asyncio.gather(pump, watch, return_exceptions=True)
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                raise pump.exception()  # type: ignore[misc]
        finally:
            await self.consumer.aclose()

    async def _pump(self, send: Send) -> None:
        try:
            await self._pump_frames(send)
        except ReplicaLeaving:
            pass  # the client resumes on another replica
        except self.unavailable as exc:
            log.warning(
                "stream %r: consumer %r: the stream backend is unreachable (%s): its "
                "response ends here, and its client resumes",
                self.stream.name,
                self.consumer.id,
                exc,
            )
        else:
            return
        # ended without a terminal frame: the client sees a cut, and resumes
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _pump_frames(self, send: Send) -> None:
        consumer = self.consumer
        heartbeat = self.settings.heartbeat_interval
        if self.fmt == "sse":  # once: how long a browser waits before it reconnects
            retry = f"retry: {round(self.settings.sse_retry * 1000)}\n\n".encode()
            await send({"type": "http.response.body", "body": retry, "more_body": True})
        batch = self.batch
        take = max(4 * batch, 256) if self.fmt == "msgpack" else batch
        auto_ack = consumer.auto_ack and self.stream.spec.mode == "queue"
        clock = asyncio.get_running_loop().time
        quiet_since = clock()  # a heartbeat goes out after `heartbeat` s without a frame
        while not self._over:
            got = await consumer.atake(take, _TAKE_BYTES)
            if got is None:
                left = heartbeat - (clock() - quiet_since)
                try:
                    if left <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(left):
                        await consumer.wait()
                except TimeoutError:
                    await self._send_frames(send, [HeartbeatFrame()])
                    quiet_since = clock()
                continue
            quiet_since = clock()
            if isinstance(got, Frame):
                await self._send_frames(send, [got], last=True)
                return
            await self._send_frames(send, got)
            if auto_ack:
                seq, item = got[-1]
                await consumer.ack_written(
                    seq + len(item.array) - 1 if type(item) is Block else seq
                )

    async def _send_frames(self, send: Send, frames: list[Any], last: bool = False) -> None:
        """Write frames, or `(seq, item)` pairs: small ones coalesced into few writes,
        large payloads handed to the server as views of the arrays."""
        if self.fmt != "msgpack":
            encode = ndjson_line if self.fmt == "ndjson" else sse_event
            if frames and isinstance(frames[0], tuple):
                frames = _batched_frames(_rows(frames) if self.batch == 1 else frames, self.batch)
            body = b"".join(encode(f) for f in frames)
            await send({"type": "http.response.body", "body": body, "more_body": not last})
            return
        buffers: list[Any]
        if not frames or isinstance(frames[0], Frame):
            buffers = [encode_frame(f) for f in frames]
        elif self.batch > 1:
            buffers = _batched_buffers(frames, self.batch)
        else:
            buffers = encode_items(_rows(frames))
        buffers = _coalesce(buffers)
        if self._vectored is not None:
            if buffers:
                await self._vectored(buffers)
            if last:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        for i, body in enumerate(buffers):
            more = not last or i < len(buffers) - 1
            await send({"type": "http.response.body", "body": body, "more_body": more})
        if last and not buffers:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _coalesce(buffers: list[Any]) -> list[Any]:
    """Join runs of small buffers (up to `_COALESCE_BYTES`); large ones stay views."""
    out: list[Any] = []
    run: list[Any] = []
    size = 0
    for buf in buffers:
        n = len(buf)
        if n >= _COALESCE_BYTES:
            if run:
                out.append(b"".join(run) if len(run) > 1 else run[0])
                run, size = [], 0
            out.append(buf)
            continue
        run.append(buf)
        size += n
        if size >= _COALESCE_BYTES:
            out.append(b"".join(run))
            run, size = [], 0
    if run:
        out.append(b"".join(run) if len(run) > 1 else run[0])
    return out


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
