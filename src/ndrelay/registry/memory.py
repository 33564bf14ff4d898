"""The in-memory registry: bounded per-stream buffers shared by threads and one event loop.

Strategy: each stream's state sits behind one `threading.Lock`, held only for a few
list operations, so the event loop never waits on it for long. Waiting is done outside
the lock: producer threads on a `threading.Condition`, coroutines (uploads, consumers)
on futures that the other side resolves with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import numpy as np

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
from ._base import StreamSpec, check_consumer_args, check_id, check_name
from ._block import Block
from ._budget import MemoryBudget
from ._delivery import ConsumerRecord, Entry, entry_count, split_entry
from ._schema import SchemaCheck

#: Lease of a departed consumer's pending items when nobody says otherwise (seconds).
DEFAULT_LEASE = 10.0

__all__ = ["DEFAULT_LEASE", "Block", "MemoryConsumer", "MemoryRegistry", "MemoryStream"]


#: Producer ids remembered per stream (idempotent uploads): every `publish` names itself,
#: so the table forgets the ids not heard of longest beyond this many.
MAX_PRODUCERS = 10_000


class _Waiters:
    """Futures of coroutines waiting for a change; resolved from any thread."""

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []

    def add(self) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        return fut

    def wake(self) -> None:
        """Resolve every waiting future (caller holds the stream lock)."""
        futures = self._futures
        if not futures:
            return
        self._futures = []
        running = asyncio._get_running_loop()
        for fut in futures:
            loop = fut.get_loop()
            if loop is running:
                if not fut.done():
                    fut.set_result(None)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, fut)

    def discard(self, fut: asyncio.Future[None]) -> None:
        try:
            self._futures.remove(fut)
        except ValueError:
            pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class MemoryStream(SchemaCheck):
    """One stream: a bounded buffer of `(seq, item)` with queue or fanout delivery.

    With a `budget`, the bytes it holds also count against the relay-wide bound.
    """

    def __init__(
        self,
        name: str,
        spec: StreamSpec,
        budget: MemoryBudget | None = None,
        *,
        lease: float = DEFAULT_LEASE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.spec = spec
        self._budget = budget
        self._ticket: int | None = None  # set when the budget refused the last item
        self.lease = lease
        self._clock = clock
        self.created = time.time()
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)  # producer threads wait here
        self._blocked = 0  # how many
        self._space_waiters = _Waiters()  # producer coroutines wait here
        self._data_waiters = _Waiters()  # consumer coroutines wait here
        self._items: deque[tuple[int, Any, int]] = deque()  # (seq, item or Block, nbytes)
        self._depth = 0  # items held (a Block holds several)
        self._size, self._max_bytes = spec.size, spec.max_bytes
        self._bytes = 0
        self._produced_bytes = 0  # payload bytes ever accepted (for rates)
        self._next_seq = 0
        self._terminal: EndFrame | ErrorFrame | None = None
        self._aborted = False  # deleted/shut down: consumers stop at once
        self._consumers: set[MemoryConsumer] = set()
        # queue mode: acknowledged delivery (pending items still count in _depth/_bytes)
        self._records: dict[str, ConsumerRecord] = {}
        self._pending_items = 0
        self._pending_bytes = 0
        self._next_expiry = math.inf  # earliest lease end of a departed consumer
        self._fanout_ids: dict[str, MemoryConsumer] = {}
        # idempotent uploads: per producer id, the next seq expected and the newest claim
        self._producer_next: dict[str, int] = {}
        self._producer_claims: dict[str, int] = {}
        self._assigned = 0
        self.consumed = 0
        self.consumed_bytes = 0  # payload bytes ever handed to consumers (redeliveries too)
        self.dropped = 0
        self.producers = 0
        self.acked = 0
        self.redelivered = 0
        self.expired = 0
        self._dtype = np.dtype(spec.dtype) if spec.dtype is not None else None
        self._checked: set[tuple[np.dtype[Any], tuple[int, ...]]] = set()  # layouts let in

    # -- producer side ---------------------------------------------------------------

    def _closed(self) -> StreamClosed:
        terminal = self._terminal
        if self._aborted and isinstance(terminal, ErrorFrame):
            why = f"was closed by the relay: {terminal.message}"
            return StreamClosed(f"stream {self.name!r} {why}", stream_name=self.name)
        state = "failed" if isinstance(terminal, ErrorFrame) else "ended"
        return StreamClosed.finished(self.name, state)

    def _room(self, nbytes: int, n: int = 1) -> bool:
        """Whether `n` more items fit now (lock held); may evict in fanout mode."""
        if self._terminal is not None:
            raise self._closed()
        items = self._items
        if not self._depth or (  # one item always fits into an empty buffer
            self._depth + n <= self.spec.size and self._bytes + nbytes <= self.spec.max_bytes
        ):
            return self._reserve(nbytes)
        if self.spec.mode == "queue":
            return False
        # fanout (one item per entry): old items may go, but none that a `block`
        # consumer still needs; an item may need several to go (max_bytes): wait
        # unless all of them may.
        floor = min((c.cursor for c in self._consumers if c.policy == "block"), default=None)
        evict, count, total = 0, len(items), self._bytes
        while count and (count >= self.spec.size or total + nbytes > self.spec.max_bytes):
            seq, _, size = items[evict]
            if floor is not None and seq >= floor:
                return False
            evict += 1
            count -= 1
            total -= size
        self._evict(evict)
        return self._reserve(nbytes)

    def _evict(self, evict: int) -> None:
        """Drop the `evict` oldest items of a fanout stream (lock held)."""
        items, freed = self._items, 0
        for _ in range(evict):
            seq, _, size = items.popleft()
            freed += size
            self._depth -= 1
            for c in self._consumers:
                if c.cursor <= seq:  # drop_oldest/latest consumers lose it
                    c.cursor = seq + 1
                    c.dropped += 1
                    self.dropped += 1
        self._bytes -= freed
        if self._budget is not None:
            self._budget.release(freed)

    def _reserve(self, nbytes: int) -> bool:
        """Take `nbytes` from the relay-wide budget (lock held). A fanout stream may drop
        its own oldest items for it, as it would for its `size`; else the ticket to wait
        with is kept in `_ticket`."""
        budget = self._budget
        self._ticket = None
        if budget is None:
            return True
        while (ticket := budget.try_reserve(nbytes)) is not None:
            items = self._items
            if self.spec.mode == "queue" or not items:
                self._ticket = ticket
                return False
            floor = min((c.cursor for c in self._consumers if c.policy == "block"), default=None)
            if floor is not None and items[0][0] >= floor:
                self._ticket = ticket
                return False
            self._evict(1)
        return True

    def _place(self, item: Any) -> Any:
        """Add what fits of `item` now (lock held): `None` once all of it is in, else
        the part still to add (a `Block` may go in pieces). Wakes consumers."""
        if type(item) is Block:
            n = len(item.array)
            if self.spec.mode != "queue":  # fanout keeps one item per entry
                for i in range(n):
                    if self._place(item.array[i]) is not None:
                        return Block(item.array[i:])
                return None
            if n == 0:
                return None
            free = self.spec.size - self._depth
            if free <= 0 or not self._room(item.array[:1].nbytes * min(n, free), min(n, free)):
                return item
            if n > free:
                head, rest = Block(item.array[:free]), Block(item.array[free:])
            else:
                head, rest = item, None
            self._append(head, head.array.nbytes, len(head.array))
            return rest
        nbytes = item.nbytes if isinstance(item, np.ndarray) else len(item)
        if not self._room(nbytes):
            return item
        self._append(item, nbytes, 1)
        return None

    def _fits(self, item: Any) -> bool:
        """The hot path of `_place` (lock held): append an array if there is room without
        evicting anything; the caller wakes consumers (once for many items)."""
        if (
            type(item) is np.ndarray
            and self._terminal is None
            and self._depth < self._size
            and self._bytes + item.nbytes <= self._max_bytes
            and (self._budget is None or self._budget.try_reserve(item.nbytes) is None)
        ):
            seq = self._next_seq
            self._next_seq = seq + 1
            self._items.append((seq, item, item.nbytes))
            self._bytes += item.nbytes
            self._produced_bytes += item.nbytes
            self._depth += 1
            return True
        return False

    def _append(self, item: Any, nbytes: int, n: int) -> None:
        seq = self._next_seq
        self._next_seq = seq + n
        self._items.append((seq, item, nbytes))
        self._bytes += nbytes
        self._produced_bytes += nbytes
        self._depth += n
        self._data_waiters.wake()

    async def put(self, item: Any) -> None:
        await self.put_many([item])

    def offer(self, items: Sequence[Any]) -> tuple[list[Any], asyncio.Future[None] | None]:
        """Add what fits of `items` now, in order (call on an event loop).

        Returns what is left (its first element may be the rest of a `Block`), and,
        if anything is, a future that resolves when room may have been made: await
        it, then offer the rest again.
        """
        with self._lock:
            fits = self._fits
            for i, item in enumerate(items):
                if fits(item):
                    continue
                self._data_waiters.wake()
                rest = self._place(item)
                if rest is not None:
                    return [rest, *items[i + 1 :]], self._room_future()
            self._data_waiters.wake()
            return [], None

    def _room_future(self) -> asyncio.Future[None]:
        """A future resolved when room may have been made (lock held): in this stream,
        or in the relay-wide budget if that is what refused the item."""
        fut = self._space_waiters.add()
        if self._ticket is not None and self._budget is not None:
            self._budget.watch(self._ticket, fut)
        return fut

    def forget(self, fut: asyncio.Future[None]) -> None:
        """Drop a future `offer` returned (its waiter gave up)."""
        with self._lock:
            self._space_waiters.discard(fut)
            if self._budget is not None:
                self._budget.forget(fut)

    async def put_many(self, items: Sequence[Any]) -> None:
        """Add items in order, as many per lock round as fit, waiting while full."""
        rest, fut = self.offer(items)
        while fut is not None:
            try:
                await fut
            finally:
                self.forget(fut)
            rest, fut = self.offer(rest)

    def put_blocking(self, item: Any, timeout: float | None = None) -> None:
        with self._lock:  # the Condition's own lock: cheaper to take than the Condition
            if self._fits(item):
                self._data_waiters.wake()
                return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while (item := self._place(item)) is not None:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError(f"stream {self.name!r} stayed full for {timeout} s")
                self._wait_space(wait)

    def _wait_space(self, timeout: float) -> None:
        """Wait (lock held) until a consumer takes something, or `timeout`; or, if the
        relay-wide budget refused the item, until another stream frees bytes."""
        ticket, budget = self._ticket, self._budget
        if ticket is not None and budget is not None:
            self._lock.release()  # so that consumers can take from this stream meanwhile
            try:
                budget.wait(ticket, timeout)
            finally:
                self._lock.acquire()
            return
        self._blocked += 1
        try:
            self._space.wait(timeout)
        finally:
            self._blocked -= 1

    def _space_freed(self) -> None:
        """Wake producers waiting for room (lock held)."""
        self._space_waiters.wake()
        if self._blocked:
            self._space.notify_all()

    def put_many_blocking(self, items: Sequence[Any]) -> None:
        with self._lock:
            for item in items:
                while (item := self._place(item)) is not None:
                    self._wait_space(1.0)

    def finish(self, frame: Frame) -> None:
        if not isinstance(frame, EndFrame | ErrorFrame):
            raise TypeError("finish() takes an EndFrame or an ErrorFrame")
        with self._lock:
            if self._terminal is not None:
                raise self._closed()
            self._terminal = type(frame)(**{**_fields(frame), "seq": self._next_seq})
            self._wake_all()

    def abort(self, reason: str) -> None:
        """Fail the stream now (deleted, shutting down): consumers stop at once."""
        with self._lock:
            if self._terminal is None or isinstance(self._terminal, EndFrame):
                self._terminal = ErrorFrame(
                    seq=self._next_seq, origin="relay", type="StreamClosed", message=reason
                )
            self._aborted = True
            self._items.clear()
            if self._budget is not None:
                self._budget.release(self._bytes)
            self._records.clear()
            self._pending_items = self._pending_bytes = 0
            self._next_expiry = math.inf
            self._bytes = 0
            self._depth = 0
            self._wake_all()

    def _wake_all(self) -> None:
        self._data_waiters.wake()
        self._space_waiters.wake()
        self._space.notify_all()

    @contextmanager
    def producing(self) -> Iterator[None]:
        """Count a producer (upload or publish thread) while the block runs."""
        with self._lock:
            self.producers += 1
        try:
            yield
        finally:
            with self._lock:
                self.producers -= 1

    @property
    def finished(self) -> bool:
        return self._terminal is not None

    # -- the server's interface (registry.Stream): coroutines over the calls above -----

    async def aoffer(self, items: Sequence[Any]) -> tuple[list[Any], asyncio.Future[None] | None]:
        return self.offer(items)

    async def aoffer_seq(
        self, producer: str, claim: int, pairs: Sequence[tuple[int, Any]]
    ) -> tuple[list[tuple[int, Any]], asyncio.Future[None] | None, int]:
        return self.offer_seq(producer, claim, pairs)

    async def afinish(self, frame: Frame) -> None:
        self.finish(frame)

    def finish_blocking(self, frame: Frame) -> None:
        self.finish(frame)

    @asynccontextmanager
    async def aproducing(self) -> AsyncIterator[None]:
        with self.producing():
            yield

    async def ainfo(self) -> dict[str, Any]:
        return self.info()

    async def alatest(self) -> tuple[int, Any] | None:
        return self.latest()

    async def aopen_consumer(
        self,
        policy: str = "block",
        *,
        consumer: str | None = None,
        after: int | None = None,
        lease: float | None = None,
        auto_ack: bool | None = None,
    ) -> MemoryConsumer:
        return self.open_consumer(
            policy, consumer=consumer, after=after, lease=lease, auto_ack=auto_ack
        )

    # -- idempotent uploads ----------------------------------------------------------

    async def claim_producer(self, producer: str) -> tuple[int, int]:
        """Start an upload as `producer`: `(claim, next seq expected from it)`. A newer
        claim supersedes an older upload of the same id (a retry after a cut)."""
        check_id("producer", producer)
        with self._lock:
            # the newest claim last: the table forgets the producers not heard of longest
            claim = self._producer_claims.pop(producer, 0) + 1
            self._producer_claims[producer] = claim
            if len(self._producer_claims) > MAX_PRODUCERS:
                oldest = next(iter(self._producer_claims))
                del self._producer_claims[oldest]
                self._producer_next.pop(oldest, None)
            self._space_waiters.wake()  # a superseded upload waiting for room stops
            return claim, self._producer_next.get(producer, 0)

    async def producer_position(self, producer: str) -> int:
        """The next seq expected from `producer` (0 for a new one)."""
        with self._lock:
            return self._producer_next.get(producer, 0)

    def offer_seq(
        self, producer: str, claim: int, pairs: Sequence[tuple[int, Any]]
    ) -> tuple[list[tuple[int, Any]], asyncio.Future[None] | None, int]:
        """`offer` for a named producer: `pairs` are `(producer seq, item)`.

        An item below the seq expected from `producer` is a duplicate and skipped (the
        part of a `Block` below it too); one above it raises `SeqGap` (with `.index`, its
        position in `pairs`). The expected seq advances exactly as items are placed, so
        an upload cut at any point resumes without loss or duplicate.

        Returns what is left, a future to await before offering it again (or `None`),
        and how many items were skipped as duplicates.
        """
        dups = 0
        with self._lock:
            if self._producer_claims.get(producer) != claim:
                raise StreamClosed(
                    f"a newer upload of producer {producer!r} took over", stream_name=self.name
                )
            expected = self._producer_next.get(producer, 0)
            fits = self._fits
            try:
                for i, (pseq, item) in enumerate(pairs):
                    if (pseq == expected or pseq < 0) and fits(item):  # the common case
                        expected += 1
                        continue
                    if pseq < 0:
                        pseq = expected  # numbered by the relay
                    n = len(item.array) if type(item) is Block else 1
                    if pseq + n <= expected:
                        dups += n
                        continue
                    if pseq < expected:  # a Block straddling the expected seq
                        skip = expected - pseq
                        item = Block(item.array[skip:])
                        dups += skip
                        pseq, n = expected, n - skip
                    if pseq > expected:
                        gap = SeqGap(
                            f"producer {producer!r} sent seq {pseq}; the relay expects "
                            f"seq {expected} from it next",
                            producer=producer,
                            expected_seq=expected,
                            stream_name=self.name,
                        )
                        gap.index = i  # type: ignore[attr-defined]
                        raise gap
                    rest = self._place(item)
                    if rest is None:
                        placed = n
                    elif type(rest) is Block:
                        placed = n - len(rest.array)
                    else:  # a single item that did not fit: nothing of it placed
                        placed = 0
                    expected += placed
                    if rest is not None:
                        return (
                            [(expected, rest), *pairs[i + 1 :]],
                            self._room_future(),  # this stream's room, or the budget's
                            dups,
                        )
                return [], None, dups
            finally:
                self._producer_next[producer] = expected
                self._data_waiters.wake()

    # -- consumer side ---------------------------------------------------------------

    def open_consumer(
        self,
        policy: str = "block",
        *,
        consumer: str | None = None,
        after: int | None = None,
        lease: float | None = None,
        auto_ack: bool | None = None,
    ) -> MemoryConsumer:
        """A connection of a consumer.

        Args:
            policy: fanout: what happens when it falls behind.
            consumer: its id (1-64 of `A-Za-z0-9._-`); `None`: the relay assigns one.
            after: the last seq the consumer already has. Queue mode: pending items
                delivered after it are sent again first; fanout: replay from `after + 1`.
            lease: queue mode: seconds its pending items wait for it once its connection
                ends (default: the stream's lease).
            auto_ack: acknowledge items once written to the connection (default: only
                when the relay assigned the id, since such a reader cannot acknowledge).
        """
        check_consumer_args(policy, consumer, after, lease)
        with self._lock:
            if consumer is None:
                self._assigned += 1
                consumer = f"c{self._assigned}-{id(self) % 100000:05d}"
                if auto_ack is None:
                    auto_ack = True
            handle = MemoryConsumer(self, policy, self._next_seq, consumer, bool(auto_ack))
            if self.spec.mode == "queue":
                self._expire_due()
                record = self._records.get(consumer)
                if record is None:
                    record = ConsumerRecord(consumer, self.lease if lease is None else lease)
                    self._records[consumer] = record
                elif lease is not None:
                    record.lease = lease
                old = record.conn
                if old is not None:
                    old.superseded = True
                    self._consumers.discard(old)
                record.attach(handle, after)
                handle.record = record
                self._data_waiters.wake()  # a superseded connection stops
            else:
                if after is not None:
                    handle.cursor = min(after + 1, self._next_seq)
                old = self._fanout_ids.get(consumer)
                if old is not None:
                    old.superseded = True
                    self._consumers.discard(old)
                    self._data_waiters.wake()
                self._fanout_ids[consumer] = handle
            self._consumers.add(handle)
            return handle

    async def ack(self, consumer: str, upto: int | None, release: bool = False) -> dict[str, int]:
        """Acknowledge `consumer`'s pending items delivered up to seq `upto` (`None` or -1:
        none); with `release`, give back the rest (to the front of the queue, at once)
        and end its connection, if any.

        Returns `{"acked": n, "released": m, "pending": k}`.

        Raises:
            ConsumerNotFound: no such consumer on this stream (or its lease ran out).
            AckConflict: `upto` was never delivered to it (or was given back).
            StreamClosed: a fanout stream (nothing to acknowledge: resume with `after`).
        """
        return self.ack_now(consumer, upto, release)

    def ack_now(self, consumer: str, upto: int | None, release: bool = False) -> dict[str, int]:
        """`ack` without an event loop (in-process callers and tests)."""
        if self.spec.mode != "queue":
            raise StreamClosed(
                f"stream {self.name!r} is a fanout stream: there is nothing to acknowledge "
                "(resume with after=<seq>)",
                stream_name=self.name,
            )
        with self._lock:
            self._expire_due()
            record = self._records.get(consumer)
            if record is None:
                raise ConsumerNotFound(
                    f"stream {self.name!r} has no consumer {consumer!r} (never connected, "
                    "released, or its lease ran out)",
                    consumer=consumer,
                    stream_name=self.name,
                )
            count, nbytes = record.ack(upto) if upto is not None and upto >= 0 else (0, 0)
            self._depth -= count
            self._bytes -= nbytes
            if self._budget is not None:
                self._budget.release(nbytes)
            self._pending_items -= count
            self._pending_bytes -= nbytes
            self.acked += count
            released = 0
            if release:
                entries = record.release()
                released = sum(entry_count(e) for e in entries)
                self._requeue(entries)
                conn, record.conn = record.conn, None
                if conn is not None:
                    conn.superseded = True
                    self._consumers.discard(conn)
            pending = record.pending_items
            if record.conn is None and not record.pending:
                del self._records[consumer]
            if count:
                self._space_freed()
            if released or count and self._terminal is not None:
                self._data_waiters.wake()  # items back, or the end may go out now
            return {"acked": count, "released": released, "pending": pending}

    def _requeue(self, entries: list[Entry]) -> None:
        """Put pending entries back at the front of the queue, in seq order (lock held)."""
        if not entries:
            return
        for entry in entries:
            self._pending_items -= entry_count(entry)
            self._pending_bytes -= entry[2]
        entries.sort(key=_first)
        items = self._items
        if not items or entries[-1][0] < items[0][0]:
            items.extendleft(reversed(entries))
        else:
            self._items = deque(heapq.merge(entries, items, key=_first))
        self._data_waiters.wake()

    def _expire_due(self) -> None:
        """Return the pending items of departed consumers whose lease ran out (lock held)."""
        if self._next_expiry == math.inf:
            return
        now = self._clock()
        if now < self._next_expiry:
            return
        soonest = math.inf
        for record in list(self._records.values()):
            if record.conn is not None or record.expires is None:
                continue
            if record.expires <= now:
                entries = record.release()
                self.expired += sum(entry_count(e) for e in entries)
                self._requeue(entries)
                del self._records[record.id]
            else:
                soonest = min(soonest, record.expires)
        self._next_expiry = soonest

    def expire(self) -> None:
        """Return the pending items of departed consumers whose lease ran out now."""
        with self._lock:
            self._expire_due()

    def _release(self, consumer: MemoryConsumer) -> None:
        with self._lock:
            self._consumers.discard(consumer)
            if self._fanout_ids.get(consumer.id) is consumer:
                del self._fanout_ids[consumer.id]
            record = consumer.record
            if record is not None and record.conn is consumer:
                record.conn = None
                if record.pending:
                    record.expires = self._clock() + record.lease
                    self._next_expiry = min(self._next_expiry, record.expires)
                    if record.lease <= 0:
                        self._expire_due()
                else:
                    del self._records[record.id]
            # a departed `block` consumer may have been what held the producer
            self._space_freed()

    def _leased(self) -> bool:
        """Whether a departed consumer's pending items wait for its lease (lock held)."""
        if self._next_expiry == math.inf:
            return False
        return any(r.conn is None and r.pending for r in self._records.values())

    def _seconds_to_expiry(self) -> float | None:
        """How long until the next lease ends (lock held), `None` if none runs."""
        if self._next_expiry == math.inf:
            return None
        return max(0.0, self._next_expiry - self._clock())

    # -- state -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        with self._lock:
            self._expire_due()
            terminal = self._terminal
            state = (
                "open"
                if terminal is None
                else "ended"
                if isinstance(terminal, EndFrame)
                else "failed"
            )
            return {
                "name": self.name,
                **self.spec.as_json(),
                "state": state,
                "depth": self._depth - self._pending_items,
                "pending": self._pending_items,
                "produced": self._next_seq,
                "produced_bytes": self._produced_bytes,
                "consumed": self.consumed,
                "consumed_bytes": self.consumed_bytes,
                "acked": self.acked,
                "redelivered": self.redelivered,
                "dropped": self.dropped,
                "bytes": self._bytes,
                "producers": self.producers,
                "consumers": len(self._consumers),
            }

    def pending_of(self, consumer: str) -> list[int]:
        """The seqs pending for `consumer`, in delivery order (for tests and tools)."""
        with self._lock:
            record = self._records.get(consumer)
            if record is None:
                return []
            return [e[0] + i for e in record.pending for i in range(entry_count(e))]

    def latest(self) -> tuple[int, Any] | None:
        """The newest buffered item, without consuming it."""
        with self._lock:
            if not self._items:
                return None
            seq, item, _ = self._items[-1]
            if type(item) is Block:
                return seq + len(item.array) - 1, item.array[-1]
            return seq, item


def _fields(frame: EndFrame | ErrorFrame) -> dict[str, Any]:
    return {name: getattr(frame, name) for name in frame.__dataclass_fields__}


def _first(entry: Entry) -> int:
    return entry[0]


class MemoryConsumer:
    """One connection of a consumer of a `MemoryStream` (see `registry.Consumer`).

    Attributes:
        id: the consumer id (given by the client, or assigned by the relay).
        auto_ack: items are acknowledged once written (readers that cannot acknowledge).
        superseded: a newer connection took this consumer id over (or it was released).
    """

    def __init__(
        self, stream: MemoryStream, policy: str, cursor: int, consumer: str, auto_ack: bool
    ) -> None:
        self.stream = stream
        self.policy = policy
        self.cursor = cursor  # fanout: next seq to deliver
        self.id = consumer
        self.auto_ack = auto_ack
        self.record: ConsumerRecord | None = None
        self.dropped = 0
        self.closed = False
        self.superseded = False

    def _superseded_frame(self) -> ErrorFrame:
        return ErrorFrame(
            seq=self.stream._next_seq,
            origin="relay",
            type="StreamClosed",
            message=f"consumer {self.id!r} was released or connected again elsewhere",
        )

    def take(
        self, max_items: int, max_bytes: int = 1 << 62
    ) -> list[tuple[int, Any]] | Frame | None:
        s = self.stream
        with s._lock:
            if s._aborted:
                return s._terminal
            if self.superseded:
                return self._superseded_frame()
            items = s._items
            if s.spec.mode == "queue":
                s._expire_due()
                items = s._items
                record = self.record
                assert record is not None
                out = []
                taken = count = 0
                while count < max_items and taken < max_bytes:
                    entry = record.to_send()  # what an earlier connection did not get
                    if entry is None:
                        break
                    n = entry_count(entry)
                    out.append((entry[0], entry[1]))
                    taken += entry[2]
                    count += n
                    s.redelivered += n
                fresh = 0
                pending = record.pending
                sent = len(pending)
                before = taken
                popleft, keep, emit = items.popleft, pending.append, out.append
                while items and count < max_items and taken < max_bytes:
                    entry = items[0]
                    item = entry[1]
                    if type(item) is Block:
                        n = len(item.array)
                        if count + n > max_items:  # take the part that fits
                            entry, items[0] = split_entry(entry, max_items - count)
                            item, n = entry[1], max_items - count
                        else:
                            popleft()
                    else:
                        n = 1
                        popleft()
                    keep(entry)
                    emit((entry[0], item))
                    taken += entry[2]
                    count += n
                    fresh += n
                s._pending_bytes += taken - before
                record.sent += len(pending) - sent
                record.pending_items += fresh
                s._pending_items += fresh
                s.consumed += fresh
                s.consumed_bytes += taken
                if not out:
                    # the end goes out once nothing is queued and no departed consumer's
                    # items wait for its lease: they would come back to the queue then
                    return s._terminal if not s._leased() else None
                return out
            if not items or self.cursor > items[-1][0]:
                return s._terminal
            first = items[0][0]
            if self.cursor < first:  # evicted while we lagged
                self.dropped += first - self.cursor
                s.dropped += first - self.cursor
                self.cursor = first
            if self.policy == "latest" and self.cursor < items[-1][0]:
                skipped = items[-1][0] - self.cursor
                self.dropped += skipped
                s.dropped += skipped
                self.cursor = items[-1][0]
            start = self.cursor - first
            stop = min(len(items), start + max_items)
            out = []
            taken = 0
            for i in range(start, stop):
                seq, item, nbytes = items[i]
                out.append((seq, item))
                taken += nbytes
                if taken >= max_bytes:
                    break
            self.cursor = out[-1][0] + 1
            s.consumed += len(out)
            s.consumed_bytes += taken
            s._space_freed()
            return out

    async def atake(
        self, max_items: int, max_bytes: int = 1 << 62
    ) -> list[tuple[int, Any]] | Frame | None:
        return self.take(max_items, max_bytes)

    async def aclose(self) -> None:
        self.close()

    async def wait(self) -> None:
        s = self.stream
        with s._lock:
            if s._aborted or s._terminal is not None and not s._leased():
                return
            if self.superseded:
                return
            if s.spec.mode == "queue":
                record = self.record
                if s._items or (record is not None and record.sent < len(record.pending)):
                    return
                timeout = s._seconds_to_expiry()
            else:
                if s._terminal is not None:
                    return
                if s._items and self.cursor <= s._items[-1][0]:
                    return
                timeout = None
            fut = s._data_waiters.add()
        try:
            if timeout is None:
                await fut
            else:  # a lease runs out then: its items come back
                try:
                    async with asyncio.timeout(timeout + 0.001):
                        await fut
                except TimeoutError:
                    pass
        finally:
            with s._lock:
                s._data_waiters.discard(fut)

    async def ack_written(self, upto: int) -> None:
        """Auto-ack: the items up to seq `upto` were written to the connection."""
        if self.auto_ack and self.record is not None and not self.superseded:
            try:
                self.stream.ack_now(self.id, upto)
            except (ConsumerNotFound, AckConflict, StreamClosed):
                pass  # released or taken over meanwhile: nothing left to acknowledge

    def close(self) -> None:
        """End this connection: its pending items wait for its id for the lease."""
        if not self.closed:
            self.closed = True
            self.stream._release(self)


class MemoryRegistry:
    """Streams kept in this process's memory (the default backend).

    Args:
        max_streams: most streams at once; creating more raises `RegistryError`.
        max_memory: most payload bytes buffered over all streams together (producers
            wait beyond it); `None`: no relay-wide bound.
        lease: default seconds a departed queue consumer's pending items wait for it.
        clock: monotonic time source of the leases (tests pass a fake one).
    """

    def __init__(
        self,
        max_streams: int = 1024,
        max_memory: int | None = None,
        *,
        lease: float = DEFAULT_LEASE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_streams = max_streams
        self.budget = MemoryBudget(max_memory) if max_memory is not None else None
        self.lease = lease
        self._clock = clock
        self._streams: dict[str, MemoryStream] = {}
        self._lock = threading.Lock()

    description = "in-memory streams"
    unavailable: tuple[type[Exception], ...] = ()  # (nothing to reach)

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def create_stream(self, name: str, spec: StreamSpec) -> tuple[MemoryStream, bool]:
        return self.create(name, spec)

    def create_blocking(self, name: str, spec: StreamSpec) -> MemoryStream:
        return self.create(name, spec)[0]

    async def get_stream(self, name: str) -> MemoryStream:
        return self.get(name)

    async def delete_stream(self, name: str, reason: str = "stream deleted") -> None:
        self.delete(name, reason)

    async def list_streams(self) -> list[MemoryStream]:
        return self.streams()

    def create(self, name: str, spec: StreamSpec) -> tuple[MemoryStream, bool]:
        check_name(name)
        with self._lock:
            existing = self._streams.get(name)
            if existing is not None:
                if existing.spec != spec:
                    raise StreamConflict(
                        f"stream {name!r} exists with {existing.spec.as_json()}",
                        stream_name=name,
                    )
                return existing, False
            if len(self._streams) >= self.max_streams:
                raise RegistryError(f"too many streams (limit {self.max_streams})")
            stream = MemoryStream(name, spec, self.budget, lease=self.lease, clock=self._clock)
            self._streams[name] = stream
            return stream, True

    def get(self, name: str) -> MemoryStream:
        check_name(name)
        try:
            return self._streams[name]
        except KeyError:
            raise StreamNotFound(f"no stream named {name!r}", stream_name=name) from None

    def get_or_create(self, name: str) -> MemoryStream:
        try:
            return self.get(name)
        except StreamNotFound:
            with self._lock:
                existing = self._streams.get(name)
            if existing is not None:
                return existing
            try:
                return self.create(name, StreamSpec())[0]
            except StreamConflict:
                return self.get(name)

    def delete(self, name: str, reason: str = "stream deleted") -> None:
        check_name(name)
        with self._lock:
            stream = self._streams.pop(name, None)
        if stream is None:
            raise StreamNotFound(f"no stream named {name!r}", stream_name=name)
        stream.abort(reason)

    def streams(self) -> list[MemoryStream]:
        with self._lock:
            return list(self._streams.values())

    def close(self, reason: str = "server shutting down") -> None:
        for stream in self.streams():
            stream.abort(reason)
