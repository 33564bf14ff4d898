"""Error answers: one JSON shape for every error the server sends, validation included.

```json
{"error": "StreamNotFound", "message": "no stream named 'radar'", "stream_name": "radar"}
```

`error` is a stable, machine-readable name (an ndrelay exception class such as
`StreamNotFound`, `ValidationError` for bad parameters or bodies, `UploadRefused` for a
refused upload frame, `CORSRefused` for a refused cross-origin preflight, or the HTTP
status phrase in CamelCase, such as `NotFound` for an unknown path); `message` is one
line for a human. Some errors add context keys: `stream_name`, `frame_index`, `key`,
`reason`, `accepted`, `next_seq` (uploads) and `errors` (validation: one
`{loc, msg, type}` per problem).
"""

from __future__ import annotations

import http
import logging
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Match

from .._exceptions import NDRelayError
from ..registry import check_name

__all__ = ["CORS", "ErrorBody", "error_body", "install_error_handlers"]

log = logging.getLogger("ndrelay")

#: Context attributes of ndrelay exceptions that go into the body when set.
_CONTEXT = ("frame_index", "key", "stream_name", "consumer", "seq", "expected_seq")


class ErrorBody(BaseModel):
    """The body of every error answer (`application/json`)."""

    model_config = ConfigDict(extra="allow")

    error: str
    message: str


def error_body(error: str, message: str, **context: Any) -> dict[str, Any]:
    """An error answer's body: `error`, `message`, then the context keys that are set."""
    body: dict[str, Any] = {"error": error, "message": message}
    body.update({key: value for key, value in context.items() if value is not None})
    return body


def _exception_body(exc: BaseException) -> dict[str, Any]:
    context = {attr: getattr(exc, attr, None) for attr in _CONTEXT}
    return error_body(type(exc).__name__, str(exc), **context)


def _where(loc: tuple[Any, ...] | list[Any]) -> str:
    """Where a validation error is: `("query", "batch")` -> "query parameter 'batch'"."""
    place, *rest = [str(part) for part in loc] or ["request"]
    field = ".".join(rest)
    if place in ("query", "path", "header", "cookie"):
        return f"{place} parameter {field!r}" if field else place
    if place == "body":
        return f"body field {field!r}" if field else "body"
    return ".".join([place, *rest])


def _encoded_slash_name(request: Request) -> str | None:
    """The stream name of `/streams/a%2Fb...` (`"a/b"`), if the path has one."""
    raw = request.scope.get("raw_path") or b""
    if not raw.startswith(b"/streams/"):
        return None
    segment = raw[len(b"/streams/") :].split(b"/", 1)[0].split(b"?", 1)[0]
    if b"%2f" not in segment.lower():
        return None
    return unquote(segment.decode("latin-1"))


def _allowed_methods(request: Request) -> str:
    """Every method some route takes at this path: each route knows only its own, and
    a 405 must list them all (`Allow`)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI, unavailable: tuple[type[Exception], ...] = ()) -> None:
    """Answer every error of `app` with an `ErrorBody`; the `unavailable` errors (the
    registry's backend cannot be reached) with 503 `RegistryError`."""

    async def backend_unavailable(request: Request, exc: Exception) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        log.warning("%s: the stream backend is unreachable: %s", where, exc)
        message = f"the relay's stream backend is unreachable ({exc}); try again shortly"
        body = error_body("RegistryError", message)
        return JSONResponse(body, status_code=503, headers={"retry-after": "1"})

    for error in unavailable:
        app.add_exception_handler(error, backend_unavailable)

    @app.exception_handler(NDRelayError)
    async def ndrelay_error(request: Request, exc: NDRelayError) -> JSONResponse:
        status = getattr(exc, "status_hint", 400)
        headers = {"www-authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(_exception_body(exc), status_code=status, headers=headers)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(_exception_body(exc), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        message = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        body = error_body("ValidationError", message, errors=errors)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = http.HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "Error"
        name = "".join(word[:1].upper() + word[1:] for word in phrase.replace("-", " ").split())
        detail = exc.detail if isinstance(exc.detail, str) else phrase
        message = f"{detail}: {request.method} {request.url.path}"
        headers = exc.headers
        if exc.status_code == 404:
            bad_name = _encoded_slash_name(request)
            if bad_name is not None:  # no route matched only because of the decoded "/"
                try:
                    check_name(bad_name)
                except ValueError as invalid:
                    return JSONResponse(_exception_body(invalid), status_code=422)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return JSONResponse(error_body(name, message), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer; the client gets no internals.
        body = error_body("InternalError", f"internal server error ({type(exc).__name__})")
        return JSONResponse(body, status_code=500)


class CORS(CORSMiddleware):
    """Starlette's CORS middleware, with a refused preflight answered as an `ErrorBody`
    (`CORSRefused`) instead of plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        body = error_body(
            "CORSRefused",
            f"{bytes(response.body).decode()}: origin {request_headers.get('origin')!r}, "
            f"method {request_headers.get('access-control-request-method')!r}, headers "
            f"{request_headers.get('access-control-request-headers')!r}",
        )
        headers = {k: v for k, v in response.headers.items() if k.lower().startswith("access-")}
        return JSONResponse(body, status_code=response.status_code, headers=headers)
