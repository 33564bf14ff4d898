"""The producer's upload: a request body of frames read into a stream, answered in JSON."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .._codec import FrameDecoder
from .._exceptions import NDRelayError, ProtocolError, StreamClosed
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
    the error instead of a connection reset.
    """

    def __init__(self, stream: Stream, settings: Settings) -> None:
        self.stream = stream
        self.settings = settings
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._stash: Any = None  # a body message read while waiting for room
        # `VectoredHttpProtocol` (how `ndrelay serve` runs uvicorn) hands the body over
        # in the pieces it was parsed in, not joined into one copy per message
        receive = scope.get("extensions", {}).get(RECEIVE_EXTENSION, receive)
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
                pieces = message.get("chunks") or (message.get("body", b""),)
                for frame in _frames_of(decoder, pieces):
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
        body = error_body(
            "UploadRefused",
            f"frame {index}: {reason}" if index is not None else reason,
            stream_name=self.stream.name,
            frame_index=index,
            key=key,
            reason=reason,
            accepted=accepted,
            next_seq=self.stream.info()["produced"],
        )
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


class _ClientGone(Exception):
    """The uploading client disconnected."""


class _Refused(Exception):
    def __init__(self, status: int, reason: str, index: int | None) -> None:
        self.status = status
        self.reason = reason
        self.index = index
