"""The relay-wide memory bound: one byte budget that every stream of a registry draws on.

A stream reserves an item's bytes when it takes the item in and releases them when the
item leaves its buffer (delivered and done with, evicted, or the stream closed). When a
reservation is refused the producer waits, as on a full stream, until another stream
releases bytes: threads on `wait`, coroutines on a future from `watch`. Lock order:
a stream's lock, then the budget's (the budget never takes a stream's lock).
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["MemoryBudget"]


class MemoryBudget:
    """Bytes buffered over all streams, bounded by `limit`.

    An item larger than the whole limit is let in only while nothing else is held, so
    that it cannot wait forever; the total then passes the limit by that one item.

    Args:
        limit: most payload bytes held at once over all streams.
    """

    __slots__ = ("_cond", "_futures", "_generation", "_lock", "limit", "used")

    def __init__(self, limit: int) -> None:
        if type(limit) is not int or limit < 1:
            raise ValueError(f"the memory limit must be a positive number of bytes, got {limit!r}")
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # producer threads wait here
        self._futures: list[asyncio.Future[None]] = []  # producer coroutines wait here
        self._generation = 0  # counts releases, so that a waiter never misses one

    def try_reserve(self, nbytes: int) -> int | None:
        """Reserve `nbytes`: `None` if done, else a ticket to pass to `wait`/`watch`."""
        with self._lock:
            used = self.used
            if used + nbytes <= self.limit or used == 0:
                self.used = used + nbytes
                return None
            return self._generation

    def release(self, nbytes: int) -> None:
        """Give back `nbytes` reserved earlier; wakes producers waiting for room."""
        if nbytes <= 0:
            return
        with self._lock:
            self.used -= nbytes
            self._generation += 1
            futures, self._futures = self._futures, []
            self._cond.notify_all()
        for fut in futures:
            loop = fut.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, fut)

    def wait(self, ticket: int, timeout: float) -> None:
        """Wait (in a thread) until bytes are released after `ticket`, or `timeout`."""
        with self._lock:
            if self._generation == ticket:
                self._cond.wait(timeout)

    def watch(self, ticket: int, fut: asyncio.Future[None]) -> None:
        """Resolve `fut` once bytes are released after `ticket` (at once if they were)."""
        with self._lock:
            if self._generation == ticket:
                self._futures.append(fut)
                return
        if not fut.done():
            fut.set_result(None)

    def forget(self, fut: asyncio.Future[None]) -> None:
        """Drop a future given to `watch` (its waiter gave up)."""
        with self._lock:
            try:
                self._futures.remove(fut)
            except ValueError:
                pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
