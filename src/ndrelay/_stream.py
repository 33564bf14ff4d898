"""Pure per-stream reader state: frames in, items or batches out, terminal noted (no I/O)."""

from __future__ import annotations

from typing import Any

import numpy as np

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

    def handle_all(self, frames: list[Frame]) -> list[Any]:
        """`handle` for several frames; the units of all of them."""
        if self.batch is not None or self.finished:
            return [unit for frame in frames for unit in self.handle(frame)]
        out = []
        last = self.last_seq
        for frame in frames:
            if self.finished:
                break  # the stream is over: the reader stops here
            # the common case inline: one item per frame, no batching
            if type(frame) is DataFrame and frame.count is None:
                seq = frame.seq
                if seq > last + 1 and last >= 0:
                    self.gaps += seq - last - 1
                last = seq
                out.append(frame.data)
            else:
                self.last_seq = last
                out += self.handle(frame)
                last = self.last_seq
        self.last_seq = last
        return out

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
            if self.stack:
                return self._add_block(frame)
            self._pending.extend(frame.items())
            return self._full_batches()
        if isinstance(frame, EndFrame | ErrorFrame):
            self.finished = True
            if isinstance(frame, ErrorFrame):
                self.error = frame.to_exception(self.name)
            return self.flush()
        return []  # heartbeat

    def _add_block(self, frame: DataFrame) -> list[Any]:
        """Stacked batches from blocks of rows: one concatenation, then views of it."""
        data = frame.data
        if not isinstance(data, np.ndarray):
            raise ValueError(
                f"cannot stack batch: item seq {frame.seq} is {type(data).__name__}, "
                "not a numpy array"
            )
        block = data if frame.count is not None else data[None]
        pending = self._pending
        if pending and (block.dtype, block.shape[1:]) != (pending[0].dtype, pending[0].shape[1:]):
            raise ValueError(
                f"cannot stack batch: item seq {frame.seq} has shape {block.shape[1:]} and "
                f"dtype {block.dtype}; the batch so far has shape {pending[0].shape[1:]} "
                f"and dtype {pending[0].dtype}"
            )
        pending.append(block)
        held = sum(len(b) for b in pending)
        batch = self.batch
        assert batch is not None
        if held < batch:
            return []
        joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
        full = held - held % batch
        self._pending = [joined[full:]] if full < held else []
        return [joined[i : i + batch] for i in range(0, full, batch)]

    def _full_batches(self) -> list[Any]:
        batch = self.batch
        assert batch is not None
        pending = self._pending
        if len(pending) < batch:
            return []
        full = len(pending) - len(pending) % batch
        self._pending = pending[full:]
        return [pending[i : i + batch] for i in range(0, full, batch)]

    def flush(self) -> list[Any]:
        """Units still held: the last, partial batch (at the end of the stream)."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        if self.stack:
            return [np.concatenate(pending) if len(pending) > 1 else pending[0]]
        return [pending]
