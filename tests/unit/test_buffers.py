"""Tests for `ndrelay._buffers`: Buffer, Prefetch, batch_iterator and stacking."""

from __future__ import annotations

import faulthandler
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from ndrelay._buffers import (
    Buffer,
    ExceptionSentinel,
    Prefetch,
    ReadableQueue,
    _stack,
    batch_iterator,
)

WAIT = 5.0  # upper bound for every wait; nothing here should come close to it


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    # Buffer.__next__ blocks without a timeout, by design. Should a bug leave a test
    # waiting on an empty queue, dump all tracebacks and exit instead of hanging the suite.
    faulthandler.dump_traceback_later(6 * WAIT, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ndrelay-prefetch"]


def filled(*items: Any, maxsize: int = 0) -> queue.Queue[Any]:
    q: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
    for item in items:
        q.put(item)
    return q


def get(q: queue.Queue[Any]) -> Any:
    return q.get(timeout=WAIT)


class Tracked:
    """An infinite generator that records whether its `finally` ran, and where."""

    def __init__(self) -> None:
        self.produced = 0
        self.closed = threading.Event()
        self.closed_in: threading.Thread | None = None

    def __iter__(self) -> Iterator[int]:
        try:
            while True:
                yield self.produced
                self.produced += 1
        finally:
            self.closed_in = threading.current_thread()
            self.closed.set()


class Boom(Exception):
    pass


def failing(n: int, exc: BaseException) -> Iterator[int]:
    yield from range(n)
    raise exc


# --- Buffer ---------------------------------------------------------------------------


def test_buffer_yields_items_in_order_and_ends_on_none() -> None:
    buf: Buffer[int] = Buffer(filled(1, 2, 3, None))
    assert list(buf) == [1, 2, 3]


def test_buffer_keeps_queue_attribute() -> None:
    q = filled(None)
    assert Buffer(q).queue is q


def test_buffer_is_its_own_iterator() -> None:
    buf: Buffer[int] = Buffer(filled(None))
    assert iter(buf) is buf


@pytest.mark.parametrize("item", [0, "", b"", [], False, Exception("an item, not an error")])
def test_buffer_passes_falsy_and_exception_items_through(item: Any) -> None:
    assert list(Buffer(filled(item, None))) == [item]


def test_buffer_raises_exception_sentinel_in_reader() -> None:
    buf: Buffer[int] = Buffer(filled(1, ExceptionSentinel(Boom("bad")), 2))
    assert next(buf) == 1
    with pytest.raises(Boom, match="bad"):
        next(buf)


def test_buffer_remembers_end() -> None:
    q = filled(1, None)
    buf: Buffer[int] = Buffer(q)
    assert list(buf) == [1]
    q.get_nowait()  # remove the sticky None: the Buffer must not need it
    q.put(99)
    for _ in range(3):
        with pytest.raises(StopIteration):
            next(buf)
    assert q.get_nowait() == 99


def test_buffer_remembers_error() -> None:
    exc = Boom("once")
    buf: Buffer[int] = Buffer(filled(ExceptionSentinel(exc)))
    for _ in range(3):
        with pytest.raises(Boom) as info:
            next(buf)
        assert info.value is exc


def test_buffer_reraise_does_not_grow_traceback() -> None:
    buf: Buffer[int] = Buffer(filled(ExceptionSentinel(Boom())))
    depths = []
    for _ in range(3):
        with pytest.raises(Boom) as info:
            next(buf)
        depths.append(len(info.traceback))
    assert depths[0] == depths[1] == depths[2]


@pytest.mark.parametrize("readers", [2, 3])
def test_sticky_end_reaches_every_buffer(readers: int) -> None:
    q = filled(1, 2, None)
    buffers: list[Buffer[int]] = [Buffer(q) for _ in range(readers)]
    assert list(buffers[0]) == [1, 2]
    for buf in buffers[1:]:
        assert list(buf) == []
    assert q.get_nowait() is None  # still there for later readers


@pytest.mark.parametrize("readers", [2, 3])
def test_sticky_error_reaches_every_buffer(readers: int) -> None:
    exc = Boom("for all")
    q = filled(ExceptionSentinel(exc))
    buffers: list[Buffer[int]] = [Buffer(q) for _ in range(readers)]
    for buf in buffers:
        with pytest.raises(Boom) as info:
            next(buf)
        assert info.value is exc


def test_sticky_end_wakes_concurrent_readers() -> None:
    q: queue.Queue[Any] = queue.Queue()
    results: list[list[int]] = [[], [], []]

    def read(i: int) -> None:
        results[i] = list(Buffer(q))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for i in range(30):
        q.put(i)
    q.put(None)
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert sorted(sum(results, [])) == list(range(30))  # each item read exactly once


class AlwaysFullQueue(queue.Queue[Any]):
    def put_nowait(self, item: Any) -> None:
        raise queue.Full


def test_sticky_terminal_tolerates_full_queue() -> None:
    q = AlwaysFullQueue()
    q.put(None)
    buf: Buffer[int] = Buffer(q)
    for _ in range(2):
        with pytest.raises(StopIteration):
            next(buf)
    assert q.empty()


class ListQueue:
    """A minimal read-only queue: `get` and `empty`, no `put`."""

    def __init__(self, *items: Any) -> None:
        self.items = list(items)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return self.items.pop(0)

    def empty(self) -> bool:
        return not self.items


def test_readable_queue_protocol() -> None:
    assert isinstance(queue.Queue(), ReadableQueue)
    assert isinstance(queue.SimpleQueue(), ReadableQueue)
    assert isinstance(ListQueue(), ReadableQueue)
    assert not isinstance([], ReadableQueue)
    assert not isinstance(object(), ReadableQueue)


def test_buffer_over_queue_without_put() -> None:
    q = ListQueue(1, 2, None)
    buf: Buffer[int] = Buffer(q)
    assert list(buf) == [1, 2]
    assert q.empty()  # nowhere to put the terminal back, and no error for it
    with pytest.raises(StopIteration):
        next(buf)


# --- Prefetch -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 64])
def test_prefetch_as_iterator(size: int) -> None:
    with Prefetch(range(100), size=size) as p:
        assert list(p) == list(range(100))


def test_prefetch_accepts_iterable_and_iterator() -> None:
    with Prefetch([1, 2, 3]) as a, Prefetch(iter([1, 2, 3])) as b:
        assert list(a) == list(b) == [1, 2, 3]


def test_prefetch_keeps_iterator_attribute() -> None:
    source = [1]
    with Prefetch(source) as p:
        assert p.iterator is source


def test_prefetch_empty_source() -> None:
    source: list[int] = []
    with Prefetch(source) as p:
        assert list(p) == []


def test_prefetch_via_queue_ends_with_none() -> None:
    with Prefetch(range(3), size=2) as p:
        assert [get(p.queue) for _ in range(4)] == [0, 1, 2, None]


def test_prefetch_via_queue_delivers_exception_sentinel() -> None:
    exc = Boom("producer")
    with Prefetch(failing(2, exc)) as p:
        items = [get(p.queue) for _ in range(3)]
    assert items[:2] == [0, 1]
    assert isinstance(items[2], ExceptionSentinel)
    assert items[2].exception is exc


@pytest.mark.parametrize("exc", [Boom("x"), ValueError("v"), KeyError("k"), SystemExit(3)])
def test_prefetch_reraises_with_original_type(exc: BaseException) -> None:
    with Prefetch(failing(3, exc)) as p:
        seen: list[int] = []
        with pytest.raises(type(exc)) as info:
            for x in p:
                seen.append(x)
        assert info.value is exc
        assert seen == [0, 1, 2]
        with pytest.raises(type(exc)):  # remembered
            next(p)


def test_prefetch_reraises_in_reading_thread() -> None:
    caught: list[BaseException] = []

    def read() -> None:
        try:
            list(p)
        except Boom as e:
            caught.append(e)

    with Prefetch(failing(1, Boom())) as p:
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(WAIT)
    assert len(caught) == 1


def test_prefetch_two_buffers_over_its_queue_both_end() -> None:
    with Prefetch(range(10), size=4) as p:
        other: Buffer[int] = Buffer(p.queue)
        assert list(p) == list(range(10))
        assert list(other) == []


@pytest.mark.parametrize("size", [0, -1])
def test_prefetch_rejects_bad_size(size: int) -> None:
    before = len(prefetch_threads())
    with pytest.raises(ValueError, match="at least 1"):
        Prefetch([1], size=size)
    assert len(prefetch_threads()) == before


def test_prefetch_rejects_non_iterable() -> None:
    with pytest.raises(TypeError):
        Prefetch(42)  # type: ignore[arg-type]


def test_prefetch_thread_is_named_daemon() -> None:
    before = set(threading.enumerate())
    with Prefetch(Tracked(), size=1):
        (thread,) = set(threading.enumerate()) - before
        assert thread.name == "ndrelay-prefetch"
        assert thread.daemon


def _blocked_prefetch(source: Tracked) -> Prefetch[int]:
    p = Prefetch(source, size=1)
    # size=1: one item in the queue, one more held by the producer, which is now blocked.
    assert wait_until(lambda: p.queue.full() and source.produced >= 1)
    return p


def test_close_stops_producer_blocked_on_full_queue() -> None:
    before = len(threading.enumerate())
    source = Tracked()
    p = _blocked_prefetch(source)
    assert len(threading.enumerate()) == before + 1
    p.close()
    assert wait_until(lambda: len(threading.enumerate()) == before)
    assert source.closed.wait(WAIT)
    assert source.closed_in is not None
    assert source.closed_in is not threading.current_thread()  # closed by the producer
    assert source.closed_in.name == "ndrelay-prefetch"


def test_context_manager_stops_producer_blocked_on_full_queue() -> None:
    before = len(threading.enumerate())
    source = Tracked()
    with _blocked_prefetch(source) as p:
        assert next(p) == 0
    assert wait_until(lambda: len(threading.enumerate()) == before)
    assert source.closed.wait(WAIT)


def test_context_manager_closes_on_exception() -> None:
    before = len(threading.enumerate())
    source = Tracked()
    with pytest.raises(Boom), _blocked_prefetch(source):
        raise Boom
    assert wait_until(lambda: len(threading.enumerate()) == before)
    assert source.closed.is_set()


def test_close_twice_is_harmless() -> None:
    source = Tracked()
    p = _blocked_prefetch(source)
    p.close()
    p.close()
    with p:
        pass
    assert source.closed.is_set()
    with pytest.raises(StopIteration):
        next(p)


def test_iteration_ends_after_close() -> None:
    source = Tracked()
    p = _blocked_prefetch(source)
    assert next(p) == 0
    p.close()
    for _ in range(2):
        with pytest.raises(StopIteration):
            next(p)
    assert list(p) == []
    other: Buffer[int] = Buffer(p.queue)  # other Buffers see the end too...
    assert list(other) == []
    assert get(p.queue) is None  # ...and so do plain queue readers


def test_close_wakes_reader_blocked_on_empty_queue() -> None:
    release = threading.Event()

    def stuck() -> Iterator[int]:
        release.wait(WAIT)
        yield 1

    p = Prefetch(stuck())
    result: list[list[int]] = []
    reader = threading.Thread(target=lambda: result.append(list(p)))
    reader.start()
    p.close(timeout=0.01)
    reader.join(WAIT)
    release.set()
    assert not reader.is_alive()
    assert result == [[]]
    assert wait_until(lambda: not p._thread.is_alive())


def test_close_after_exhaustion() -> None:
    before = len(threading.enumerate())
    p = Prefetch(range(3))
    assert list(p) == [0, 1, 2]
    p.close()
    assert wait_until(lambda: len(threading.enumerate()) == before)
    assert list(p) == []


def test_close_keeps_remembered_error() -> None:
    p = Prefetch(failing(0, Boom()))
    with pytest.raises(Boom):
        next(p)
    p.close()
    with pytest.raises(Boom):
        next(p)


def test_close_with_source_blocked_in_next_returns_after_timeout() -> None:
    release = threading.Event()
    entered = threading.Event()

    def stuck() -> Iterator[int]:
        entered.set()
        release.wait(WAIT)
        yield 1
        yield 2

    p = Prefetch(stuck())
    assert entered.wait(WAIT)
    p.close(timeout=0.01)  # cannot interrupt next(); returns anyway
    assert list(p) == []
    release.set()  # the source returns: the thread exits and puts nothing more
    assert wait_until(lambda: not p._thread.is_alive())
    assert get(p.queue) is None
    assert p.queue.empty()


def test_close_ignores_error_raised_while_closing_source() -> None:
    def bad_finally() -> Iterator[int]:
        try:
            while True:
                yield 0
        finally:
            raise Boom("in finally")

    p = Prefetch(bad_finally(), size=1)
    assert wait_until(lambda: p.queue.full())
    p.close()
    assert wait_until(lambda: not p._thread.is_alive())


# --- batch_iterator and _stack --------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "size", "expected"),
    [
        (16, 8, [8, 8]),
        (10, 4, [4, 4, 2]),
        (3, 8, [3]),
        (0, 8, []),
        (3, 1, [1, 1, 1]),
    ],
)
def test_batch_sizes(n: int, size: int, expected: list[int]) -> None:
    batches = list(batch_iterator(range(n), size=size))
    assert [len(b) for b in batches] == expected
    assert all(isinstance(b, list) for b in batches)
    assert sum(batches, []) == list(range(n))


def test_batch_default_size_is_8() -> None:
    assert [len(b) for b in batch_iterator(range(20))] == [8, 8, 4]


def test_batch_is_lazy() -> None:
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for i in range(100):
            pulled.append(i)
            yield i

    it = batch_iterator(source(), size=3)
    assert next(it) == [0, 1, 2]
    assert pulled == [0, 1, 2]


@pytest.mark.parametrize("size", [0, -3])
@pytest.mark.parametrize("stack", [False, True])
def test_batch_rejects_bad_size_at_call(size: int, stack: bool) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        batch_iterator([], size=size, stack=stack)


@pytest.mark.parametrize("dtype", ["float32", "uint8", "<i8", "complex64", "bool"])
@pytest.mark.parametrize("item_shape", [(), (3,), (2, 4)])
def test_batch_stack_shapes_and_dtype(dtype: str, item_shape: tuple[int, ...]) -> None:
    items = [np.full(item_shape, i, dtype=dtype) for i in range(5)]
    batches = list(batch_iterator(items, size=2, stack=True))
    assert [b.shape for b in batches] == [(2, *item_shape), (2, *item_shape), (1, *item_shape)]
    assert all(isinstance(b, np.ndarray) and b.dtype == np.dtype(dtype) for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), np.stack(items))


def test_batch_stack_empty_input() -> None:
    assert list(batch_iterator([], size=4, stack=True)) == []


def test_batch_stack_mixed_shape() -> None:
    items = [np.zeros(3, np.float32)] * 3 + [np.zeros(4, np.float32)]
    with pytest.raises(ValueError) as info:
        list(batch_iterator(items, size=8, stack=True))
    assert str(info.value) == (
        "cannot stack batch: item 3 has shape (4,) and dtype float32; "
        "item 0 has shape (3,) and dtype float32"
    )


def test_batch_stack_mixed_dtype() -> None:
    items = [np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.int16)]
    with pytest.raises(ValueError) as info:
        list(batch_iterator(items, size=2, stack=True))
    assert str(info.value) == (
        "cannot stack batch: item 1 has shape (2, 2) and dtype int16; "
        "item 0 has shape (2, 2) and dtype uint8"
    )


def test_batch_stack_index_is_within_batch() -> None:
    items = [np.zeros(2)] * 5 + [np.zeros(3)]
    it = batch_iterator(items, size=4, stack=True)
    assert next(it).shape == (4, 2)
    with pytest.raises(ValueError, match="item 1 has shape"):
        next(it)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([b"ab", b"cd"], "item 0 is bytes, not a numpy array"),
        ([np.zeros(2), bytearray(2)], "item 1 is bytearray, not a numpy array"),
        ([np.zeros(2), np.zeros(2), [0.0, 0.0]], "item 2 is list, not a numpy array"),
        ([np.float32(1), np.float32(2)], "item 0 is float32, not a numpy array"),
    ],
)
def test_batch_stack_rejects_non_arrays(items: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        list(batch_iterator(items, size=8, stack=True))


def test_stack_helper() -> None:
    out = _stack((np.arange(3), np.arange(3) + 1))
    np.testing.assert_array_equal(out, [[0, 1, 2], [1, 2, 3]])
    with pytest.raises(ValueError, match="empty batch"):
        _stack([])


def test_stack_copies() -> None:
    a = np.zeros(3)
    out = _stack([a])
    a[0] = 1
    assert out.shape == (1, 3) and out[0, 0] == 0


def test_prefetch_then_batch_stack() -> None:
    frames = (np.full((2, 3), i, np.float32) for i in range(7))
    with Prefetch(frames, size=2) as p:
        batches = list(batch_iterator(p, size=3, stack=True))
    assert [b.shape for b in batches] == [(3, 2, 3), (3, 2, 3), (1, 2, 3)]
    assert [float(b[0, 0, 0]) for b in batches] == [0.0, 3.0, 6.0]
