"""Local stream buffers: queue-to-iterator (`Buffer`), iterator-to-queue (`Prefetch`), batching.

Parity with the seed's `roverd.channels.utils`, with its known weaknesses fixed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from queue import Empty, Full, Queue
from types import TracebackType
from typing import (
    Any,
    Generic,
    Literal,
    NoReturn,
    Protocol,
    Self,
    TypeAlias,
    TypeVar,
    overload,
    runtime_checkable,
)

import numpy as np

__all__ = [
    "Buffer",
    "Data",
    "ExceptionSentinel",
    "Prefetch",
    "ReadableQueue",
    "Streamable",
    "batch_iterator",
]

T = TypeVar("T")

Data: TypeAlias = np.ndarray | bytes | bytearray
"""Generic writable data.

- `np.ndarray`: shape and dtype have semantic meaning and are verified.
- `bytes` / `bytearray`: the caller already did any binary conversion; no type or shape
  verification is performed.
"""


@dataclass
class ExceptionSentinel:
    """Sentinel wrapping an exception that should bubble up to the reader of a stream.

    The exception is wrapped (rather than put into the stream as-is) so that users may put
    actual `Exception` objects into a stream as ordinary items.

    Args:
        exception: the exception to re-raise in the reading thread.
    """

    exception: BaseException


@runtime_checkable
class ReadableQueue(Protocol):
    """The read side of a queue: anything with `get` and `empty`, like `queue.Queue`.

    Runtime-checkable, so `isinstance(queue.Queue(), ReadableQueue)` is `True` and code
    written as `if isinstance(stream, ReadableQueue): stream = Buffer(stream)` works with
    ndrelay's queues unchanged.
    """

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return an item; block (up to `timeout`) if none is available."""
        ...

    def empty(self) -> bool:
        """Return `True` if the queue is (momentarily) empty."""
        ...


Streamable: TypeAlias = Iterator[T] | Iterable[T] | Queue[T | None | ExceptionSentinel]
"""Any stream-like container.

Unlike an `Iterator[T]` or `Iterable[T]`, a `Queue` may also yield `None` at the end of the
stream, or an `ExceptionSentinel` if the producer raised.
"""


class _End:
    """Marker remembered by a `Buffer` once its stream has ended."""


_END = _End()


class Buffer(Generic[T]):
    """Iterator over a queue (queue to iterator).

    Accepts two "signals" in the queue:

    - `None`: the stream is complete (`StopIteration`).
    - `ExceptionSentinel(e)`: the producer failed; `e` is raised in the thread that reads
      from the buffer.

    Terminals are sticky: when a `Buffer` reads `None` or an `ExceptionSentinel`, it puts
    it back on the queue (with `put_nowait`; skipped if the queue is full or has no
    `put_nowait`), so every other `Buffer` over the same queue ends or raises as well.
    The `Buffer` also remembers the terminal: after the end, every further `next()` raises
    `StopIteration` again; after an error, every further `next()` raises the same exception
    object again.

    Args:
        queue: the queue to read from; should yield `None` when the stream is complete.
            Anything with `get()` works (see `ReadableQueue`).
    """

    def __init__(self, queue: Queue[T | None | ExceptionSentinel] | ReadableQueue) -> None:
        self.queue = queue
        # `_END` after the end, the sentinel after an error, `None` while the stream is open.
        self._terminal: _End | ExceptionSentinel | None = None
        # The producer's traceback, restored on every re-raise so that it does not grow.
        self._traceback: TracebackType | None = None

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        """Return the next item.

        Returns:
            The next item from the queue, blocking until one is available.

        Raises:
            StopIteration: the stream ended (now or earlier).
            BaseException: whatever exception the producer raised (now or earlier).
        """
        if self._terminal is not None:
            self._raise_terminal(self._terminal)
        item = self.queue.get()
        if item is None:
            self._terminal = _END
        elif isinstance(item, ExceptionSentinel):
            self._terminal = item
            self._traceback = item.exception.__traceback__
        else:
            return item
        self._put_back(item)
        self._raise_terminal(self._terminal)

    def _put_back(self, item: ExceptionSentinel | None) -> None:
        put_nowait = getattr(self.queue, "put_nowait", None)
        if put_nowait is None:
            return
        try:
            put_nowait(item)
        except Full:
            pass

    def _raise_terminal(self, terminal: _End | ExceptionSentinel) -> NoReturn:
        if isinstance(terminal, ExceptionSentinel):
            raise terminal.exception.with_traceback(self._traceback)
        raise StopIteration


class Prefetch(Buffer[T]):
    """Prefetch an iterator in a background thread (iterator to queue).

    A daemon thread named `"ndrelay-prefetch"` fills a bounded `queue.Queue(maxsize=size)`
    from `iterator`. Use the `Prefetch` as an iterator (`for x in Prefetch(...)`) or read
    its `.queue` directly: `None` is put on the queue when the iterator is exhausted, and
    an `ExceptionSentinel` if it raised; iterating re-raises that exception, with its
    original type, in the reading thread.

    Call `close()`, or use it as a context manager (`with Prefetch(it) as p:`), to stop the
    thread when you stop reading early; otherwise the thread stays blocked on the full
    queue (and holds the source iterator) for the life of the process.

    Args:
        iterator: any iterable or iterator; must never yield `None`.
        size: prefetch buffer size in items (at least 1).

    Raises:
        ValueError: `size` is less than 1.
        TypeError: `iterator` is not iterable.
    """

    # How often a producer blocked on a full queue checks whether it was closed. `close()`
    # also drains the queue, which wakes the producer at once; this is only the fallback.
    _POLL_INTERVAL = 0.05

    queue: Queue[T | None | ExceptionSentinel]

    def __init__(self, iterator: Iterable[T] | Iterator[T], size: int = 64) -> None:
        if size < 1:
            raise ValueError(f"Prefetch size must be at least 1, got {size!r}")
        super().__init__(Queue(maxsize=size))
        self.iterator = iterator
        self._source: Iterator[T] = iter(iterator)
        self._stop = threading.Event()
        self._close_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._prefetch, name="ndrelay-prefetch", daemon=True)
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the producer thread and close the source iterator.

        Wakes the producer even if it is blocked on a full queue, has it call the source
        iterator's `close()` (if it has one; this runs a generator's `finally` blocks) from
        its own thread, and waits up to `timeout` seconds for the thread to exit. Items not
        yet read are discarded; afterwards the queue holds a single `None`, so readers of
        `.queue` and other `Buffer`s over it see the end, and iterating this `Prefetch`
        raises `StopIteration` (or re-raises the producer's exception if it had already
        been delivered). Closing again is a no-op.

        If the source iterator blocks forever inside `next()`, nothing can interrupt it:
        `close()` returns after `timeout`, and the daemon thread stays until the source
        returns, then exits without putting anything more on the queue.

        Args:
            timeout: seconds to wait for the thread to exit; `None` waits indefinitely.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._drain()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._drain()
        if self._terminal is None:
            self._terminal = _END
        try:
            self.queue.put_nowait(None)
        except Full:  # pragma: no cover - the queue was just drained and size >= 1
            pass

    def _drain(self) -> None:
        while True:
            try:
                self.queue.get_nowait()
            except Empty:
                return

    def _put(self, item: T | None | ExceptionSentinel) -> bool:
        """Put `item`, waiting while the queue is full; `False` if closed meanwhile."""
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=self._POLL_INTERVAL)
            except Full:
                continue
            return True
        return False

    def _prefetch(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = next(self._source)
                except StopIteration:
                    self._put(None)
                    return
                if not self._put(item):
                    return
        except BaseException as exc:  # forwarded to the reader, who re-raises it
            self._put(ExceptionSentinel(exc))
        finally:
            if self._stop.is_set():
                self._close_source()

    def _close_source(self) -> None:
        # Runs in the producer thread: a generator can't be closed from another thread
        # while it is executing, and here it is suspended.
        close = getattr(self._source, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception:
            # Nobody is left to receive it: the reader called close() and stopped reading.
            pass


def _stack(items: Sequence[Any]) -> np.ndarray:
    """Stack same-shape, same-dtype arrays into one array of shape `(n, *item_shape)`.

    Args:
        items: a non-empty sequence of `np.ndarray`s.

    Returns:
        The stacked array (a copy).

    Raises:
        ValueError: `items` is empty, an item is not an `np.ndarray`, or an item's shape or
            dtype differs from item 0's; the message names the item's index in the batch.
    """
    if len(items) == 0:
        raise ValueError("cannot stack an empty batch")
    first = items[0]
    if not isinstance(first, np.ndarray):
        raise ValueError(f"cannot stack batch: item 0 is {type(first).__name__}, not a numpy array")
    shape, dtype = first.shape, first.dtype
    for i in range(1, len(items)):
        item = items[i]
        if not isinstance(item, np.ndarray):
            raise ValueError(
                f"cannot stack batch: item {i} is {type(item).__name__}, not a numpy array"
            )
        if item.shape != shape or item.dtype != dtype:
            raise ValueError(
                f"cannot stack batch: item {i} has shape {item.shape} and dtype {item.dtype}; "
                f"item 0 has shape {shape} and dtype {dtype}"
            )
    return np.stack(items)


@overload
def batch_iterator(
    iterator: Iterator[T] | Iterable[T], size: int = ..., stack: Literal[False] = ...
) -> Iterator[list[T]]: ...
@overload
def batch_iterator(
    iterator: Iterator[Any] | Iterable[Any], size: int = ..., *, stack: Literal[True]
) -> Iterator[np.ndarray]: ...
@overload
def batch_iterator(
    iterator: Iterator[Any] | Iterable[Any], size: int = ..., stack: bool = ...
) -> Iterator[list[Any]] | Iterator[np.ndarray]: ...


def batch_iterator(
    iterator: Iterator[Any] | Iterable[Any], size: int = 8, stack: bool = False
) -> Iterator[list[Any]] | Iterator[np.ndarray]:
    """Convert an iterator into a batched version.

    Batches hold `size` items; the last one holds the rest (it is never empty). An empty
    input gives no batches.

    Args:
        iterator: input iterator or iterable.
        size: batch size (at least 1).
        stack: if `True`, each batch is one `np.ndarray` of shape `(n, *item_shape)` made
            with `np.stack`, instead of a list; all items must then be arrays of one shape
            and dtype.

    Returns:
        An iterator over the batches. `size` is checked at once; items are read lazily.

    Raises:
        ValueError: `size` is less than 1 (raised by the call itself); with `stack=True`, an
            item is not an array, or its shape or dtype differs from the batch's first item
            (raised while iterating, naming the item's index in the batch).
    """
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size!r}")
    if stack:
        return map(_stack, _batches(iterator, size))
    return _batches(iterator, size)


def _batches(iterator: Iterator[T] | Iterable[T], size: int) -> Iterator[list[T]]:
    buf: list[T] = []
    for item in iterator:
        buf.append(item)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf
