"""The Redis Streams backend: streams shared by every relay replica on one Redis.

Strategy: every step that reads and changes a stream's state runs as one Lua script
(`_redis_lua.py`, where the key layout is), so replicas never race each other; payloads
stay out of Lua: appended by `XADD` in one MULTI with the script that checks them
(`COMMIT`), read by `XREADGROUP` in one MULTI with the queue take, or with plain `XRANGE`
(an entry does not change once written). Each replica keeps, per stream, only futures
of its own waiting producers and consumers, woken by one pattern subscription to the
streams' notification channels (and, should a notification be lost, by a one-second
fallback). Producer threads (`Relay.publish`) hand their calls to the server's event
loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
    NoScriptError,
    RedisError,
    TimeoutError as RedisTimeoutError,
)

from .._exceptions import (
    AckConflict,
    ConsumerNotFound,
    RegistryError,
    SeqGap,
    StreamClosed,
    StreamConflict,
    StreamNotFound,
)
from .._frames import EndFrame, ErrorFrame, Frame
from . import _redis_lua as lua
from ._base import (
    ReplicaLeaving,
    StreamSpec,
    check_consumer_args,
    check_id,
    check_name,
)
from ._block import Block
from ._budget import MemoryBudget
from ._resp import RespClient
from ._schema import SchemaCheck

__all__ = ["RedisConsumer", "RedisRegistry", "RedisStream"]

log = logging.getLogger("ndrelay.registry")
T = TypeVar("T")

PREFIX = "ndrelay"
#: how often a replica refreshes its live connections' keys, and wakes waiters anyway
REFRESH = 1.0
#: a live connection's key outlives its replica by its lease plus this (ms)
SLACK_MS = 3000
#: most payload bytes one offer script carries (one item always goes, however large)
OFFER_BYTES = 32 << 20
#: most items one offer or append carries (and never more than the stream's `size`): the
#: scripts hand lists of entry ids to single commands, and Lua's `unpack` stops near 8000
OFFER_ITEMS = 4096
#: bytes read from Redis per socket read (redis-py's 64 KiB default takes 16 event loop
#: rounds, and as many copies into the reply parser, per 1 MiB payload)
READ_SIZE = 1 << 20


class _Waiters:
    """Futures of this replica's coroutines waiting for a stream to change."""

    __slots__ = ("futures", "version")

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[None]] = []
        self.version = 0

    def add(self) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut

    def wake(self) -> None:
        self.version += 1
        futures, self.futures = self.futures, []
        for fut in futures:
            if not fut.done():
                fut.set_result(None)

    def discard(self, fut: asyncio.Future[None]) -> None:
        try:
            self.futures.remove(fut)
        except ValueError:
            pass


@functools.lru_cache(maxsize=256)
def _array_head(dtype: str, shape: tuple[int, ...]) -> bytes:
    return f"a;{dtype};{','.join(map(str, shape))}".encode()


def _nbytes(item: Any) -> int:
    return int(item.nbytes) if isinstance(item, np.ndarray) else len(item)


def _header(item: Any) -> tuple[bytes, Any, int]:
    """An item as `(header, payload, nbytes)` for its entry."""
    if isinstance(item, np.ndarray):
        if not item.flags.c_contiguous:
            item = np.ascontiguousarray(item)
        head = _array_head(item.dtype.str, item.shape)
        payload = item.reshape(-1).view(np.uint8).data if item.nbytes else b""
        return head, payload, item.nbytes
    data = bytes(item) if isinstance(item, bytearray) else item
    return b"b", data, len(data)


def _item(fields: dict[bytes, bytes]) -> tuple[Any, int]:
    """An entry's fields back as `(item, nbytes)`."""
    head, data = fields[b"h"], fields[b"d"]
    if head == b"b":
        return bytes(data) if type(data) is not bytes else data, len(data)
    _, dtype, shape = head.decode().split(";")
    dims = tuple(int(n) for n in shape.split(",")) if shape else ()
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(dims), len(data)


def _unsent_pairs(pairs: Sequence[tuple[int, Any]], done: int) -> list[tuple[int, Any]]:
    """`pairs` (items or `Block`s of rows, with producer seqs) without their first `done`
    rows: what an upload still has to offer, in the caller's own terms."""
    for i, (pseq, item) in enumerate(pairs):
        n = len(item.array) if type(item) is Block else 1
        if done < n:
            if done:  # part of a block went in
                item = Block(item.array[done:])
                pseq = pseq + done if pseq >= 0 else pseq
            return [(pseq, item), *pairs[i + 1 :]]
        done -= n
    return []


def _rows(items: Sequence[Any]) -> list[Any]:
    """Items with every `Block` split into its rows (Redis keeps one entry per item)."""
    out: list[Any] = []
    for item in items:
        if type(item) is Block:
            out.extend(item.array[i] for i in range(len(item.array)))
        else:
            out.append(item)
    return out


def _frame(text: str | bytes) -> EndFrame | ErrorFrame:
    fields = json.loads(text)
    kind = fields.pop("kind")
    if kind == "end":
        return EndFrame(seq=int(fields["seq"]))
    bases = fields.get("bases")
    return ErrorFrame(
        seq=int(fields["seq"]),
        origin=fields.get("origin", "relay"),
        type=fields.get("type", "StreamClosed"),
        message=fields.get("message", ""),
        traceback=fields.get("traceback", ""),
        bases=tuple(bases) if bases else None,
    )


def _frame_json(frame: EndFrame | ErrorFrame) -> str:
    if isinstance(frame, EndFrame):
        return json.dumps({"kind": "end"})
    out: dict[str, Any] = {
        "kind": "error",
        "origin": frame.origin,
        "type": frame.type,
        "message": frame.message,
        "traceback": frame.traceback,
    }
    if frame.bases:
        out["bases"] = list(frame.bases)
    return json.dumps(out)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStream(SchemaCheck):
    """One stream incarnation in Redis, as seen by this replica (see `registry.Stream`)."""

    def __init__(self, registry: RedisRegistry, name: str, spec: StreamSpec, inc: str) -> None:
        self.registry = registry
        self.name = name
        self.spec = spec
        self.inc = inc
        self.base = f"{PREFIX}:s:{{{name}}}:{inc}"
        self.channel = f"{PREFIX}:n:{name}"
        self.created = time.time()
        self._data = _Waiters()
        self._space = _Waiters()
        self._dtype = np.dtype(spec.dtype) if spec.dtype is not None else None
        self._checked: set[tuple[np.dtype[Any], tuple[int, ...]]] = set()
        self._queue = spec.mode == "queue"
        self._next: int | None = None  # the stream's next seq, as this replica saw it last
        self._full = False  # the stream had no room for this replica's last offer

    @property
    def _r(self) -> aioredis.Redis:
        return self.registry.redis

    async def _run(self, script: str, *args: Any) -> Any:
        return await self.registry.script(script, self.base, *args)

    def _closed_error(self, term: Any) -> StreamClosed:
        if term:
            frame = _frame(term)
            if isinstance(frame, ErrorFrame) and frame.origin == "relay":
                return StreamClosed(
                    f"stream {self.name!r} was closed by the relay: {frame.message}",
                    stream_name=self.name,
                )
            return StreamClosed.finished(
                self.name, "failed" if isinstance(frame, ErrorFrame) else "ended"
            )
        return StreamClosed(f"stream {self.name!r} was deleted", stream_name=self.name)

    # -- producer side ---------------------------------------------------------------

    async def aoffer(self, items: Sequence[Any]) -> tuple[list[Any], asyncio.Future[None] | None]:
        rest, fut, _ = await self._offer("", 0, [(-1, item) for item in _rows(items)])
        return [item for _, item in rest], fut

    async def aoffer_seq(
        self, producer: str, claim: int, pairs: Sequence[tuple[int, Any]]
    ) -> tuple[list[tuple[int, Any]], asyncio.Future[None] | None, int]:
        rows: list[tuple[int, Any]] = []
        for pseq, item in pairs:
            if type(item) is Block:
                start = pseq
                for i in range(len(item.array)):
                    rows.append((start + i if start >= 0 else -1, item.array[i]))
            else:
                rows.append((pseq, item))
        try:
            rest, fut, dups = await self._offer(producer, claim, rows)
            return _unsent_pairs(pairs, len(rows) - len(rest)), fut, dups
        except SeqGap as gap:  # name the index in `pairs`, not in the rows
            index, k = 0, gap.index  # type: ignore[attr-defined]
            for i, (_, item) in enumerate(pairs):
                k -= len(item.array) if type(item) is Block else 1
                if k < 0:
                    index = i
                    break
            gap.index = index  # type: ignore[attr-defined]
            raise

    async def _offer(
        self, producer: str, claim: int, rows: list[tuple[int, Any]]
    ) -> tuple[list[tuple[int, Any]], asyncio.Future[None] | None, int]:
        """Offer `(producer seq, item)` rows in steps of at most `OFFER_BYTES` and
        `OFFER_ITEMS` (or the stream's `size`) items."""
        spec, dups, i = self.spec, 0, 0
        most = max(1, min(OFFER_ITEMS, spec.size))
        while i < len(rows):
            sized: list[tuple[int, Any, int]] = []
            total = 0
            for pseq, item in itertools.islice(rows, i, i + most):
                nbytes = _nbytes(item)
                if sized and total + nbytes > OFFER_BYTES:
                    break
                sized.append((pseq, item, nbytes))
                total += nbytes
            n = len(sized)
            common = (
                self.channel,
                self.inc,
                int(time.time() * 1000),
                producer,
                claim,
                "q" if self._queue else "f",
                spec.size,
                spec.max_bytes,
            )
            version = self._space.version
            got = None
            if self._next is not None and self._full:
                # full when last seen: send only what fits now, not everything held
                room = int(
                    await self._run(
                        lua.ROOM,
                        common[2],
                        common[5],
                        spec.size,
                        spec.max_bytes,
                        *(nbytes for *_, nbytes in sized),
                    )
                )
                if room == 0:
                    return self._wait_room(rows[i:], version, dups)
                if room > 0:
                    self._full = room < n
                    sized = sized[:room]
                    n = room
            # headers and payload views only of the items sent
            chunk = [(pseq, *_header(item)) for pseq, item, _ in sized]
            if self._next is not None:
                got = await self._append(common, chunk)
            if got is None:  # the stream's next seq unknown or moved on: payloads via Lua
                args: list[Any] = []
                for pseq, head, payload, nbytes in chunk:
                    args += (pseq, nbytes, head, payload)
                got = await self._run(lua.OFFER, *common, n, *args)
            placed, status, expected, skipped, index, nxt = got
            status = _s(status)
            if status != "closed":
                self._next = int(nxt)
            dups += int(skipped)
            if int(placed):
                self._data.wake()
            if status == "closed":
                raise self._closed_error(await self._r.hget(self.base + ":m", "term"))
            if status == "claim":
                raise StreamClosed(
                    f"a newer upload of producer {producer!r} took over", stream_name=self.name
                )
            if status == "gap":
                gap = SeqGap(
                    f"producer {producer!r} sent seq {rows[i + int(index)][0]}; the relay "
                    f"expects seq {int(expected)} from it next",
                    producer=producer,
                    expected_seq=int(expected),
                    stream_name=self.name,
                )
                gap.index = i + int(index)  # type: ignore[attr-defined]
                raise gap
            if status == "full":
                self._full = True
                i += int(index)  # (the rows left keep their own seqs: a gap stays one)
                return self._wait_room(rows[i:], version, dups)
            i += n
        return [], None, dups

    def _wait_room(
        self, rest: list[tuple[int, Any]], version: int, dups: int
    ) -> tuple[list[tuple[int, Any]], asyncio.Future[None], int]:
        """`rest` with a future resolved when the stream may have room (at once if
        space was freed since `version`)."""
        fut = self._space.add()
        if self._space.version != version:
            fut.set_result(None)
        self.registry.fallback(fut)
        return rest, fut, dups

    async def _append(
        self, common: tuple[Any, ...], chunk: list[tuple[int, bytes, Any, int]]
    ) -> Any:
        """`XADD` the items at the seqs from the stream's expected next seq, then `COMMIT`
        (bounds, producer seqs), in one MULTI; None if the guess was wrong (nothing kept)."""
        assert self._next is not None
        guess, x = self._next, self.base + ":x"
        args: list[Any] = [guess, len(chunk)]
        for pseq, _, _, nbytes in chunk:
            args += (pseq, nbytes)
        # EVAL, not EVALSHA: a script missing from the cache would fail after the XADDs
        # inside the MULTI
        commit = (lua.COMMIT, 1, self.base, *common, *args)
        lean = self.registry.lean
        if lean is not None:  # the payloads sent from their own memory
            commands: list[tuple[Any, ...]] = [
                ("XADD", x, "NOMKSTREAM", f"{guess + k}-1", b"h", head, b"d", payload)
                for k, (_, head, payload, _) in enumerate(chunk)
            ]
            commands.append(("EVAL", *commit))
            results = await lean.transaction(commands)
        else:
            async with self._r.pipeline(transaction=True) as pipe:
                for k, (_, head, payload, _) in enumerate(chunk):
                    pipe.xadd(x, {b"h": head, b"d": payload}, id=f"{guess + k}-1", nomkstream=True)
                pipe.eval(*commit)
                results = await pipe.execute(raise_on_error=False)
        got = results[-1]
        if isinstance(got, Exception):
            raise got
        if _s(got[1]) == "retry":
            self._next = None
            return None
        return got

    def forget(self, fut: asyncio.Future[None]) -> None:
        self._space.discard(fut)

    async def afinish(self, frame: Frame) -> None:
        if not isinstance(frame, EndFrame | ErrorFrame):
            raise TypeError("afinish() takes an EndFrame or an ErrorFrame")
        status, term = await self._run(lua.FINISH, _frame_json(frame), self.channel, self.inc)
        if _s(status) != "ok":
            raise self._closed_error(term)

    async def count(self, kind: str, n: int) -> None:
        """Count this replica's producers (`p`) or consumers (`c`) of the stream up or down
        (`info` adds up the live replicas' counts)."""
        await self._run(lua.COUNT, f"{self.registry.replica}:{kind}", n)

    @asynccontextmanager
    async def aproducing(self) -> AsyncIterator[None]:
        await self.count("p", 1)
        try:
            yield
        finally:
            try:
                await self.count("p", -1)
            except RedisError:
                log.warning("stream %r: could not count a producer out", self.name)

    # -- for producer threads --------------------------------------------------------

    async def _put_many(self, items: Sequence[Any]) -> None:
        rest, fut = await self.aoffer(items)
        while fut is not None:
            try:
                await fut
            finally:
                self.forget(fut)
            rest, fut = await self.aoffer(rest)

    def put_blocking(self, item: Any, timeout: float | None = None) -> None:
        self.registry.call(self._put_many([item]), timeout)

    def finish_blocking(self, frame: Frame) -> None:
        self.registry.call(self.afinish(frame))

    @contextmanager
    def producing(self) -> Iterator[None]:
        self.registry.call(self.count("p", 1))
        try:
            yield
        finally:
            try:
                self.registry.call(self.count("p", -1))
            except (RedisError, StreamClosed, RuntimeError):
                pass

    # -- idempotent uploads ----------------------------------------------------------

    async def claim_producer(self, producer: str) -> tuple[int, int]:
        check_id("producer", producer)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.base + ":claim", producer, 1)
            pipe.hget(self.base + ":prod", producer)
            pipe.publish(self.channel, f"{self.inc}:s")
            claim, position, _ = await pipe.execute()
        return int(claim), int(position or 0)

    async def producer_position(self, producer: str) -> int:
        return int(await self._r.hget(self.base + ":prod", producer) or 0)

    # -- consumer side ---------------------------------------------------------------

    async def aopen_consumer(
        self,
        policy: str = "block",
        *,
        consumer: str | None = None,
        after: int | None = None,
        lease: float | None = None,
        auto_ack: bool | None = None,
    ) -> RedisConsumer:
        check_consumer_args(policy, consumer, after, lease)
        if consumer is None:
            consumer = f"c{secrets.token_hex(5)}"
            if auto_ack is None:
                auto_ack = True
        lease = self.registry.lease if lease is None else lease
        token = secrets.token_hex(8)
        handle = RedisConsumer(self, policy, consumer, token, bool(auto_ack), lease)
        if self._queue:
            out = await self._run(lua.OPEN, consumer, token, handle.ttl_ms, self.channel, self.inc)
            if _s(out[0]) != "ok":
                handle.closed = True
                return handle  # its first take answers the terminal frame
            await self.count("c", 1)
            handle.counted = True
            pending = [int(s) for s in out[1:]]
            handle._high = max(pending, default=-1)
            if after is not None and after in pending:
                pending = pending[pending.index(after) + 1 :]
            handle.resend = pending
        else:
            key = self.base + ":m"
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hmget(key, "next", "first")
                pipe.set(f"{self.base}:f:{consumer}", token, ex=86400)
                pipe.publish(self.channel, f"{self.inc}:x")
                (nxt, _), *_ = await pipe.execute()
            await self.count("c", 1)
            handle.counted = True
            handle.cursor = int(nxt or 0)
            if after is not None:
                handle.cursor = min(after + 1, handle.cursor)
            if policy == "block":
                await handle.hold()
        self.registry.attach(handle)
        return handle

    async def ack(self, consumer: str, upto: int | None, release: bool = False) -> dict[str, int]:
        if not self._queue:
            raise StreamClosed(
                f"stream {self.name!r} is a fanout stream: there is nothing to acknowledge "
                "(resume with after=<seq>)",
                stream_name=self.name,
            )
        got = await self._run(
            lua.ACK,
            *self._ack_args(consumer, upto, release),
        )
        return await self._acked(consumer, upto, got)

    def _ack_args(self, consumer: str, upto: int | None, release: bool) -> tuple[Any, ...]:
        return (
            consumer,
            -1 if upto is None else upto,
            "1" if release else "0",
            self.channel,
            self.inc,
        )

    async def _acked(self, consumer: str, upto: int | None, got: Any) -> dict[str, int]:
        """The ACK script's answer, as `ack` returns it (or its error)."""
        status, acked, released, pending = got
        status = _s(status)
        if status == "closed":
            raise self._closed_error(await self._r.hget(self.base + ":m", "term"))
        if status == "notfound":
            raise ConsumerNotFound(
                f"stream {self.name!r} has no consumer {consumer!r} (never connected, "
                "released, or its lease ran out)",
                consumer=consumer,
                stream_name=self.name,
            )
        if status == "conflict":
            raise AckConflict(
                f"seq {upto} is not pending for consumer {consumer!r} (never delivered to "
                "it, given back, or returned to the queue when its lease ran out)",
                consumer=consumer,
                seq=upto,
            )
        if int(acked):  # this replica's own waiters need not wait for the notification
            self._space.wake()
        if int(released):
            self._data.wake()
        return {"acked": int(acked), "released": int(released), "pending": int(pending)}

    async def _entries(self, seqs: Sequence[int]) -> list[tuple[int, Any, int]]:
        """`(seq, item, nbytes)` of stored entries (runs of consecutive seqs in one read)."""
        runs: list[tuple[int, int]] = []
        for seq in seqs:
            if runs and runs[-1][1] == seq - 1:
                runs[-1] = (runs[-1][0], seq)
            else:
                runs.append((seq, seq))
        key = self.base + ":x"
        async with self._r.pipeline(transaction=False) as pipe:
            for lo, hi in runs:
                pipe.xrange(key, f"{lo}-1", f"{hi}-1")
            results = await pipe.execute()
        out = []
        for entries in results:
            for entry_id, fields in entries:
                item, nbytes = _item(fields)
                out.append((int(entry_id.split(b"-")[0]), item, nbytes))
        return out

    async def alatest(self) -> tuple[int, Any] | None:
        entries: Any = await self._r.xrevrange(self.base + ":x", "+", "-", count=1)
        if not entries:
            return None
        entry_id, fields = entries[0]
        return int(entry_id.split(b"-")[0]), _item(fields)[0]

    # -- state -----------------------------------------------------------------------

    async def ainfo(self) -> dict[str, Any]:
        prefix = self.registry.alive_prefix
        sha = self.registry.loaded(lua.COUNTS)
        counts: Any = None
        if sha is None:  # the script not loaded yet: two round trips, this once
            fields = await self._r.hgetall(self.base + ":m")
        else:  # one round trip (`GET /streams` and `/metrics` ask it of every stream)
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.base + ":m")
                pipe.evalsha(sha, 1, self.base, prefix)
                fields, counts = await pipe.execute(raise_on_error=False)
            if isinstance(fields, Exception):
                raise fields
        if counts is None or isinstance(counts, Exception):  # (Redis restarted: NOSCRIPT)
            counts = await self._run(lua.COUNTS, prefix)
        producers, consumers = counts
        m = {_s(k): v for k, v in fields.items()}
        term = m.get("term")
        state = "open" if not term else "ended" if b'"end"' in term else "failed"
        if not m or m.get("aborted") == b"1":  # deleted by another replica meanwhile
            state = "failed"

        def n(key: str) -> int:
            return int(m.get(key, 0))

        return {
            "name": self.name,
            **self.spec.as_json(),
            "state": state,
            "depth": n("held") - n("pending"),
            "pending": n("pending"),
            "produced": n("next"),
            "produced_bytes": n("produced_bytes"),
            "consumed": n("consumed"),
            "consumed_bytes": n("consumed_bytes"),
            "acked": n("acked"),
            "redelivered": n("redelivered"),
            "dropped": n("dropped"),
            "bytes": n("bytes"),
            "producers": max(0, int(producers)),
            "consumers": max(0, int(consumers)),
        }


class RedisConsumer:
    """One connection of a consumer of a `RedisStream` (see `registry.Consumer`)."""

    def __init__(
        self,
        stream: RedisStream,
        policy: str,
        consumer: str,
        token: str,
        auto_ack: bool,
        lease: float,
    ) -> None:
        self.stream = stream
        self.policy = policy
        self.id = consumer
        self.token = token
        self.auto_ack = auto_ack
        self.lease = lease
        self.ttl_ms = int(lease * 1000) + SLACK_MS
        self.cursor = 0  # fanout: next seq to deliver
        self.resend: list[int] = []  # queue: pending items an earlier connection had
        self.closed = False
        self._seen = -1  # the data version when `atake` last found nothing
        self._ack: int | None = None  # auto-ack: written up to this seq, not acked yet
        self._high = -1  # queue: no seq above this was pending for this consumer (id)
        self.counted = False  # counted in the stream's consumers (to count out on close)

    def _superseded(self) -> ErrorFrame:
        return ErrorFrame(
            seq=0,
            origin="relay",
            type="StreamClosed",
            message=f"consumer {self.id!r} was released or connected again elsewhere",
        )

    def _aborted(self, term: Any) -> ErrorFrame:
        if term:
            frame = _frame(term)
            if isinstance(frame, ErrorFrame):
                return frame
        return ErrorFrame(seq=0, origin="relay", type="StreamClosed", message="stream deleted")

    async def atake(
        self, max_items: int, max_bytes: int = 1 << 62
    ) -> list[tuple[int, Any]] | Frame | None:
        s = self.stream
        if s.registry.leaving:
            raise ReplicaLeaving
        version = s._data.version
        if s._queue:
            got = await self._take_queue(max_items, max_bytes)
        else:
            got = await self._take_fanout(max_items, max_bytes)
        if got is None:
            self._seen = version
        return got

    async def _take_queue(
        self, max_items: int, max_bytes: int
    ) -> list[tuple[int, Any]] | Frame | None:
        s = self.stream
        out: list[tuple[int, Any]] = []
        if self.resend:
            seqs, self.resend = self.resend[:max_items], self.resend[max_items:]
            entries = await s._entries(seqs)
            if entries:
                await s._r.hincrby(s.base + ":m", "redelivered", len(entries))
            return [(seq, item) for seq, item, _ in entries] or None
        take = (self.id, self.token, max_items, max_bytes, s.channel, s.inc)
        # One round trip (a MULTI, so nothing comes between): the written items' ack
        # (auto-ack), the take, and the payloads of what it took: TAKE puts the entries
        # it hands out into this consumer's pending list in the group, and XREADGROUP
        # with an id reads that list from the id on, payloads included. Everything this
        # consumer had pending before is at or below `_high`, so what it reads above is
        # what TAKE just gave it (items given back by others below `_high`, rare, are
        # read after, with XRANGE).
        upto, self._ack = self._ack, None
        commands: list[tuple[Any, ...]] = []
        if upto is not None:
            commands.append(("EVAL", lua.ACK, 1, s.base, *s._ack_args(self.id, upto, False)))
        commands.append(("EVAL", lua.TAKE, 1, s.base, *take))
        since = f"{self._high}-1" if self._high >= 0 else "0-0"
        read_args = ("g", self.id, "COUNT", max_items, "STREAMS", s.base + ":x", since)
        lean = s.registry.lean
        fetched: dict[int, Any] = {}
        if lean is not None:  # payloads read straight into buffers of their own
            results = await lean.transaction([*commands, ("XREADGROUP", "GROUP", *read_args)])
            read = results[-1]
            if read and not isinstance(read, Exception):
                for entry_id, flat in read[0][1]:
                    if flat:
                        fetched[int(entry_id.split(b"-")[0])] = dict(
                            zip(flat[::2], flat[1::2], strict=True)
                        )
        else:
            async with s._r.pipeline(transaction=True) as pipe:
                for command in commands:
                    pipe.eval(*command[1:])
                pipe.xreadgroup("g", self.id, {s.base + ":x": since}, count=max_items)
                results = await pipe.execute(raise_on_error=False)
            read = results[-1]
            if read and not isinstance(read, Exception):
                for entry_id, fields in read[0][1]:
                    if fields:
                        fetched[int(entry_id.split(b"-")[0])] = fields
        if upto is not None:
            await self._settle(upto, results[0])
        got = results[-2]
        if isinstance(got, Exception):
            raise got
        status = _s(got[0])
        if status == "items":
            seqs = [int(x) for x in got[2:]]
            self._high = max(self._high, max(seqs))
            missing = [seq for seq in seqs if seq not in fetched]
            if missing:
                for seq, item, _ in await s._entries(missing):
                    fetched[seq] = item
            out = []
            for seq in seqs:
                got_item = fetched.get(seq)
                if got_item is None:
                    continue  # not stored (any more)
                out.append((seq, _item(got_item)[0] if type(got_item) is dict else got_item))
            return out or None
        if status == "none":
            return None
        if status == "term":
            return _frame(got[1])
        if status == "superseded":
            return self._superseded()
        return self._aborted(got[1] if len(got) > 1 else None)

    async def _take_fanout(
        self, max_items: int, max_bytes: int
    ) -> list[tuple[int, Any]] | Frame | None:
        s = self.stream
        r = s._r
        async with r.pipeline(transaction=False) as pipe:
            pipe.hmget(s.base + ":m", "aborted", "term", "next", "first")
            pipe.get(f"{s.base}:f:{self.id}")
            pipe.xrange(s.base + ":x", f"{self.cursor}-1", "+", count=min(max_items, 256))
            (aborted, term, nxt, first), owner, entries = await pipe.execute()
        if nxt is None or aborted == b"1":
            return self._aborted(term)
        if owner is not None and _s(owner) != self.token:
            return self._superseded()
        nxt, first = int(nxt), int(first)
        dropped = 0
        if self.cursor < first:
            dropped += first - self.cursor
            self.cursor = first
        if self.policy == "latest" and self.cursor < nxt - 1:
            dropped += nxt - 1 - self.cursor
            self.cursor = nxt - 1
            entries = entries[-1:]
        out: list[tuple[int, Any]] = []
        taken = 0
        for entry_id, fields in entries:
            seq = int(entry_id.split(b"-")[0])
            if seq < self.cursor:
                continue
            if seq > self.cursor:  # evicted between the reads
                dropped += seq - self.cursor
            item, nbytes = _item(fields)
            out.append((seq, item))
            self.cursor = seq + 1
            taken += nbytes
            if taken >= max_bytes or len(out) >= max_items:
                break
        if out or dropped:
            async with r.pipeline(transaction=False) as pipe:
                key = s.base + ":m"
                if out:
                    pipe.hincrby(key, "consumed", len(out))
                    pipe.hincrby(key, "consumed_bytes", taken)
                if dropped:
                    pipe.hincrby(key, "dropped", dropped)
                if self.policy == "block" and out:
                    pipe.zadd(s.base + ":fb", {self.token: self.cursor})
                    pipe.publish(s.channel, f"{s.inc}:s")
                await pipe.execute()
        if out:
            return out
        if self.cursor >= nxt and term:
            return _frame(term)
        if self.cursor < nxt and entries:  # jumped past what was read (latest): read on
            return await self._take_fanout(max_items, max_bytes)
        return None

    async def hold(self) -> None:
        """A fanout `block` consumer: hold the producer at this consumer's cursor."""
        s = self.stream
        deadline = (time.time() + REFRESH * 5) * 1000
        async with s._r.pipeline(transaction=False) as pipe:
            pipe.zadd(s.base + ":fb", {self.token: self.cursor})
            pipe.zadd(s.base + ":fbt", {self.token: deadline})
            await pipe.execute()

    async def wait(self) -> None:
        s = self.stream
        await self._flush_ack()  # its room may be what the producer waits for
        if s._data.version != self._seen or self.closed:
            return
        fut = s._data.add()
        try:
            # asyncio.wait, not asyncio.timeout: a timeout nested in the caller's, expiring
            # as the task is cancelled, could swallow the cancellation on Python 3.11
            await asyncio.wait([fut], timeout=REFRESH)
        finally:
            s._data.discard(fut)

    async def ack_written(self, upto: int) -> None:
        """Acknowledged with the next take (one round trip for both), or before this
        connection waits or closes, whichever comes first."""
        if self.auto_ack and self.stream._queue:
            self._ack = upto

    async def _flush_ack(self) -> None:
        if self._ack is not None:
            upto, self._ack = self._ack, None
            s = self.stream
            try:
                got = await s._run(lua.ACK, *s._ack_args(self.id, upto, False))
            except RedisError as exc:
                got = exc
            await self._settle(upto, got)

    async def _settle(self, upto: int, got: Any) -> None:
        """An auto-ack's answer: its errors are the ones `ack_written` never raised."""
        if isinstance(got, Exception):
            raise got
        try:
            await self.stream._acked(self.id, upto, got)
        except (ConsumerNotFound, AckConflict, StreamClosed):
            pass

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        s = self.stream
        s.registry.detach(self)
        try:
            await self._flush_ack()
        except RedisError as exc:
            log.warning("stream %r: consumer %r: written items not acked: %s", s.name, self.id, exc)
        try:
            await s._run(
                lua.CLOSE,
                self.id,
                self.token,
                int(self.lease * 1000),
                s.channel,
                s.inc,
                "0" if s._queue else "1",
            )
        except RedisError as exc:
            log.warning("stream %r: consumer %r not closed in Redis: %s", s.name, self.id, exc)
        if self.counted:
            self.counted = False
            try:
                await s.count("c", -1)
            except RedisError as exc:
                log.warning("stream %r: consumer %r not counted out: %s", s.name, self.id, exc)


class RedisRegistry:
    """Streams kept in Redis (`redis://host:port/db`), shared by every relay replica.

    Args:
        url: the Redis URL.
        max_streams: most streams at once (over all replicas).
        max_memory: not used (the Redis server's own memory holds the streams).
        lease: default seconds a departed queue consumer's pending items wait for it.
    """

    budget: MemoryBudget | None = None
    unavailable: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)

    def __init__(
        self,
        url: str,
        max_streams: int = 1024,
        max_memory: int | None = None,
        *,
        lease: float = 10.0,
    ) -> None:
        self.url = url
        self.description = f"streams in Redis at {url.split('@')[-1]}"
        self.max_streams = max_streams
        self.lease = lease
        self.leaving = False
        self._redis: aioredis.Redis | None = None
        #: the append's and the take's transactions (None over TLS: redis-py's pipelines)
        self.lean: RespClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._streams: dict[str, RedisStream] = {}  # by name: the incarnation seen last
        self._consumers: set[RedisConsumer] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._shas: dict[str, str] = {}
        self._calls: set[concurrent.futures.Future[Any]] = set()  # of producer threads
        self._streams_key = f"{PREFIX}:streams"
        #: this replica's id; its key `alive_prefix + replica` lives while it runs
        self.replica = secrets.token_hex(6)
        self.alive_prefix = f"{PREFIX}:alive:"

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("the Redis registry is not started (no event loop yet)")
        return self._redis

    def _client(self) -> aioredis.Redis:
        # (keepalive is a TCP option: redis-py's Unix socket connections refuse it)
        keepalive = {} if self.url.startswith("unix://") else {"socket_keepalive": True}
        return aioredis.Redis.from_url(
            self.url, health_check_interval=10, socket_read_size=READ_SIZE, **keepalive
        )

    async def start(self) -> None:
        if self._redis is not None:
            return
        self._redis = self._client()
        await self._redis.ping()
        await self._alive()
        self.lean = RespClient.of(self._redis)
        self._loop = asyncio.get_running_loop()
        self._tasks = [
            asyncio.create_task(self._listen(), name="ndrelay-redis-notify"),
            asyncio.create_task(self._refresh(), name="ndrelay-redis-refresh"),
        ]
        self._ready.set()

    def loaded(self, source: str) -> str | None:
        """The SHA of a script `script` loaded already (to run it in a pipeline), or None."""
        return self._shas.get(source)

    async def script(self, source: str, key: str, *args: Any, client: Any = None) -> Any:
        """Run a Lua script (by its SHA once loaded)."""
        r = client if client is not None else self.redis
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = await r.script_load(source)
        try:
            return await r.evalsha(sha, 1, key, *args)
        except NoScriptError:  # Redis restarted: its script cache is empty
            self._shas[source] = await r.script_load(source)
            return await r.evalsha(self._shas[source], 1, key, *args)

    # -- notifications and liveness ------------------------------------------------------

    async def _listen(self) -> None:
        """Wake this replica's waiters on every stream notification; reconnect on loss."""
        delay = 0.1
        while True:
            client = self._client()
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.psubscribe(f"{PREFIX}:n:*")
                    self._wake_all()  # what happened while not subscribed
                    delay = 0.1
                    async for message in pubsub.listen():
                        if message.get("type") != "pmessage":
                            continue
                        name = _s(message["channel"])[len(PREFIX) + 3 :]
                        stream = self._streams.get(name)
                        if stream is None:
                            continue
                        inc, _, what = _s(message["data"]).partition(":")
                        if inc != stream.inc:
                            continue
                        if what in ("d", "x"):
                            stream._data.wake()
                        if what in ("s", "x"):
                            stream._space.wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting: try again
                log.warning("Redis notifications lost (%s): reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
            finally:
                await client.aclose()

    def _wake_all(self) -> None:
        for stream in list(self._streams.values()):
            stream._data.wake()
            stream._space.wake()

    async def _alive(self) -> None:
        """Say this replica lives for the next few seconds (its producer and consumer counts
        stop counting when it stops saying so)."""
        await self.redis.set(self.alive_prefix + self.replica, 1, px=int(REFRESH * 5000))

    async def _refresh(self) -> None:
        """Every second: keep this replica's key and its live connections' keys alive (a
        connection superseded meanwhile leaves the newer one's key alone)."""
        while True:
            await asyncio.sleep(REFRESH)
            try:
                await self._alive()
                deadline = (time.time() + REFRESH * 5) * 1000
                for c in list(self._consumers):
                    s = c.stream
                    if s._queue:
                        await self.script(lua.REFRESH, f"{s.base}:c:{c.id}", c.token, c.ttl_ms)
                    elif c.policy == "block":
                        await self.redis.zadd(s.base + ":fbt", {c.token: deadline}, xx=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("Redis refresh failed: %s", exc)

    def fallback(self, fut: asyncio.Future[None]) -> None:
        """Resolve `fut` after a second anyway (a notification may have been lost)."""

        def resolve() -> None:
            if not fut.done():
                fut.set_result(None)

        asyncio.get_running_loop().call_later(REFRESH, resolve)

    def attach(self, consumer: RedisConsumer) -> None:
        self._consumers.add(consumer)

    def detach(self, consumer: RedisConsumer) -> None:
        self._consumers.discard(consumer)

    # -- threads ---------------------------------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the server's loop from another thread and wait for it."""
        if not self._ready.wait(60):
            coro.close()
            raise RuntimeError("the relay server did not start within 60 s")
        if self.leaving:
            coro.close()
            raise StreamClosed("the relay is shutting down")
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        self._calls.add(future)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no room for {timeout} s") from None
        except concurrent.futures.CancelledError:
            raise StreamClosed("the relay is shutting down") from None
        finally:
            self._calls.discard(future)

    def create_blocking(self, name: str, spec: StreamSpec) -> RedisStream:
        if self._ready.is_set():
            return self.call(self.create_stream(name, spec))[0]

        async def create() -> RedisStream:  # before the server's loop runs
            client = self._client()
            try:
                return (await self.create_stream(name, spec, client=client))[0]
            finally:
                await client.aclose()

        return asyncio.run(create())

    # -- streams ---------------------------------------------------------------------

    def _stream(self, name: str, spec: StreamSpec, inc: str) -> RedisStream:
        stream = self._streams.get(name)
        if stream is None or stream.inc != inc:
            stream = RedisStream(self, name, spec, inc)
            self._streams[name] = stream
        return stream

    async def create_stream(
        self, name: str, spec: StreamSpec, *, client: Any = None
    ) -> tuple[RedisStream, bool]:
        check_name(name)
        r = client if client is not None else self.redis
        inc = secrets.token_hex(4)
        base = f"{PREFIX}:s:{{{name}}}:{inc}"
        status, got = await self.script(
            lua.CREATE,
            base,
            name,
            json.dumps(spec.as_json()),
            inc,
            self.max_streams,
            int(time.time()),
            self._streams_key,
            client=r,
        )
        status = _s(status)
        if status == "toomany":
            raise RegistryError(f"too many streams (limit {self.max_streams})")
        if status == "exists":
            existing = await self._load(name, _s(got), r)
            if existing is None:  # deleted meanwhile
                return await self.create_stream(name, spec, client=client)
            if existing.spec != spec:
                raise StreamConflict(
                    f"stream {name!r} exists with {existing.spec.as_json()}", stream_name=name
                )
            return existing, False
        return self._stream(name, spec, inc), True

    async def _load(self, name: str, inc: str, r: Any = None) -> RedisStream | None:
        cached = self._streams.get(name)
        if cached is not None and cached.inc == inc:
            return cached
        r = r if r is not None else self.redis
        raw = await r.hget(f"{PREFIX}:s:{{{name}}}:{inc}:m", "spec")
        if raw is None:
            return None
        fields = json.loads(raw)
        if fields.get("shape") is not None:
            fields["shape"] = tuple(fields["shape"])
        return self._stream(name, StreamSpec(**fields), inc)

    async def get_stream(self, name: str) -> RedisStream:
        check_name(name)
        inc = await self.redis.hget(self._streams_key, name)
        stream = await self._load(name, _s(inc)) if inc is not None else None
        if stream is None:
            raise StreamNotFound(f"no stream named {name!r}", stream_name=name)
        return stream

    async def delete_stream(self, name: str, reason: str = "stream deleted") -> None:
        stream = await self.get_stream(name)
        done = await self.script(
            lua.DELETE,
            stream.base,
            name,
            stream.inc,
            reason,
            self._streams_key,
            stream.channel,
        )
        if not int(done):
            raise StreamNotFound(f"no stream named {name!r}", stream_name=name)
        stream._data.wake()
        stream._space.wake()

    async def list_streams(self) -> list[RedisStream]:
        names = await self.redis.hgetall(self._streams_key)
        out = []
        for name, inc in sorted(names.items()):
            stream = await self._load(_s(name), _s(inc))
            if stream is not None:
                out.append(stream)
        return out

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.lean is not None:
            await self.lean.aclose()
        if self._redis is not None:
            try:  # gone: this replica's counts stop counting now, not in a few seconds
                await self._redis.delete(self.alive_prefix + self.replica)
            except RedisError:
                pass
            await self._redis.aclose()

    def close(self, reason: str = "server shutting down") -> None:
        """This replica stops: its consumers' responses are cut so their clients resume
        on another replica; the streams stay in Redis for the others."""
        self.leaving = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def stop() -> None:
            self._wake_all()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        for call in list(self._calls):
            call.cancel()

        try:
            asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
