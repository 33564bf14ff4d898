"""The producer's upload: a request body of frames read into a stream, answered in JSON."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import numpy as np
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .._codec import FrameDecoder
from .._exceptions import NDRelayError, ProtocolError, SeqGap, StreamClosed
from .._frames import DataFrame, EndFrame, ErrorFrame
from ..registry import Block, Stream
from .errors import error_body
from .protocol import RECEIVE_EXTENSION
from .relay import Settings

__all__ = ["UploadResponse"]

log = logging.getLogger("ndrelay.server")


class UploadResponse(Response):
    """Reads an upload body frame by frame into a stream, then answers JSON.

    A frame is accepted whole or not at all. On a bad frame it answers the 4xx at once,
    then keeps reading (and discarding) the body for a bounded time, so the client gets
    the error instead of a connection reset. A body that sends no byte for
    `settings.upload_idle_timeout` seconds is answered 408 (the frames before are kept).

    With a `producer` id (DESIGN.md §5) data frames are numbered in the producer's own
    sequence: below the seq the relay expects from it, a frame is a duplicate and skipped
    (counted in `duplicates`); above it, the upload stops with 409 naming `expected_seq`.
    A frame without `seq` is the next one. An empty body just asks where it stands.
    `on_done(accepted)` is called when the upload is over, the stream no longer counting
    it as a producer.
    """

    def __init__(
        self,
        stream: Stream,
        settings: Settings,
        producer: str | None = None,
        on_done: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.stream = stream
        self.settings = settings
        self.producer = producer
        self.status_code = 200
        self.background = None
        self._claim = 0
        self._duplicates = 0
        self._index: list[int] = []  # frame index of each pending item (producer uploads)
        self._on_done = on_done
        self._accepted = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._stash: Any = None  # a body message read while waiting for room
        # `VectoredHttpProtocol` (how `ndrelay serve` runs uvicorn) hands the body over
        # in the pieces it was parsed in, not joined into one copy per message
        receive = scope.get("extensions", {}).get(RECEIVE_EXTENSION, receive)
        try:
            if self.producer is not None:
                self._claim, _ = await self.stream.claim_producer(self.producer)
            async with self.stream.aproducing():
                await self._upload(scope, receive, send)
        finally:
            if self._on_done is not None:
                await self._on_done(self._accepted)

    async def _offer(self, items: list[Any]) -> tuple[list[Any], Any]:
        if self.producer is None:
            return await self.stream.aoffer(items)
        before = len(items)
        try:
            rest, room, dups = await self.stream.aoffer_seq(self.producer, self._claim, items)
        except SeqGap as exc:
            index = self._index[before - len(items) + exc.index]  # type: ignore[attr-defined]
            raise _Refused(409, str(exc), index, exc.expected_seq) from None
        self._duplicates += dups
        del self._index[: before - len(rest)]
        return rest, room

    async def _expected(self) -> int | None:
        if self.producer is None:
            return None
        return await self.stream.producer_position(self.producer)

    async def _put(self, items: list[Any], receive: Receive) -> None:
        """Put `items`, waiting for room; while it waits, notice the client leaving.

        At most one body message is read ahead (kept for the upload loop), so a
        waiting upload holds no more than that in memory.
        """
        for start in range(0, max(len(items), 1), _OFFER_ITEMS):  # (an empty one too)
            await self._put_some(items[start : start + _OFFER_ITEMS], receive)

    async def _put_some(self, items: list[Any], receive: Receive) -> None:
        rest, room = await self._offer(items)
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
            rest, room = await self._offer(rest)

    async def _receive(self, receive: Receive) -> Any:
        message, self._stash = self._stash, None
        return message if message is not None else await receive()

    async def _receive_body(self, receive: Receive) -> Any:
        """The next body message; `_Idle` if none comes within the idle timeout."""
        idle = self.settings.upload_idle_timeout
        if self._stash is not None or not idle:
            return await self._receive(receive)
        try:
            async with asyncio.timeout(idle):
                return await receive()
        except TimeoutError:
            raise _Idle from None

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self.stream
        decoder = FrameDecoder(
            self.settings.max_frame_bytes, self.settings.max_text_bytes, seq_optional=True
        )
        named = self.producer is not None
        accepted = items = seen = 0
        finished = False
        pending: list[Any] = []  # items of accepted frames, put once per body message
        try:
            more = True
            while more:
                if pending:  # (emptied first: a refusal while putting keeps what was put)
                    batch, pending = pending, []
                    await self._put(batch, receive)
                message = await self._receive_body(receive)
                if message["type"] == "http.disconnect":
                    log.info(
                        "upload to %r: client went away after %d frames", stream.name, accepted
                    )
                    return
                more = message.get("more_body", False)
                pieces = message.get("chunks") or (message.get("body", b""),)
                for frame in _frames_of(decoder, pieces):
                    index = seen
                    seen += 1
                    if finished:
                        raise _Refused(400, "frame after the end of the stream", index)
                    if isinstance(frame, DataFrame):
                        # a batched frame stays one block: its rows are the items
                        data = frame.data
                        item = data if frame.count is None else Block(cast(np.ndarray, data))
                        try:
                            stream.check_item(item)
                        except NDRelayError as exc:
                            raise _Refused(exc.status_hint, str(exc), index) from None  # type: ignore[attr-defined]
                        if named:
                            pending.append((frame.seq, item))
                            self._index.append(index)
                        else:
                            pending.append(item)
                        items += 1 if frame.count is None else frame.count
                    elif isinstance(frame, EndFrame | ErrorFrame):
                        batch, pending = pending, []
                        await self._put(batch, receive)
                        await stream.afinish(frame)
                        finished = True
                    else:
                        continue  # heartbeat
                    accepted += 1
                    self._accepted = accepted
            batch, pending = pending, []
            await self._put(batch, receive)
            decoder.feed_eof()
        except (ProtocolError, _Refused) as exc:
            # the frames accepted before the bad one are kept
            try:
                await self._put(pending, receive)
            except (StreamClosed, _Refused, _ClientGone):
                pass  # the first refusal is the one to report
            if isinstance(exc, _Refused):
                if exc.index is not None and self.producer is not None:
                    accepted = min(accepted, exc.index)  # frames from the gap on were not
                await self._refuse(
                    receive, send, exc.status, exc.reason, exc.index, accepted, more, exc.expected
                )
                return
            await self._refuse(
                receive,
                send,
                exc.status_hint,
                exc.reason,
                exc.frame_index,
                accepted,
                more,
                key=getattr(exc, "key", None),
            )
            return
        except StreamClosed as exc:
            await self._refuse(receive, send, 409, str(exc), seen - 1, accepted, more)
            return
        except _ClientGone:
            log.info("upload to %r: client went away while the stream was full", stream.name)
            return
        except _Idle:
            await self._put(pending, receive)
            idle = self.settings.upload_idle_timeout
            reason = f"no body byte for {idle:g} s (upload idle timeout)"
            await self._refuse(receive, send, 408, reason, None, accepted, False)
            return
        body: dict[str, Any] = {
            "accepted": accepted,
            "items": items - self._duplicates,
            "next_seq": (await stream.ainfo())["produced"],
            "duplicates": self._duplicates,
        }
        if self.producer is not None:
            body["producer"] = self.producer
            body["expected_seq"] = await self._expected()
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
        expected: int | None = None,
        key: str | None = None,
    ) -> None:
        body = error_body(
            "UploadRefused",
            f"frame {index}: {reason}" if index is not None else reason,
            stream_name=self.stream.name,
            frame_index=index,
            key=key,
            reason=reason,
            accepted=accepted,
            next_seq=(await self.stream.ainfo())["produced"],
            duplicates=self._duplicates,
        )
        if self.producer is not None:
            body["producer"] = self.producer
            body["expected_seq"] = await self._expected() if expected is None else expected
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


def _frames_of(decoder: FrameDecoder, pieces: Any) -> Any:
    """The frames completed by each piece of body in turn (a bad piece cannot hide the
    good frames before it)."""
    for piece in pieces:
        decoder.feed(piece)
        yield from decoder.frames()


#: Items offered to the stream at a time: what a full stream leaves over is handed back
#: as a new list, so a body message of many small items (the read-ahead holds up to
#: 4 MiB) is offered in pieces, not copied whole at every wait for room.
_OFFER_ITEMS = 1024


class _Idle(Exception):
    """The upload's body sent nothing within the idle timeout."""


class _ClientGone(Exception):
    """The uploading client disconnected."""


class _Refused(Exception):
    def __init__(
        self, status: int, reason: str, index: int | None, expected: int | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.index = index
        self.expected = expected
