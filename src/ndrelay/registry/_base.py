"""The registry interface a storage backend implements, and the stream definition it keeps."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from .._codec import parse_dtype
from .._frames import Frame
from ._budget import MemoryBudget

__all__ = [
    "CONSUMER_PATTERN",
    "check_consumer_args",
    "check_id",
    "NAME_PATTERN",
    "POLICIES",
    "Consumer",
    "Registry",
    "ReplicaLeaving",
    "Stream",
    "StreamSpec",
    "check_name",
]

#: Valid stream names (DESIGN.md §3).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Valid consumer and producer ids (DESIGN.md §5).
CONSUMER_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Slow-consumer policies of fanout streams (DESIGN.md §4).
POLICIES = ("block", "drop_oldest", "latest")

Mode = Literal["queue", "fanout"]


def check_name(name: str) -> str:
    """`name` if it is a valid stream name, else `ValueError` saying the rule."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid stream name {name[:140]!r}: use 1-128 characters from "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


def check_id(kind: str, value: str) -> None:
    """`ValueError` unless `value` is a valid consumer or producer id (`kind` says which)."""
    if not CONSUMER_PATTERN.fullmatch(value):
        raise ValueError(f"invalid {kind} id {value[:80]!r}: use 1-64 of A-Z a-z 0-9 . _ -")


def check_consumer_args(
    policy: str, consumer: str | None, after: int | None, lease: float | None
) -> None:
    """`ValueError` naming the first bad argument of `open_consumer` (any backend)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if consumer is not None:
        check_id("consumer", consumer)
    if lease is not None and not (0 <= lease <= 86400):
        raise ValueError(f"lease must be from 0 to 86400 seconds, got {lease!r}")
    if after is not None and after < -1:
        raise ValueError(f"after must be a seq (-1 or more), got {after!r}")


@dataclass(frozen=True)
class StreamSpec:
    """How a stream is defined: buffer bounds, mode, and optional array schema.

    Attributes:
        size: most items the buffer holds (the producer waits beyond it).
        max_bytes: most payload bytes the buffer holds (at least one item always fits).
        mode: `"queue"` (each item to one consumer) or `"fanout"` (to every consumer).
        dtype: if set, every array item must have this dtype: any name numpy accepts
            (`"float32"`, `"<f4"`, `np.float32`), kept as the canonical `dtype.str`.
        shape: if set, every array item must have this shape. Bytes items are not checked.
    """

    size: int = 64
    max_bytes: int = 256 * 1024 * 1024
    mode: Mode = "queue"
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if type(self.size) is not int or not 1 <= self.size <= 1_000_000:
            raise ValueError(f"size must be an integer from 1 to 1000000, got {self.size!r}")
        if type(self.max_bytes) is not int or self.max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {self.max_bytes!r}")
        if self.mode not in ("queue", "fanout"):
            raise ValueError(f"mode must be 'queue' or 'fanout', got {self.mode!r}")
        if self.dtype is not None:
            object.__setattr__(self, "dtype", parse_dtype(self.dtype).str)
        if self.shape is not None:
            shape = tuple(self.shape)
            if len(shape) > 32 or not all(type(n) is int and n >= 0 for n in shape):
                raise ValueError(
                    f"shape must be a list of non-negative integers, got {self.shape!r}"
                )
            object.__setattr__(self, "shape", shape)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape) if self.shape is not None else None
        return out


class ReplicaLeaving(Exception):
    """Raised by `Consumer.atake` when this relay replica shuts down while its streams live
    on elsewhere (a shared backend): the response ends without a terminal frame, so that
    the client resumes on another replica."""


class Consumer(Protocol):
    """One connection of a reader of a stream; it holds a consumer slot until closed.

    In queue mode what `atake` returns is *pending* for the consumer id until the stream's
    `ack` acknowledges it; when the connection closes, its pending items wait for the id
    to come back for the lease, then return to the front of the queue (DESIGN.md §5).
    """

    #: the consumer id (the client's, or one the relay assigned)
    id: str
    #: acknowledge items once written (a reader that cannot acknowledge, e.g. curl)
    auto_ack: bool

    async def atake(
        self, max_items: int, max_bytes: int = 1 << 62
    ) -> list[tuple[int, Any]] | Frame | None:
        """Up to `max_items` `(seq, item)` pairs with consecutive seqs (fewer once they
        add up to `max_bytes`; at least one), the terminal frame
        once everything before it was taken, or `None` if nothing is available now."""
        ...

    async def wait(self) -> None:
        """Return once `atake` may have something (cancellable)."""
        ...

    async def ack_written(self, upto: int) -> None:
        """For an `auto_ack` consumer: the items up to seq `upto` reached the connection."""
        ...

    async def aclose(self) -> None:
        """End this connection (its pending items start their lease); idempotent."""
        ...


class Stream(Protocol):
    """One named stream of a registry, as the server sees it.

    Methods that may need I/O (a Redis backend) are coroutines; the in-memory backend's
    never wait for anything but room or data. Producer threads (`Relay.publish`) use the
    `*_blocking` methods, which never block an event loop.
    """

    name: str
    spec: StreamSpec

    def check_item(self, item: Any) -> None:
        """Raise `SchemaMismatch`/`LocalProtocolError` if `item` may not enter this stream."""
        ...

    async def aoffer(self, items: Sequence[Any]) -> tuple[list[Any], asyncio.Future[None] | None]:
        """Add what fits now; the rest, and a future to await before offering it again."""
        ...

    def forget(self, fut: asyncio.Future[None]) -> None:
        """Drop a future `aoffer` returned."""
        ...

    async def aoffer_seq(
        self, producer: str, claim: int, pairs: Sequence[tuple[int, Any]]
    ) -> tuple[list[tuple[int, Any]], asyncio.Future[None] | None, int]:
        """`aoffer` of `(producer seq, item)` pairs: duplicates skipped (counted), a gap
        raises `SeqGap`; returns `(rest, future, duplicates)`."""
        ...

    async def afinish(self, frame: Frame) -> None:
        """Finish with an `EndFrame` or `ErrorFrame` (sticky for every consumer)."""
        ...

    async def aopen_consumer(
        self,
        policy: str = "block",
        *,
        consumer: str | None = None,
        after: int | None = None,
        lease: float | None = None,
        auto_ack: bool | None = None,
    ) -> Consumer:
        """A connection of consumer `consumer` (assigned if `None`), resuming after seq
        `after`; a newer connection of the same id supersedes an older one."""
        ...

    async def ack(self, consumer: str, upto: int | None, release: bool = False) -> dict[str, int]:
        """Acknowledge `consumer`'s items delivered up to seq `upto`; `release` gives the
        rest back at once. `{"acked", "released", "pending"}`; raises `ConsumerNotFound`,
        `AckConflict`."""
        ...

    async def claim_producer(self, producer: str) -> tuple[int, int]:
        """Start an upload of `producer`: `(claim, next seq expected from it)`."""
        ...

    async def producer_position(self, producer: str) -> int:
        """The next seq expected from `producer` (0 for a new one)."""
        ...

    def aproducing(self) -> AbstractAsyncContextManager[None]:
        """Count a producer while the `async with` block runs (shown in `ainfo()`)."""
        ...

    async def ainfo(self) -> dict[str, Any]:
        """Definition, state and counters (DESIGN.md §3)."""
        ...

    async def alatest(self) -> tuple[int, Any] | None:
        """The newest buffered item `(seq, item)`, without consuming it."""
        ...

    # -- for producer threads (never on the event loop) ---------------------------------

    def put_blocking(self, item: Any, timeout: float | None = None) -> None:
        """Add one item from a producer thread, waiting while the buffer is full."""
        ...

    def finish_blocking(self, frame: Frame) -> None:
        """`afinish` from a producer thread."""
        ...

    def producing(self) -> AbstractContextManager[None]:
        """`aproducing` for a producer thread."""
        ...


class Registry(Protocol):
    """A set of named streams: `MemoryRegistry` (default) or `RedisRegistry`."""

    #: The relay-wide bound on buffered bytes its streams draw on (`None`: unbounded).
    budget: MemoryBudget | None
    #: What the server says it keeps its streams in (`in-memory streams`, `redis://...`).
    description: str
    #: The errors that mean the backend cannot be reached right now (Redis restarting):
    #: the server answers them 503 and cuts a reader's response, so its client resumes.
    unavailable: tuple[type[Exception], ...]

    async def start(self) -> None:
        """Connect, on the loop that will serve the streams (server start-up)."""
        ...

    async def create_stream(self, name: str, spec: StreamSpec) -> tuple[Stream, bool]:
        """Create `name` (`(stream, True)`), or return the identical existing one
        (`(stream, False)`); `StreamConflict` if it exists with another spec."""
        ...

    async def get_stream(self, name: str) -> Stream:
        """The stream, or `StreamNotFound`."""
        ...

    async def delete_stream(self, name: str, reason: str = "stream deleted") -> None:
        """Remove the stream; its consumers get a `relay` error frame."""
        ...

    async def list_streams(self) -> Sequence[Stream]: ...

    def create_blocking(self, name: str, spec: StreamSpec) -> Stream:
        """`create_stream` for in-process producers (`Relay.publish`), from any thread."""
        ...

    async def aclose(self) -> None:
        """Release connections once the server stopped serving (after `close`)."""
        ...

    def close(self, reason: str = "server shutting down") -> None:
        """Server shutdown (from a thread, not the loop): the in-memory backend fails
        every open stream with a `relay` error frame; a shared backend leaves them to
        the other replicas."""
        ...
