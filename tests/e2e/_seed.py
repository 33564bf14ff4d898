"""The seed library's own `Buffer` and `ExceptionSentinel` (roverd.channels.utils), copied
from ../shared/seed/: classes other than ndrelay's, as in code written against roverd."""

from __future__ import annotations

from dataclasses import dataclass
from queue import Queue
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class ExceptionSentinel:
    """Sentinel class to indicate an exception, which should bubble up.

    !!! info

        We use an `ExceptionSentinel` wrapping the actual exception in case
        users want to put an actual `Exception` into a stream.
    """

    exception: Exception


class Buffer(Generic[T]):
    """Simple queue buffer (i.e. queue to iterator) with batching.

    Accepts the following "signals":

    - `None`: indicates that the stream is complete (i.e. `StopIteration`).
    - `ExceptionSentinel`: indicates that a generic exception occurred, which
        should be re-raised in the thread which reads from the buffer.

    Args:
        queue: queue to use as a buffer. Should return `None` when the stream
            is complete (i.e. `StopIteration`).
    """

    def __init__(self, queue: Queue[T | None | ExceptionSentinel]) -> None:
        self.queue = queue

    def __iter__(self):
        return self

    def __next__(self) -> T:
        item = self.queue.get()
        if isinstance(item, ExceptionSentinel):
            raise item.exception
        if item is None:
            raise StopIteration
        else:
            return item
