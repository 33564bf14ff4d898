"""What `/openapi.json` declares beyond the routes' signatures: every status, content type
and header the server really answers with, so generated clients and API fuzzers agree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, Path
from pydantic import BaseModel, ConfigDict, Field

from ..registry import NAME_PATTERN
from .errors import ErrorBody
from .formats import FORMATS

__all__ = [
    "DTYPE_PATTERN",
    "ack_responses",
    "NameParam",
    "StreamInfo",
    "UploadResult",
    "consume_responses",
    "declare_limits",
    "create_responses",
    "delete_responses",
    "info_responses",
    "latest_responses",
    "list_responses",
    "metrics_responses",
    "upload_body",
    "upload_responses",
]

#: The `name` path parameter: its pattern is declared, so schema-valid names are accepted.
#: The handlers check it (`check_name`: 422 saying the rule), not FastAPI.
NameParam = Annotated[
    str,
    Path(
        json_schema_extra={"pattern": f"^{NAME_PATTERN.pattern}$"},
        description="stream name: 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit",
        examples=["radar"],
    ),
]


_UNIT = r"(?:\[(?:[1-9][0-9]{0,3})?(?:Y|M|W|D|h|m|s|ms|us|ns|ps|fs|as)\])?"
#: The dtypes `PUT /streams/{name}` takes: numpy's `dtype.str` of a type the wire carries
#: (`<f4`, `|u1`, `<M8[ns]`, `<U16`), or its common name (`float32`, `uint8`, ...).
DTYPE_PATTERN = (
    r"^(?:[<>|=]?(?:b1|[iu][1248]|f[248]|c(?:8|16)|[mM]8" + _UNIT + r"|[SU][1-9][0-9]{0,4})"
    r"|bool|u?int(?:8|16|32|64)|float(?:16|32|64)|complex(?:64|128)"
    r"|(?:datetime|timedelta)64" + _UNIT + r")$"
)


class StreamInfo(BaseModel):
    """Definition, state and counters of one stream."""

    model_config = ConfigDict(extra="allow")

    name: str
    mode: str = Field(description="`queue` or `fanout`")
    size: int
    max_bytes: int
    dtype: str | None
    shape: list[int] | None
    state: str = Field(description="`open`, `ended` or `failed`")
    depth: int = Field(description="items buffered")
    produced: int
    consumed: int
    dropped: int
    bytes: int = Field(description="payload bytes buffered")
    producers: int
    consumers: int
    ttl: float | None = Field(None, description="seconds a stream may stay unused (`--stream-ttl`)")
    expires_in: float | None = Field(
        None, description="seconds until it is removed if nobody uses it; null while in use"
    )


class UploadResult(BaseModel):
    """The answer to an upload that was taken whole."""

    model_config = ConfigDict(extra="allow")

    accepted: int = Field(description="frames accepted (data, end and error frames)")
    items: int = Field(description="items those frames held")
    next_seq: int = Field(description="the stream's next seq")


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


_AUTH: dict[int | str, dict[str, Any]] = {
    401: _error("missing or wrong bearer token (when the relay has one)")
}
_NAME: dict[int | str, dict[str, Any]] = {422: _error("invalid stream name or parameter")}
_MISSING: dict[int | str, dict[str, Any]] = {404: _error("no such stream")}
#: Writes from a web page of another origin, with no token set (`trust.WriteOrigins`).
_ORIGIN: dict[int | str, dict[str, Any]] = {
    403: _error("a write from a page of another origin while the relay has no token")
}
_FRAME_SCHEMA = {"type": "string", "format": "binary"}

metrics_responses: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text format",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    **_AUTH,
}
_MEMORY_HEADERS = {
    "ndrelay-memory-bytes": {
        "description": "payload bytes buffered over all streams",
        "schema": {"type": "integer"},
    },
    "ndrelay-memory-limit": {
        "description": "the bound on them (`--max-memory`)",
        "schema": {"type": "integer"},
    },
}
#: a registry on a backend that went away (Redis restarting)
_BACKEND: dict[int | str, dict[str, Any]] = {
    503: _error(
        "the stream backend (Redis) cannot be reached right now (`RegistryError`, with "
        "`Retry-After`)"
    )
}
_BACKEND_OR_FULL: dict[int | str, dict[str, Any]] = {
    503: _error(
        "too many streams, or the stream backend (Redis) cannot be reached right now "
        "(`RegistryError`)"
    )
}
list_responses: dict[int | str, dict[str, Any]] = {
    200: {"description": "info of every stream", "headers": _MEMORY_HEADERS},
    **_AUTH,
    **_BACKEND,
}
create_responses: dict[int | str, dict[str, Any]] = {
    200: {"model": StreamInfo, "description": "the stream exists with this definition"},
    201: {"model": StreamInfo, "description": "created"},
    400: _error("the body is not JSON"),
    409: _error("the stream exists with another definition"),
    **_AUTH,
    **_ORIGIN,
    **_NAME,
    422: _error("invalid stream name or parameter, or `max_bytes` over `--max-memory`"),
    **_BACKEND_OR_FULL,
}
info_responses: dict[int | str, dict[str, Any]] = {
    200: {"model": StreamInfo, "description": "the stream's info"},
    **_MISSING,
    **_AUTH,
    **_NAME,
    **_BACKEND,
}
delete_responses: dict[int | str, dict[str, Any]] = {
    **_MISSING,
    **_AUTH,
    **_ORIGIN,
    **_NAME,
    **_BACKEND,
}
latest_responses: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the newest buffered item as one data frame",
        "content": {
            FORMATS["msgpack"]: {"schema": _FRAME_SCHEMA},
            FORMATS["ndjson"]: {"schema": {"type": "string"}},
        },
    },
    204: {"description": "nothing buffered"},
    **_MISSING,
    **_AUTH,
    **_NAME,
    **_BACKEND,
}
consume_responses: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the stream's frames until its `end` or `error` frame",
        "content": {
            FORMATS["msgpack"]: {"schema": _FRAME_SCHEMA},
            FORMATS["ndjson"]: {"schema": {"type": "string"}},
            FORMATS["sse"]: {"schema": {"type": "string"}},
        },
        "headers": {"cache-control": {"schema": {"type": "string", "enum": ["no-cache"]}}},
    },
    204: {
        "description": "`format=sse` with a `Last-Event-ID` at or past the stream's terminal "
        "frame, or for a stream deleted since: nothing more to send (EventSource stops)"
    },
    **_MISSING,
    **_AUTH,
    **_NAME,
    **_BACKEND,
}
upload_responses: dict[int | str, dict[str, Any]] = {
    200: {"model": UploadResult, "description": "every frame of the body accepted"},
    400: _error("a malformed frame (those before it are kept: `accepted`)"),
    409: _error("the stream has finished, or a producer seq out of order"),
    408: _error("the body sent nothing for `--upload-idle-timeout` (frames before it kept)"),
    413: _error("a frame over the size limit"),
    **_AUTH,
    **_ORIGIN,
    422: _error("invalid stream name, or an array against the stream's dtype/shape"),
    **_BACKEND_OR_FULL,
}
ack_responses: dict[int | str, dict[str, Any]] = {
    200: {"description": "`{acked, released, pending, acks}`"},
    400: _error("a malformed acknowledgement"),
    404: _error(
        "no such stream (`StreamNotFound`), or a consumer the stream does not know "
        "(`ConsumerNotFound`: never connected, released, or its lease ran out)"
    ),
    409: _error("a seq never delivered to that consumer (`AckConflict`), or a fanout stream"),
    **_AUTH,
    **_ORIGIN,
    **_NAME,
    **_BACKEND,
}


def declare_limits(app: FastAPI, max_memory: Callable[[], int]) -> None:
    """Put the limits of this relay's settings into its `/openapi.json`: a stream's
    `max_bytes` is at most `--max-memory`."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            field = schema["components"]["schemas"]["CreateStream"]["properties"]["max_bytes"]
            for choice in field.get("anyOf", [field]):
                if choice.get("type") == "integer":
                    choice["maximum"] = max_memory()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


#: The upload's request body: msgpack frames, nothing between them.
upload_body: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "description": "msgpack frames (`data`..., then optionally `end` or `error`)",
        "content": {FORMATS["msgpack"]: {"schema": _FRAME_SCHEMA}},
    }
}
