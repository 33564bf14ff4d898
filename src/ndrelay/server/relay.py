"""`Relay`: the server's registry plus in-process producers, usable without HTTP."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._codec import DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_TEXT_SIZE
from .._exceptions import StreamClosed
from .._frames import EndFrame, ErrorFrame
from .._sizes import default_max_memory, parse_size
from ..registry import Block, MemoryRegistry, Registry, Stream, StreamSpec

__all__ = ["Relay", "Settings", "check_origin"]


def _env_flag(name: str) -> bool:
    """A boolean variable: 1/true/yes/on, or 0/false/no/off/empty."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {value!r}")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None


def _env_list(name: str) -> list[str]:
    """A comma-separated environment variable as a list, blanks dropped."""
    return [part.strip() for part in os.environ.get(name, "").split(",") if part.strip()]


def check_origin(origin: str) -> str:
    """`origin` if it is `*` or a browser origin (`scheme://host[:port]`, no path).

    Raises:
        ValueError: naming the origin and what an origin looks like.
    """
    if origin == "*" or re.fullmatch(r"https?://[^/\s?#]+", origin):
        return origin
    raise ValueError(
        f"CORS origin {origin!r} is not '*' or scheme://host[:port] "
        "(e.g. http://localhost:3000, no path or trailing slash)"
    )


def _env_size(name: str) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default_max_memory()
    return parse_size(value, name)


@dataclass
class Settings:
    """Server settings; `Settings.from_env()` reads the `NDRELAY_*` environment.

    Attributes:
        token: if set, every endpoint but `/healthz` wants `Authorization: Bearer <token>`.
        max_frame_bytes: largest frame accepted in an upload (413 beyond).
        max_streams: most streams at once.
        max_memory: most payload bytes buffered over all streams together; a producer
            that would pass it waits, as on a full stream (default: half the memory the
            process may use: its cgroup limit inside a container, else physical memory).
        heartbeat_interval: seconds of silence before a consumer gets a heartbeat frame.
        upload_drain_seconds: after refusing an upload, how long to keep reading (and
            discarding) its body so the client can read the error instead of a reset.
        cors_origins: origins whose pages may call the relay from a browser
            (`https://viz.example:8443`; `*` for any); none by default.
        public_docs: serve `/docs` and `/openapi.json` without the token.
        lease: seconds a departed queue consumer's pending (unacknowledged) items wait
            for its id to reconnect before they go back to the queue (`?lease=` per
            consumer).
        max_connections: most connections open at once; beyond it the oldest connection
            still waiting for its request is closed, or the newcomer answered 503 (default
            `None`: 1024, or less if the open-files limit is lower).
        max_header_bytes: largest request head (request line and headers); 431 beyond.
        header_timeout: seconds a connection has to send its request head; 408 after.
        upload_idle_timeout: seconds an upload may go without a byte before it is ended
            (408); the frames before are kept.
        max_text_bytes: longest string a frame may hold (an error's traceback, say).
        stream_ttl: seconds after which a finished stream, or an open one that is empty
            and has had no producer or consumer, is removed (0: never).
        allowed_hosts: `Host` header values served (`*.example.org` patterns); others get
            400. Empty: any (see the security notes on DNS rebinding).
        sse_retry: seconds a browser's EventSource waits before it reconnects, sent as
            `retry:` at the start of every SSE response.
        backend: where streams live: `memory` (this process), or `redis://host:port/db`
            or `unix:///path/redis.sock?db=N` (a Redis shared by every replica; the
            `redis` extra).
    """

    token: str | None = None
    max_frame_bytes: int = DEFAULT_MAX_FRAME_SIZE
    max_streams: int = 1024
    max_memory: int = field(default_factory=default_max_memory)
    heartbeat_interval: float = 15.0
    upload_drain_seconds: float = 10.0
    cors_origins: list[str] = field(default_factory=list)
    public_docs: bool = False
    lease: float = 10.0
    max_connections: int | None = None
    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    upload_idle_timeout: float = 60.0
    max_text_bytes: int = DEFAULT_MAX_TEXT_SIZE
    stream_ttl: float = 3600.0
    allowed_hosts: list[str] = field(default_factory=list)
    sse_retry: float = 3.0
    backend: str = "memory"

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            token=os.environ.get("NDRELAY_TOKEN") or None,
            max_frame_bytes=_env_int("NDRELAY_MAX_FRAME_BYTES", DEFAULT_MAX_FRAME_SIZE),
            max_streams=_env_int("NDRELAY_MAX_STREAMS", 1024),
            max_memory=_env_size("NDRELAY_MAX_MEMORY"),
            heartbeat_interval=_env_float("NDRELAY_HEARTBEAT", 15.0),
            cors_origins=_env_list("NDRELAY_CORS_ORIGINS"),
            public_docs=_env_flag("NDRELAY_PUBLIC_DOCS"),
            lease=_env_float("NDRELAY_LEASE", 10.0),
            max_connections=_env_int("NDRELAY_MAX_CONNECTIONS", 0) or None,
            max_header_bytes=_env_int("NDRELAY_MAX_HEADER_BYTES", 64 * 1024),
            header_timeout=_env_float("NDRELAY_HEADER_TIMEOUT", 10.0),
            upload_idle_timeout=_env_float("NDRELAY_UPLOAD_IDLE_TIMEOUT", 60.0),
            max_text_bytes=_env_int("NDRELAY_MAX_TEXT_BYTES", DEFAULT_MAX_TEXT_SIZE),
            stream_ttl=_env_float("NDRELAY_STREAM_TTL", 3600.0),
            allowed_hosts=_env_list("NDRELAY_ALLOWED_HOSTS"),
            sse_retry=_env_float("NDRELAY_SSE_RETRY", 3.0),
            backend=os.environ.get("NDRELAY_BACKEND") or "memory",
        )


class Relay:
    """The set of streams a server serves, with in-process producers.

    ```python
    relay = Relay()
    relay.publish("radar", sensor.stream(), size=64)   # any iterator, run in a thread
    app = create_app(relay)                              # serve it over HTTP
    ```

    Args:
        registry: the storage backend (default: a new `MemoryRegistry`).
        settings: server settings (default: `Settings.from_env()`).
    """

    def __init__(self, registry: Registry | None = None, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        self.registry: Registry = registry if registry is not None else open_backend(self.settings)
        #: names of the streams `publish` serves, in the order published
        self.published: list[str] = []
        self._threads: list[threading.Thread] = []
        self._closed = False

    def publish(
        self,
        name: str,
        iterator: Iterable[Any],
        size: int = 64,
        *,
        mode: str = "queue",
        max_bytes: int | None = None,
        dtype: str | None = None,
        shape: tuple[int, ...] | None = None,
        batched: bool = False,
    ) -> Stream:
        """Serve `iterator` as stream `name`; returns at once.

        A background thread pulls items (arrays or bytes) and puts them into the stream's
        bounded buffer, waiting while it is full. When the iterator is exhausted the
        stream ends (`end` frame); if it raises, the stream fails (`error` frame with the
        exception's type, message and traceback).

        With `batched=True` each element of `iterator` is an array holding several
        items stacked on its leading axis (a burst of IMU samples, say): the relay keeps
        and sends it whole, and its rows are numbered and counted as items.

        Raises:
            StreamConflict: the stream exists with another definition.
            ValueError: an invalid name or definition.
        """
        spec_args: dict[str, Any] = {"size": size, "mode": mode, "dtype": dtype, "shape": shape}
        if max_bytes is not None:
            spec_args["max_bytes"] = max_bytes
        stream = self.registry.create_blocking(name, StreamSpec(**spec_args))
        thread = threading.Thread(
            target=_produce,
            args=(stream, iterator, batched),
            name=f"ndrelay-publish-{name}",
            daemon=True,
        )
        if name not in self.published:
            self.published.append(name)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()
        return stream

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._closed

    def close(self, reason: str = "server shutting down", timeout: float = 5.0) -> None:
        """Fail every open stream with a `relay` error frame and stop the producer threads.

        A producer blocked inside its own iterator's `next()` cannot be interrupted; its
        (daemon) thread ends when that call returns.
        """
        self._closed = True
        self.registry.close(reason)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def open_backend(settings: Settings) -> Registry:
    """The registry `settings.backend` names: `memory`, or `redis://host:port/db`.

    Raises:
        ValueError: an unknown backend.
        ImportError: the Redis backend without the `redis` extra installed.
    """
    backend = settings.backend.strip()
    if backend in ("", "memory"):
        return MemoryRegistry(settings.max_streams, settings.max_memory, lease=settings.lease)
    if backend.startswith(("redis://", "rediss://", "unix://")):
        try:
            from ..registry.redis import RedisRegistry
        except ImportError as exc:
            raise ImportError(
                f"the Redis backend needs the 'redis' extra (pip install 'ndrelay[redis]'): {exc}"
            ) from None
        return RedisRegistry(
            backend,
            max_streams=settings.max_streams,
            max_memory=settings.max_memory,
            lease=settings.lease,
        )
    raise ValueError(f"backend must be 'memory' or redis://host:port/db, got {backend!r}")


def _produce(stream: Stream, iterator: Iterable[Any], batched: bool) -> None:
    it = iter(iterator)
    with stream.producing():
        try:
            for item in it:
                if batched:
                    item = Block(item)
                elif isinstance(item, np.generic):  # a numpy scalar travels as a 0-d array
                    item = np.asarray(item)
                stream.check_item(item)
                stream.put_blocking(item)
        except StreamClosed:
            pass  # deleted or shut down: stop quietly
        except Exception as exc:
            _finish(stream, ErrorFrame.from_exception(exc, seq=0))
        else:
            _finish(stream, EndFrame(seq=0))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()


def _finish(stream: Stream, frame: EndFrame | ErrorFrame) -> None:
    try:
        stream.finish_blocking(frame)
    except StreamClosed:
        pass  # deleted or shut down meanwhile
