"""The acknowledgement endpoint's response: one JSON ack, or a long-lived body of them.

`POST /streams/{name}/ack` takes `{"consumer": id, "upto": seq, "release": bool}`. A body
may hold several such objects, one per line (`application/x-ndjson`), and may keep coming:
each is applied as soon as its line arrives, so a client acknowledges as it goes over one
request instead of paying a request per acknowledgement. The answer, at the end of the
body, adds them up; at the first bad one it answers the error at once.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .._exceptions import NDRelayError
from ..registry import CONSUMER_PATTERN, Stream

__all__ = ["AckResponse"]

#: Longest acknowledgement line accepted.
_MAX_LINE = 4096


class AckResponse(Response):
    """Applies the acknowledgements of a request body as they arrive, then answers JSON."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        totals = {"acked": 0, "released": 0, "pending": 0, "acks": 0}
        buffer = b""
        more = True
        try:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # what arrived was applied; nobody waits for the answer
                more = message.get("more_body", False)
                buffer += message.get("body", b"")
                *lines, buffer = buffer.split(b"\n")
                if not more:
                    lines.append(buffer)
                    buffer = b""
                if len(buffer) > _MAX_LINE:
                    raise _BadAck(f"an acknowledgement line is over {_MAX_LINE} bytes")
                for line in lines:
                    if line.strip():
                        await self._apply(line, totals)
        except _BadAck as exc:
            await self._answer(scope, receive, send, 400, _body("BadAck", str(exc), totals), more)
            return
        except NDRelayError as exc:
            body = _body(type(exc).__name__, str(exc), totals)
            for attr in ("consumer", "seq", "stream_name"):
                value = getattr(exc, attr, None)
                if value is not None:
                    body[attr] = value
            status = getattr(exc, "status_hint", 400)
            await self._answer(scope, receive, send, status, body, more)
            return
        if totals["acks"] == 0:
            body = _body(
                "BadAck", 'the body holds no acknowledgement: {"consumer", "upto"}', totals
            )
            await self._answer(scope, receive, send, 400, body, False)
            return
        await JSONResponse(totals)(scope, receive, send)

    async def _apply(self, line: bytes, totals: dict[str, int]) -> None:
        try:
            ack = json.loads(line)
        except ValueError as exc:
            raise _BadAck(f"not JSON: {exc}") from None
        if not isinstance(ack, dict):
            raise _BadAck("an acknowledgement is a JSON object")
        unknown = set(ack) - {"consumer", "upto", "release"}
        if unknown:
            raise _BadAck(f"unknown keys {sorted(unknown)}: use consumer, upto, release")
        consumer = ack.get("consumer")
        if not isinstance(consumer, str) or not CONSUMER_PATTERN.fullmatch(consumer):
            raise _BadAck("consumer must be an id of 1-64 characters from A-Z a-z 0-9 . _ -")
        upto = ack.get("upto")
        if type(upto) is float and upto.is_integer():  # JSON's integer: 5.0 is 5
            upto = int(upto)
        if upto is not None and (type(upto) is not int or upto < -1):
            raise _BadAck(f"upto must be a seq (an integer, -1 or more) or null, got {upto!r}")
        release = ack.get("release", False)
        if type(release) is not bool:
            raise _BadAck(f"release must be true or false, got {release!r}")
        if upto is None and not release:
            raise _BadAck("upto is missing (it may be left out only with release: true)")
        result = await self.stream.ack(consumer, upto, release)
        totals["acked"] += result["acked"]
        totals["released"] += result["released"]
        totals["pending"] = result["pending"]
        totals["acks"] += 1

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, status: int, body: Any, more: bool
    ) -> None:
        response = JSONResponse(body, status_code=status, headers={"connection": "close"})
        await response(scope, receive, send)


def _body(error: str, message: str, totals: dict[str, int]) -> dict[str, Any]:
    return {"error": error, "message": message, **totals}


class _BadAck(Exception):
    """A malformed acknowledgement (400)."""
