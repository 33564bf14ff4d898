"""The HTTP API (DESIGN.md §3): `create_app(relay)` builds the FastAPI application and its routes;
the streaming responses live in `consume` (readers) and `upload` (producers)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from .._codec import (
    MEDIA_TYPE,
    encode_frame,
)
from .._exceptions import (
    AckConflict,
    AuthError,
    ConsumerNotFound,
    StreamClosed,
    StreamConflict,
    StreamNotFound,
)
from .._frames import DataFrame
from .._version import __version__
from ..registry import POLICIES, Registry, Stream, StreamSpec, check_name
from .ack import AckResponse
from .apidocs import install_docs
from .consume import FrameStreamResponse
from .dashboard import add_dashboard
from .errors import CORS, error_body, install_error_handlers
from .expiry import Expiry
from .formats import FORMATS, ndjson_line
from .metrics import metrics_response
from .openapi import (
    DTYPE_PATTERN,
    NameParam,
    ack_responses,
    consume_responses,
    create_responses,
    declare_limits,
    delete_responses,
    info_responses,
    latest_responses,
    list_responses,
    metrics_responses,
    upload_body,
    upload_responses,
)
from .rates import RateMeter
from .redact import SecretRedactor
from .relay import Relay, Settings, check_origin
from .trust import TrustedHosts, WriteOrigins
from .upload import UploadResponse

__all__ = ["create_app"]


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
nested lists, bytes as base64 with `"encoding": "base64"`). In SSE, an `error` frame
is `event: stream-error` (EventSource's own `error` event means a dropped connection).
"""


#: `?consumer=` and `?producer=` ids (DESIGN.md §5).
ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


async def _get_stream(request: Request, name: NameParam) -> Stream:
    relay: Relay = request.app.state.relay
    return await relay.registry.get_stream(name)


StreamDep = Annotated[Stream, Depends(_get_stream)]


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: `64` or `64.0`, never `true` or `"64"`."""
    if isinstance(value, bool | str):
        raise ValueError(f"must be an integer, got {value!r}")
    return value


#: Integer fields of a JSON body, as the schema says (pydantic's lax mode would take
#: `true` as 1 and `"64"` as 64); the bounds go before the validator, or the schema
#: would not show them.
JsonInt = Annotated[int, BeforeValidator(_json_integer)]
PositiveInt = Annotated[int, Field(ge=1), BeforeValidator(_json_integer)]
Dimension = Annotated[int, Field(ge=0), BeforeValidator(_json_integer)]


def _dtype_name(value: str) -> str:
    if not re.fullmatch(DTYPE_PATTERN, value):
        raise ValueError(
            f"unsupported dtype {value[:64]!r}: use numpy's dtype.str of a number, boolean, "
            "datetime or fixed-size string type (<f4, |u1, <M8[ns], <U8) or its common name "
            "(float32, uint8, datetime64[ns])"
        )
    return value


#: A dtype of a stream definition: the schema's pattern, checked with a message that
#: names the refused value.
DtypeName = Annotated[
    str, AfterValidator(_dtype_name), Field(json_schema_extra={"pattern": DTYPE_PATTERN})
]


class CreateStream(BaseModel):
    """Definition of a stream for `PUT /streams/{name}`."""

    # a misspelt key (`max_byte`) must not silently give a stream other bounds
    model_config = ConfigDict(extra="forbid")

    size: JsonInt = Field(64, ge=1, le=1_000_000, description="most items buffered")
    max_bytes: PositiveInt | None = Field(None, description="most payload bytes buffered")
    mode: Literal["queue", "fanout"] = "queue"
    dtype: DtypeName | None = Field(
        None,
        description="dtype every array must have: numpy's dtype.str (`<f4`) or a common "
        "name (`float32`, `uint8`, `datetime64[ns]`); "
        "answered as the canonical dtype.str",
        examples=["float32", "<f4", "uint8"],
    )
    shape: Annotated[list[Dimension], Field(max_length=32)] | None = Field(
        None, description="shape every array must have"
    )


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
    expiry = Expiry(registry, relay.settings.stream_ttl)

    rates = RateMeter()

    async def all_infos() -> list[dict[str, Any]]:
        return [await s.ainfo() for s in await registry.list_streams()]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # uvicorn has set its logging up by now; from here the token never reaches a log
        redactor = SecretRedactor(lambda: the_relay.settings.token)
        redactor.install()
        await registry.start()
        sampler = asyncio.ensure_future(rates.run(all_infos))
        sweeper = asyncio.create_task(expiry.run(lambda: the_relay.closed))
        try:
            yield
        finally:
            redactor.uninstall()
            sampler.cancel()
            sweeper.cancel()
            await asyncio.gather(sampler, sweeper, return_exceptions=True)
            await asyncio.to_thread(the_relay.close)  # joins producer threads: not on the loop
            await registry.aclose()

    app = FastAPI(
        title="ndrelay",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # served by install_docs: Swagger UI from the package, behind the token
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # operation ids are the handlers' names (`consume`, `upload`, ...), for clients
        # generated from /openapi.json
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.relay = relay
    app.add_middleware(
        WriteOrigins,
        allowed=relay.settings.cors_origins,
        token=lambda: the_relay.settings.token,
    )
    if relay.settings.cors_origins:
        app.add_middleware(
            CORS,
            allow_origins=[check_origin(o) for o in relay.settings.cors_origins],
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["authorization", "content-type", "last-event-id"],
            expose_headers=["ndrelay-consumer"],
        )
    if relay.settings.allowed_hosts:
        app.add_middleware(TrustedHosts, allowed_hosts=relay.settings.allowed_hosts)

    def expiring(stream: Stream, info: dict[str, Any]) -> dict[str, Any]:
        """A stream's `info` with its expiry: `ttl` (seconds, or None), and `expires_in`
        (seconds left while nobody uses it, else None)."""
        ttl = expiry.ttl
        info["ttl"] = ttl if ttl > 0 else None
        info["expires_in"] = expiry.expires_in(stream, info=info)
        return info

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

    install_error_handlers(app, registry.unavailable)
    install_docs(app, auth, public=relay.settings.public_docs)
    declare_limits(app, lambda: the_relay.settings.max_memory)

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, str]:
        """Liveness; needs no token."""
        return {"status": "ok", "version": __version__}

    @app.get(
        "/metrics",
        dependencies=auth,
        tags=["service"],
        response_class=Response,
        responses=metrics_responses,
    )
    async def metrics() -> Response:
        """Prometheus text format."""
        return await metrics_response(registry)

    @app.get("/streams", dependencies=auth, tags=["streams"], responses=list_responses)
    async def list_streams(response: Response) -> list[dict[str, Any]]:
        """Info of every stream, with its recent rates. Headers `ndrelay-memory-bytes` and
        `ndrelay-memory-limit`: the payload bytes buffered over all streams, and the bound
        on them."""
        budget = registry.budget
        if budget is not None:
            response.headers["ndrelay-memory-bytes"] = str(budget.used)
            response.headers["ndrelay-memory-limit"] = str(budget.limit)
        streams = list(await registry.list_streams())
        infos = [await s.ainfo() for s in streams]
        rates.sample(infos)
        return [expiring(s, rates.annotate(i)) for s, i in zip(streams, infos, strict=True)]

    @app.put(
        "/streams/{name}",
        dependencies=auth,
        tags=["streams"],
        status_code=201,
        response_class=JSONResponse,
        responses=create_responses,
    )
    async def create_stream(name: NameParam, body: CreateStream) -> JSONResponse:
        """Create a stream: 201, or 200 if it exists identically, 409 if differently."""
        args = body.model_dump(exclude_none=True)
        if "shape" in args:
            args["shape"] = tuple(args["shape"])
        limit = the_relay.settings.max_memory
        if args.get("max_bytes", 0) > limit:
            raise ValueError(
                f"max_bytes {args['max_bytes']} is over the relay's memory bound of {limit} "
                "bytes (--max-memory)"
            )
        stream, created = await registry.create_stream(check_name(name), StreamSpec(**args))
        info = await stream.ainfo()
        return JSONResponse(expiring(stream, info), status_code=201 if created else 200)

    @app.get("/streams/{name}/info", dependencies=auth, tags=["streams"], responses=info_responses)
    async def stream_info(stream: StreamDep) -> dict[str, Any]:
        """Definition, state (`open`/`ended`/`failed`), counters, recent rates and expiry of
        one stream."""
        info = await stream.ainfo()
        rates.sample([info], complete=False)
        return expiring(stream, rates.annotate(info))

    @app.delete(
        "/streams/{name}",
        dependencies=auth,
        tags=["streams"],
        status_code=204,
        response_class=Response,
        responses=delete_responses,
    )
    async def delete_stream(name: NameParam) -> Response:
        """Delete a stream; its consumers get a `relay` error frame."""
        await registry.delete_stream(name)
        return Response(status_code=204)

    @app.get(
        "/streams/{name}/latest",
        dependencies=auth,
        tags=["streams"],
        response_class=Response,
        responses=latest_responses,
    )
    async def latest(
        stream: StreamDep, format: Literal["msgpack", "ndjson"] = "msgpack"
    ) -> Response:
        """The newest buffered item as one frame, without consuming it; 204 if none."""
        newest = await stream.alatest()
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
        responses=consume_responses,
    )
    async def consume(
        request: Request,
        name: NameParam,
        format: Literal["msgpack", "ndjson", "sse"] | None = None,
        batch: Annotated[int, Query(ge=1, le=65536)] = 1,
        policy: Literal["block", "drop_oldest", "latest"] = "block",
        consumer: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
        after: Annotated[int | None, Query(ge=-1)] = None,
        lease: Annotated[float | None, Query(ge=0, le=86400)] = None,
        last_event_id: Annotated[
            str | None,
            Header(
                alias="last-event-id",
                description="SSE: the seq of the last event the browser got (it sends "
                "this header when it reconnects)",
            ),
        ] = None,
    ) -> Response:
        """Stream the frames of `name` until its `end` or `error` frame.

        `format` picks msgpack (default), ndjson or sse (also chosen by `Accept`);
        `batch=N` lets the server stack up to N equal-shaped arrays into one batched
        frame; `policy` is what happens when a fanout consumer falls behind.

        Queue mode: with `consumer=<id>`, every item stays pending for that id until
        acknowledged (`POST /streams/{name}/ack`); when the connection ends, its pending
        items wait `lease` seconds (default: the server's `--lease`) for the id to come
        back, then return to the front of the queue. Coming back with `after=<seq>` (the
        last seq received) gets the pending items after it first. Without `consumer`, the
        relay assigns an id and acknowledges each item once it is written. Fanout:
        `after=<seq>` replays the retained items after it. The response header
        `ndrelay-consumer` names the id.

        SSE: a browser's reconnect carries `Last-Event-ID`, the seq of the last event it
        got: it stands for `after` (queue mode with `consumer`: it also acknowledges that
        consumer's items up to it). At or past the terminal frame, or for a stream
        deleted since, the answer is 204, so that EventSource stops.
        """
        fmt = format or _format_from_accept(request.headers.get("accept", ""))
        seen = _last_event_id(last_event_id) if fmt == "sse" else None
        try:
            stream = await registry.get_stream(name)
        except StreamNotFound:
            if seen is not None:
                return Response(status_code=204)  # deleted since the browser's last event
            raise
        if seen is not None:
            info = await stream.ainfo()
            if info["state"] != "open" and seen >= info["produced"]:
                return Response(status_code=204)  # the browser has had the terminal frame
            if after is None:
                after = seen
            if consumer is not None and stream.spec.mode == "queue":
                with contextlib.suppress(AckConflict, ConsumerNotFound):
                    await stream.ack(consumer, seen)  # the browser's own receipt
        handle = await stream.aopen_consumer(
            policy if policy in POLICIES else "block",
            consumer=consumer,
            after=after,
            lease=the_relay.settings.lease if lease is None else lease,
        )
        return FrameStreamResponse(
            stream, handle, fmt, batch, the_relay.settings, registry.unavailable
        )

    @app.post(
        "/streams/{name}/ack",
        dependencies=auth,
        tags=["streams"],
        response_class=JSONResponse,
        responses=ack_responses,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": _ACK_SCHEMA},
                    "application/x-ndjson": {"schema": {"type": "string"}},
                },
            }
        },
    )
    async def ack(stream: StreamDep) -> Response:
        """Acknowledge a queue consumer's items: `{"consumer": id, "upto": seq}`.

        Acknowledges the items delivered to `consumer` up to and including seq `upto`
        (in the order they were delivered); `"release": true` also gives back the rest
        of its pending items at once (to the front of the queue) and ends its connection.
        The body may hold one acknowledgement per line and keep coming (NDJSON): each is
        applied as its line arrives; the answer adds them up.
        """
        return AckResponse(stream)

    @app.post(
        "/streams/{name}",
        dependencies=auth,
        tags=["streams"],
        response_class=JSONResponse,
        responses=upload_responses,
        openapi_extra=upload_body,
    )
    async def upload(
        name: NameParam, producer: Annotated[str | None, Query(pattern=ID_PATTERN)] = None
    ) -> Response:
        """Producer upload: the body is frames (`data`…, then optionally `end` or `error`).

        Creates the stream with defaults if missing. `seq` is optional on every frame.
        Answers `{accepted, items, next_seq, duplicates}`; on a bad frame, the 4xx names
        the frame index and the reason, and the frames before it stay accepted.

        With `producer=<id>`, the data frames are numbered 0, 1, 2, ... in that
        producer's own sequence, so a retried upload is safe: frames below the seq the
        relay expects from it are skipped (`duplicates`), a frame above it is 409 naming
        `expected_seq`. The answer adds `expected_seq`; an empty body just asks for it.
        """
        try:
            stream, created = await registry.get_stream(check_name(name)), False
        except StreamNotFound:
            try:
                stream, created = await registry.create_stream(name, StreamSpec())
            except StreamConflict:  # created meanwhile, by another request
                stream, created = await registry.get_stream(name), False
        state = (await stream.ainfo())["state"]
        if state != "open":
            exc = StreamClosed.finished(name, state)
            if producer is None:
                raise exc
            body = error_body(type(exc).__name__, str(exc), stream_name=name)
            body["producer"] = producer
            body["expected_seq"] = await stream.producer_position(producer)
            return JSONResponse(body, status_code=409)

        async def forget_if_unused(accepted: int) -> None:
            # A stream this upload created stays only if something came of it: a refused
            # or empty upload must not take a stream slot.
            state = await stream.ainfo()
            if created and not accepted and not state["produced"] and state["state"] == "open":
                if not state["producers"] and not state["consumers"]:
                    try:
                        await registry.delete_stream(name, "upload accepted nothing")
                    except StreamNotFound:
                        pass

        return UploadResponse(stream, the_relay.settings, producer, forget_if_unused)

    add_dashboard(app, auth)
    return app


_ACK_SCHEMA = {
    "type": "object",
    "required": ["consumer"],
    "additionalProperties": False,
    "properties": {
        "consumer": {"type": "string", "pattern": ID_PATTERN},
        "upto": {"type": ["integer", "null"], "minimum": -1},
        "release": {"type": "boolean", "default": False},
    },
    # `upto` may be left out (or null) only with `release: true`
    "anyOf": [
        {"required": ["upto"], "properties": {"upto": {"type": "integer"}}},
        {"required": ["release"], "properties": {"release": {"const": True}}},
    ],
}


def _last_event_id(value: str | None) -> int | None:
    """The seq in an SSE `Last-Event-ID` header (the `id:` of an event the relay sent)."""
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > 20:
        raise ValueError(f"Last-Event-ID must be a seq (a non-negative integer), got {value!r}")
    return int(value)


def _format_from_accept(accept: str) -> str:
    for fmt, media in FORMATS.items():
        if fmt != "msgpack" and media in accept:
            return fmt
    return "msgpack"
