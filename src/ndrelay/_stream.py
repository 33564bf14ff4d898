"""Pure per-stream reader state: frames in, items or batches out, terminal noted (no I/O)."""

from __future__ import annotations

from typing import Any

from ._buffers import _stack
from ._exceptions import RemoteProtocolError
from ._frames import DataFrame, EndFrame, ErrorFrame, Frame

__all__ = ["StreamState"]


class StreamState:
    """What a consumer makes of the frames of one stream.

    `handle(frame)` returns the units ready for the user: items, or, with `batch=N`,
    lists of N items (arrays of shape `(N, ...)` with `stack=True`; the last one may be
    shorter). At an `end` or `error` frame it returns the partial batch, and sets
    `finished`, with `error` holding the `RemoteError` to raise after those units.

    Attributes:
        last_seq: seq of the last item received (-1 before any).
        gaps: items skipped by the relay (fanout drop policies), seen as holes in `seq`.
    """

    def __init__(self, name: str, batch: int | None = None, stack: bool = False) -> None:
        if batch is not None and batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        self.name = name
        self.batch = batch
        self.stack = stack
        self.last_seq = -1
        self.gaps = 0
        self.finished = False
        self.error: BaseException | None = None
        self._pending: list[Any] = []

    def handle(self, frame: Frame) -> list[Any]:
        if self.finished:
            raise RemoteProtocolError(f"frame after the end of stream {self.name!r}")
        if isinstance(frame, DataFrame):
            if frame.seq > self.last_seq + 1 and self.last_seq >= 0:
                self.gaps += frame.seq - self.last_seq - 1
            count = 1 if frame.count is None else frame.count
            self.last_seq = frame.seq + count - 1
            batch = self.batch
            if batch is None:
                return frame.items() if frame.count is not None else [frame.data]
            if frame.count == batch and not self._pending:
                # a full batch from the server: pass it on without splitting
                return [frame.data if self.stack else frame.items()]
            self._pending.extend(frame.items())
            return self._full_batches()
        if isinstance(frame, EndFrame | ErrorFrame):
            self.finished = True
            if isinstance(frame, ErrorFrame):
                self.error = frame.to_exception(self.name)
            return self.flush()
        return []  # heartbeat

    def _unit(self, items: list[Any]) -> Any:
        return _stack(items) if self.stack else items

    def _full_batches(self) -> list[Any]:
        batch = self.batch
        assert batch is not None
        pending = self._pending
        if len(pending) < batch:
            return []
        out = [
            self._unit(pending[i : i + batch]) for i in range(0, len(pending) - batch + 1, batch)
        ]
        self._pending = pending[len(out) * batch :]
        return out

    def flush(self) -> list[Any]:
        """Units still held, the last batch partial (at the end of the stream)."""
        if self.batch is None or not self._pending:
            return []
        out = self._full_batches()
        if self._pending:
            out.append(self._unit(self._pending))
            self._pending = []
        return out
