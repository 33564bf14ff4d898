"""The HTTP API (DESIGN.md §3): `create_app(relay)` builds the FastAPI application."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from .._codec import (
    MEDIA_TYPE,
    FrameDecoder,
    encode_batch,
    encode_data_parts,
    encode_frame,
    encode_items,
)
from .._exceptions import (
    AuthError,
    NDRelayError,
    ProtocolError,
    StreamClosed,
)
from .._frames import DataFrame, EndFrame, ErrorFrame, Frame, HeartbeatFrame
from .._version import __version__
from ..registry import POLICIES, Block, Consumer, Registry, Stream, StreamSpec, check_name
from .formats import FORMATS, ndjson_line, sse_event
from .metrics import metrics_response
from .relay import Relay, Settings

__all__ = ["create_app"]

log = logging.getLogger("ndrelay.server")

#: Small frames are coalesced into writes of about this size.
_COALESCE_BYTES = 256 * 1024
#: A consumer takes at most this many bytes from its buffer per round.
_TAKE_BYTES = 4 * 1024 * 1024
_STREAM_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

DESCRIPTION = """
ndrelay relays streams of numpy arrays and raw bytes.

**Frames.** A stream body is a concatenation of msgpack maps, nothing between them
(`application/x-msgpack`; any streaming msgpack decoder reads it):

| kind | keys |
|---|---|
| `data` (array) | `kind`, `seq`, `dtype` (`"<f4"`...), `shape` (ints), `data` (bin, C order) |
| `data` (bytes) | `kind`, `seq`, `data` (bin) |
| `data` (batched) | as array, plus `count`: items stacked on the leading axis of `shape` |
| `end` | `kind`, `seq` (= number of items the stream ever held) |
| `error` | `kind`, `seq`, `origin` (`producer` or `relay`), `type`, `message`, `traceback` |
| `heartbeat` | `kind` (sent on idle streams; skip it) |

A body that ends without `end` or `error` was cut off. `?format=ndjson` and
`?format=sse` give the same frames as JSON lines or server-sent events (arrays as
nested lists, bytes as base64 with `"encoding": "base64"`).
"""


def _get_stream(request: Request, name: str) -> Stream:
    relay: Relay = request.app.state.relay
    return relay.registry.get(name)


StreamDep = Annotated[Stream, Depends(_get_stream)]


class CreateStream(BaseModel):
    """Definition of a stream for `PUT /streams/{name}`."""

    # a misspelt key (`max_byte`) must not silently give a stream other bounds
    model_config = ConfigDict(extra="forbid")

    size: int = Field(64, ge=1, le=1_000_000, description="most items buffered")
    max_bytes: int | None = Field(None, ge=1, description="most payload bytes buffered")
    mode: Literal["queue", "fanout"] = "queue"
    dtype: str | None = Field(None, description="numpy dtype.str every array must have")
    shape: list[int] | None = Field(None, description="shape every array must have")


def create_app(relay: Relay | Registry | None = None, settings: Settings | None = None) -> FastAPI:
    """The FastAPI application serving `relay` (default: a new in-memory `Relay`).

    Args:
        relay: a `Relay` (or a bare registry to wrap in one).
        settings: overrides the relay's settings (token, limits, heartbeat).
    """
    if relay is None or not isinstance(relay, Relay):
        relay = Relay(relay, settings)
    elif settings is not None:
        relay.settings = settings
    the_relay = relay
    registry = relay.registry

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(the_relay.close)  # joins producer threads: not on the loop

    app = FastAPI(
        title="ndrelay",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.relay = relay

    def check_token(request: Request) -> None:
        token = the_relay.settings.token
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if given[:7].lower() == "bearer ":  # the auth scheme is case-insensitive
            given = given[7:].strip()
        else:
            given = request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise AuthError("missing or wrong bearer token")

    auth = [Depends(check_token)]

    @app.exception_handler(NDRelayError)
    async def ndrelay_error(request: Request, exc: NDRelayError) -> JSONResponse:
        status = getattr(exc, "status_hint", 400)
        headers = {"www-authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(_error_body(exc), status_code=status, headers=headers)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"error": "ValueError", "message": str(exc)}, status_code=422)

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, str]:
        """Liveness; needs no token."""
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", dependencies=auth, tags=["service"])
    async def metrics() -> Response:
        """Prometheus text format."""
        return metrics_response(registry)

    @app.get("/streams", dependencies=auth, tags=["streams"])
    async def list_streams() -> list[dict[str, Any]]:
        """Info of every stream."""
        return [s.info() for s in registry.streams()]

    @app.put("/streams/{name}", dependencies=auth, tags=["streams"], status_code=201)
    async def create_stream(name: str, body: CreateStream) -> JSONResponse:
        """Create a stream: 201, or 200 if it exists identically, 409 if differently."""
        args = body.model_dump(exclude_none=True)
        if "shape" in args:
            args["shape"] = tuple(args["shape"])
        stream, created = registry.create(check_name(name), StreamSpec(**args))
        return JSONResponse(stream.info(), status_code=201 if created else 200)

    @app.get("/streams/{name}/info", dependencies=auth, tags=["streams"])
    async def stream_info(stream: StreamDep) -> dict[str, Any]:
        """Definition, state (`open`/`ended`/`failed`) and counters of one stream."""
        return stream.info()

    @app.delete("/streams/{name}", dependencies=auth, tags=["streams"], status_code=204)
    async def delete_stream(name: str) -> Response:
        """Delete a stream; its consumers get a `relay` error frame."""
        registry.delete(name)
        return Response(status_code=204)

    @app.get("/streams/{name}/latest", dependencies=auth, tags=["streams"])
    async def latest(
        stream: StreamDep, format: Literal["msgpack", "ndjson"] = "msgpack"
    ) -> Response:
        """The newest buffered item as one frame, without consuming it; 204 if none."""
        newest = stream.latest()  # type: ignore[attr-defined]
        if newest is None:
            return Response(status_code=204)
        frame = DataFrame(newest[0], newest[1])
        if format == "ndjson":
            return Response(ndjson_line(frame), media_type=FORMATS["ndjson"])
        return Response(encode_frame(frame), media_type=MEDIA_TYPE)

    @app.get(
        "/streams/{name}",
        dependencies=auth,
        tags=["streams"],
        response_class=Response,
        responses={200: {"content": {media: {} for media in FORMATS.values()}}},
    )
    async def consume(
        request: Request,
        stream: StreamDep,
        format: Literal["msgpack", "ndjson", "sse"] | None = None,
        batch: Annotated[int, Query(ge=1, le=65536)] = 1,
        policy: Literal["block", "drop_oldest", "latest"] = "block",
    ) -> Response:
        """Stream the frames of `name` until its `end` or `error` frame.

        `format` picks msgpack (default), ndjson or sse (also chosen by `Accept`);
        `batch=N` lets the server stack up to N equal-shaped arrays into one batched
        frame; `policy` is what happens when a fanout consumer falls behind.
        """
        fmt = format or _format_from_accept(request.headers.get("accept", ""))
        consumer = stream.open_consumer(policy if policy in POLICIES else "block")
        return FrameStreamResponse(stream, consumer, fmt, batch, the_relay.settings)

    @app.post("/streams/{name}", dependencies=auth, tags=["streams"])
    async def upload(name: str) -> Response:
        """Producer upload: the body is frames (`data`…, then optionally `end` or `error`).

        Creates the stream with defaults if missing. Answers `{accepted, items,
        next_seq}`; on a bad frame, the 4xx names the frame index and the reason, and
        the frames before it stay accepted.
        """
        stream = registry.get_or_create(check_name(name))
        if stream.finished:
            raise StreamClosed(f"stream {name!r} has finished", stream_name=name)
        return UploadResponse(stream, the_relay.settings)

    return app


def _error_body(exc: BaseException, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    for attr in ("frame_index", "key", "stream_name"):
        value = getattr(exc, attr, None)
        if value is not None:
            body[attr] = value
    body.update(extra)
    return body


def _format_from_accept(accept: str) -> str:
    for fmt, media in FORMATS.items():
        if fmt != "msgpack" and media in accept:
            return fmt
    return "msgpack"


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
    """Split `(seq, item)` pairs (consecutive seqs) into runs of up to `limit` arrays
    of one dtype and shape (lists), or `Block`s of up to `limit` rows; any other item
    is a run of its own."""
    runs: list[tuple[int, Any]] = []
    layout: Any = None
    current: list[Any] = []
    for seq, item in items:
        if type(item) is Block:
            array = item.array
            runs += [(seq + i, Block(array[i : i + limit])) for i in range(0, len(array), limit)]
            layout = None
            continue
        key = (item.dtype, item.shape) if type(item) is np.ndarray else None
        if key is None or key != layout or len(current) >= limit:
            current = [item]
            runs.append((seq, current))
            layout = key
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
        self, stream: Stream, consumer: Consumer, fmt: str, batch: int, settings: Settings
    ) -> None:
        self.stream = stream
        self.consumer = consumer
        self.fmt = fmt
        self.batch = batch
        self.settings = settings
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", FORMATS[fmt].encode()), *_STREAM_HEADERS]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            watch = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                await asyncio.wait([pump, watch], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (pump, watch):
                    task.cancel()
                await asyncio.gather(pump, watch, return_exceptions=True)
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                raise pump.exception()  # type: ignore[misc]
        finally:
            self.consumer.close()

    async def _pump(self, send: Send) -> None:
        consumer = self.consumer
        heartbeat = self.settings.heartbeat_interval
        batch = self.batch
        take = max(4 * batch, 256) if self.fmt == "msgpack" else batch
        while True:
            got = consumer.take(take, _TAKE_BYTES)
            if got is None:
                try:
                    async with asyncio.timeout(heartbeat):
                        await consumer.wait()
                except TimeoutError:
                    await self._send_frames(send, [HeartbeatFrame()])
                continue
            if isinstance(got, Frame):
                await self._send_frames(send, [got], last=True)
                return
            await self._send_frames(send, got)

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
        if not frames or isinstance(frames[0], Frame):
            buffers = [encode_frame(f) for f in frames]
        elif self.batch > 1:
            buffers = _batched_buffers(frames, self.batch)
        else:
            buffers = encode_items(_rows(frames))
        buffers = _coalesce(buffers)
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


class UploadResponse(Response):
    """Reads an upload body frame by frame into a stream, then answers JSON.

    A frame is accepted whole or not at all. On a bad frame it answers the 4xx at once,
    then keeps reading (and discarding) the body for a bounded time, so the client gets
    the error instead of a connection reset.
    """

    def __init__(self, stream: Stream, settings: Settings) -> None:
        self.stream = stream
        self.settings = settings
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._stash: Any = None  # a body message read while waiting for room
        with self.stream.producing():
            await self._upload(scope, receive, send)

    async def _put(self, items: list[Any], receive: Receive) -> None:
        """Put `items`, waiting for room; while it waits, notice the client leaving.

        At most one body message is read ahead (kept for the upload loop), so a
        waiting upload holds no more than that in memory.
        """
        rest, room = self.stream.offer(items)
        while room is not None:
            try:
                if self._stash is None:
                    message = asyncio.ensure_future(receive())
                    await asyncio.wait([room, message], return_when=asyncio.FIRST_COMPLETED)
                    if message.done():
                        if message.result()["type"] == "http.disconnect":
                            raise _ClientGone
                        self._stash = message.result()
                    else:
                        message.cancel()
                if not room.done():
                    await room
            finally:
                self.stream.forget(room)
            rest, room = self.stream.offer(rest)

    async def _receive(self, receive: Receive) -> Any:
        message, self._stash = self._stash, None
        return message if message is not None else await receive()

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self.stream
        decoder = FrameDecoder(self.settings.max_frame_bytes)
        accepted = items = seen = 0
        finished = False
        pending: list[Any] = []  # items of accepted frames, put once per body message
        try:
            more = True
            while more:
                if pending:
                    await self._put(pending, receive)
                    pending = []
                message = await self._receive(receive)
                if message["type"] == "http.disconnect":
                    log.info(
                        "upload to %r: client went away after %d frames", stream.name, accepted
                    )
                    return
                more = message.get("more_body", False)
                decoder.feed(message.get("body", b""))
                for frame in decoder.frames():
                    index = seen
                    seen += 1
                    if finished:
                        raise _Refused(400, "frame after the end of the stream", index)
                    if isinstance(frame, DataFrame):
                        # a batched frame stays one block: its rows are the items
                        item = frame.data if frame.count is None else Block(frame.data)
                        try:
                            stream.check_item(item)
                        except NDRelayError as exc:
                            raise _Refused(exc.status_hint, str(exc), index) from None  # type: ignore[attr-defined]
                        pending.append(item)
                        items += 1 if frame.count is None else frame.count
                    elif isinstance(frame, EndFrame | ErrorFrame):
                        await self._put(pending, receive)
                        pending = []
                        stream.finish(frame)
                        finished = True
                    else:
                        continue  # heartbeat
                    accepted += 1
            await self._put(pending, receive)
            pending = []
            decoder.feed_eof()
        except (ProtocolError, _Refused) as exc:
            # the frames accepted before the bad one are kept
            try:
                await self._put(pending, receive)
            except StreamClosed:
                pass
            if isinstance(exc, _Refused):
                await self._refuse(receive, send, exc.status, exc.reason, exc.index, accepted, more)
                return
            await self._refuse(
                receive,
                send,
                exc.status_hint,
                exc.reason,
                exc.frame_index,
                accepted,
                more,
                getattr(exc, "key", None),
            )
            return
        except StreamClosed as exc:
            await self._refuse(receive, send, 409, str(exc), seen - 1, accepted, more)
            return
        except _ClientGone:
            log.info("upload to %r: client went away while the stream was full", stream.name)
            return
        body = {"accepted": accepted, "items": items, "next_seq": stream.info()["produced"]}
        await JSONResponse(body)(scope, receive, send)

    async def _refuse(
        self,
        receive: Receive,
        send: Send,
        status: int,
        reason: str,
        index: int | None,
        accepted: int,
        more: bool,
        key: str | None = None,
    ) -> None:
        body: dict[str, Any] = {
            "error": "upload refused",
            "message": f"frame {index}: {reason}" if index is not None else reason,
            "frame_index": index,
            "reason": reason,
            "accepted": accepted,
            "next_seq": self.stream.info()["produced"],
        }
        if key is not None:
            body["key"] = key
        log.info("upload to %r refused: %s", self.stream.name, body["message"])
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send(
            {"type": "http.response.body", "body": json.dumps(body).encode(), "more_body": more}
        )
        if not more:
            return
        try:
            async with asyncio.timeout(self.settings.upload_drain_seconds):
                while True:
                    message = await self._receive(receive)
                    if message["type"] == "http.disconnect" or not message.get("more_body", False):
                        break
        except TimeoutError:
            pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _ClientGone(Exception):
    """The uploading client disconnected."""


class _Refused(Exception):
    def __init__(self, status: int, reason: str, index: int | None) -> None:
        self.status = status
        self.reason = reason
        self.index = index
