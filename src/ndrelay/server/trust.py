"""Which browsers and host names the relay trusts: writes from foreign web pages are refused
when no token guards the relay, and `Host` headers can be restricted (DNS rebinding)."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlsplit

from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["TrustedHosts", "WriteOrigins"]

log = logging.getLogger("ndrelay.server")

_READS = frozenset({"GET", "HEAD", "OPTIONS"})


class WriteOrigins:
    """Refuses (403) a write (any method but GET/HEAD/OPTIONS) that a web page of another
    origin sent, unless `allowed` lists that origin (or `*`), while no token is set.

    Any page a user visits may POST `text/plain` to `http://localhost:8000` without a
    CORS preflight; the browser adds `Origin`. Clients that are not browsers send no
    `Origin` and are not affected; nor is a page the relay serves itself (same origin).
    With a token set, a foreign page cannot authenticate, so the token is the guard.
    """

    def __init__(self, app: ASGIApp, allowed: list[str], token: Any) -> None:
        self.app = app
        self.allowed = set(allowed)
        self.token = token  # a callable: the token now (settings may change after start)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _READS and self.token() is None:
            origin = _header(scope, b"origin")
            if origin is not None and not self._allowed(origin, scope):
                await _refuse(send, origin, scope)
                return
        await self.app(scope, receive, send)

    def _allowed(self, origin: str, scope: Scope) -> bool:
        if "*" in self.allowed or origin in self.allowed:
            return True
        parts = urlsplit(origin)
        host = _header(scope, b"host")
        return (
            host is not None
            and parts.scheme == scope.get("scheme", "http")
            and (parts.netloc.lower() == host.lower())
        )


async def _refuse(send: Send, origin: str, scope: Scope) -> None:
    message = (
        f"{scope['method']} from a page of origin {origin[:200]!r} refused: with no token "
        "set, only the relay's own pages and --cors-origin origins may write"
    )
    log.warning("refused a cross-origin %s to %s from %s", scope["method"], scope["path"], origin)
    body = json.dumps({"error": "Forbidden", "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class TrustedHosts:
    """Starlette's `TrustedHostMiddleware` (400 for another `Host`), but `/healthz` answers
    whatever the `Host`, so container health checks keep working."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app = app
        self.checked = TrustedHostMiddleware(app, allowed_hosts=allowed_hosts, www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/healthz":
            await self.app(scope, receive, send)
        else:
            await self.checked(scope, receive, send)
