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
        last_seq: seq of the last item received (-1 before any), in the order received.
        gaps: items skipped by the relay (fanout drop policies), seen as holes in `seq`.
        duplicates: fanout items dropped because their seq was seen already (a resume).
        mode: `"queue"`, `"fanout"`, or `None` if unknown (then seqs are not checked).
        unit_seqs: for the units the last `handle`/`handle_all` returned, the seq of each
            one's last item (what an acknowledgement of that unit names).
    """

    def __init__(
        self, name: str, batch: int | None = None, stack: bool = False, mode: str | None = None
    ) -> None:
        if batch is not None and batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        self.name = name
        self.batch = batch
        self.stack = stack
        self.mode = mode
        self.last_seq = -1
        self.gaps = 0
        self.duplicates = 0
        self.finished = False
        self.error: BaseException | None = None
        self.unit_seqs: list[int] = []
        self._pending: list[Any] = []
        self._pending_seqs: list[int] = []  # batch mode: last seq of each pending piece

    def handle_all(self, frames: list[Frame]) -> list[Any]:
        """`handle` for several frames; the units of all of them (`unit_seqs` says the
        seq each one ends with)."""
        if self.batch is not None or self.finished or self.mode == "fanout":
            out: list[Any] = []
            seqs: list[int] = []
            for frame in frames:
                if self.finished:
                    break
                out += self.handle(frame)
                seqs += self.unit_seqs
            self.unit_seqs = seqs
            return out
        out = []
        seqs = []
        last = self.last_seq
        for frame in frames:
            if self.finished:
                break  # the stream is over: the reader stops here
            # the common case inline: one item per frame, no batching
            if type(frame) is DataFrame and frame.count is None:
                last = frame.seq
                out.append(frame.data)
                seqs.append(last)
            else:
                self.last_seq = last
                out += self.handle(frame)
                seqs += self.unit_seqs
                last = self.last_seq
        self.last_seq = last
        self.unit_seqs = seqs
        return out

    def handle(self, frame: Frame) -> list[Any]:
        if self.finished:
            raise RemoteProtocolError(f"frame after the end of stream {self.name!r}")
        if isinstance(frame, DataFrame):
            count = 1 if frame.count is None else frame.count
            first, end = frame.seq, frame.seq + count - 1
            if self.mode == "fanout":
                if end <= self.last_seq:  # seen before (a resume): drop it
                    self.duplicates += count
                    self.unit_seqs = []
                    return []
                if first <= self.last_seq:  # partly seen: keep the new rows
                    skip = self.last_seq - first + 1
                    self.duplicates += skip
                    frame = DataFrame(first + skip, frame.data[skip:], count - skip)
                    count, first = count - skip, first + skip
            if self.mode != "queue" and first > self.last_seq + 1 and self.last_seq >= 0:
                self.gaps += first - self.last_seq - 1
            self.last_seq = end
            batch = self.batch
            if batch is None:
                if frame.count is None:
                    self.unit_seqs = [end]
                    return [frame.data]
                self.unit_seqs = list(range(first, end + 1))
                return frame.items()
            if frame.count == batch and not self._pending:
                # a full batch from the server: pass it on without splitting
                self.unit_seqs = [end]
                return [frame.data if self.stack else frame.items()]
            if self.stack:
                return self._add_block(frame)
            items = frame.items()
            self._pending.extend(items)
            self._pending_seqs.extend(range(first, end + 1))
            return self._full_batches()
        if isinstance(frame, EndFrame | ErrorFrame):
            self.finished = True
            if isinstance(frame, ErrorFrame):
                self.error = frame.to_exception(self.name)
            return self.flush()
        self.unit_seqs = []
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
        self._pending_seqs.append(frame.seq)  # a block's rows have consecutive seqs
        held = sum(len(b) for b in pending)
        batch = self.batch
        assert batch is not None
        if held < batch:
            self.unit_seqs = []
            return []
        row_seqs = self._row_seqs()
        joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
        full = held - held % batch
        if full < held:
            self._pending = [joined[full:]]
            self._pending_seqs = [row_seqs[full]]
        else:
            self._pending, self._pending_seqs = [], []
        self.unit_seqs = [row_seqs[i + batch - 1] for i in range(0, full, batch)]
        return [joined[i : i + batch] for i in range(0, full, batch)]

    def _row_seqs(self) -> list[int]:
        """Stacked mode: the seq of every pending row (blocks of consecutive seqs)."""
        out: list[int] = []
        for block, first in zip(self._pending, self._pending_seqs, strict=True):
            out.extend(range(first, first + len(block)))
        return out

    def _full_batches(self) -> list[Any]:
        batch = self.batch
        assert batch is not None
        pending = self._pending
        if len(pending) < batch:
            self.unit_seqs = []
            return []
        full = len(pending) - len(pending) % batch
        seqs = self._pending_seqs
        self._pending, self._pending_seqs = pending[full:], seqs[full:]
        self.unit_seqs = [seqs[i + batch - 1] for i in range(0, full, batch)]
        return [pending[i : i + batch] for i in range(0, full, batch)]

    def flush(self) -> list[Any]:
        """Units still held: the last, partial batch (at the end of the stream)."""
        pending, self._pending = self._pending, []
        if not pending:
            self._pending_seqs = []
            self.unit_seqs = []
            return []
        if self.stack:
            last = self._row_seqs_of(pending)[-1]
            self._pending_seqs = []
            self.unit_seqs = [last]
            return [np.concatenate(pending) if len(pending) > 1 else pending[0]]
        self.unit_seqs = [self._pending_seqs[-1]]
        self._pending_seqs = []
        return [pending]

    def _row_seqs_of(self, pending: list[Any]) -> list[int]:
        out: list[int] = []
        for block, first in zip(pending, self._pending_seqs, strict=True):
            out.extend(range(first, first + len(block)))
        return out
