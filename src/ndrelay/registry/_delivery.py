"""Acknowledged queue delivery, pure bookkeeping: which items are pending for which consumer
id, in the order they were delivered, and which were acknowledged (DESIGN.md §5).

No locks, no clocks, no I/O: a backend calls these under its own lock with the time it read.
An entry is `(seq, item, nbytes)`; an item may be a `Block` of several consecutive seqs, so
acknowledging inside one splits it.
"""

from __future__ import annotations

import bisect
from collections import deque
from itertools import islice, repeat
from operator import itemgetter
from typing import Any

from .._exceptions import AckConflict
from ._block import Block

__all__ = ["ConsumerRecord", "SeqRanges", "entry_count", "split_entry"]

Entry = tuple[int, Any, int]

_seq_of = itemgetter(0)
_bytes_of = itemgetter(2)


def entry_count(entry: Entry) -> int:
    """How many items (seqs) an entry holds."""
    item = entry[1]
    return len(item.array) if type(item) is Block else 1


def split_entry(entry: Entry, k: int) -> tuple[Entry, Entry]:
    """A `Block` entry cut after its first `k` items: (head, rest)."""
    seq, block, nbytes = entry
    head_array, rest_array = block.array[:k], block.array[k:]
    head = (seq, Block(head_array), head_array.nbytes)
    rest = (seq + k, Block(rest_array), nbytes - head_array.nbytes)
    return head, rest


class SeqRanges:
    """A set of seqs kept as sorted, merged `[lo, hi]` ranges (bounded: the lowest go first)."""

    __slots__ = ("_his", "_limit", "_los")

    def __init__(self, limit: int = 4096) -> None:
        self._los: list[int] = []
        self._his: list[int] = []
        self._limit = limit

    def add(self, lo: int, hi: int) -> None:
        los, his = self._los, self._his
        if los and lo == his[-1] + 1:  # the common case: right after the last range
            his[-1] = hi
            return
        i = bisect.bisect_left(los, lo)
        if i > 0 and his[i - 1] >= lo - 1:
            i -= 1
            lo = los[i]
        j = i
        while j < len(los) and los[j] <= hi + 1:
            hi = max(hi, his[j])
            j += 1
        los[i:j] = [lo]
        his[i:j] = [hi]
        if len(los) > self._limit:
            del los[0], his[0]

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self._los, seq) - 1
        return i >= 0 and self._his[i] >= seq


class ConsumerRecord:
    """What the relay keeps for one consumer id of a queue stream.

    Attributes:
        id: the consumer id.
        pending: entries delivered and not yet acknowledged, in delivery order.
        sent: how many of `pending` the current connection has (the rest are resent first).
        conn: the connection delivering to it now, or `None` (then `expires` is set).
        lease: seconds its pending items wait for it after its connection ended.
        expires: when (monotonic) its pending items go back to the queue, if unconnected.
        acked: seqs it acknowledged (to tell a repeated ack from a wrong one).
    """

    __slots__ = ("acked", "conn", "expires", "id", "lease", "pending", "pending_items", "sent")

    def __init__(self, consumer_id: str, lease: float) -> None:
        self.id = consumer_id
        self.pending: deque[Entry] = deque()
        self.pending_items = 0
        self.sent = 0
        self.conn: Any = None
        self.lease = lease
        self.expires: float | None = None
        self.acked = SeqRanges()

    def attach(self, conn: Any, after: int | None) -> None:
        """A connection takes this id over; what it lacks is resent first. `after`: the
        last seq the client says it received (`None`: resend everything pending)."""
        self.conn = conn
        self.expires = None
        self.sent = 0
        if after is not None:
            pending = self.pending
            for i, entry in enumerate(pending):
                n = entry_count(entry)
                if entry[0] <= after < entry[0] + n:
                    k = after - entry[0] + 1
                    if k < n:  # the client got part of a block: the rest goes again
                        head, rest = split_entry(entry, k)
                        pending[i] = head
                        pending.insert(i + 1, rest)
                    self.sent = i + 1
                    break

    def deliver(self, entry: Entry) -> None:
        """Record a new entry as pending (and sent on the current connection)."""
        self.pending.append(entry)
        self.pending_items += entry_count(entry)
        self.sent += 1

    def ack(self, upto: int) -> tuple[int, int]:
        """Acknowledge every pending entry delivered up to and including the one holding
        seq `upto`: `(items, bytes)` acknowledged. `AckConflict` if `upto` was never
        delivered to this id (or was given back)."""
        pending = self.pending
        if pending:
            fast = self._ack_run(upto)
            if fast is not None:
                return fast
        index = -1
        count = nbytes = 0
        lo = hi = -2  # the run of consecutive seqs acknowledged so far
        acked = self.acked
        for i, entry in enumerate(pending):
            seq, item, size = entry
            n = len(item.array) if type(item) is Block else 1
            if seq <= upto < seq + n:
                index = i
                break
            count += n
            nbytes += size
            if seq == hi + 1:
                hi = seq + n - 1
            else:
                if lo >= 0:
                    acked.add(lo, hi)
                lo, hi = seq, seq + n - 1
        if index < 0:
            if upto in acked:
                return 0, 0  # a repeated ack
            raise AckConflict(
                f"seq {upto} is not pending for consumer {self.id!r} (never delivered to "
                "it, given back, or returned to the queue when its lease ran out)",
                consumer=self.id,
                seq=upto,
            )
        popleft = pending.popleft
        for _ in range(index):
            popleft()
        entry = pending[0]
        n = entry_count(entry)
        k = upto - entry[0] + 1
        if k < n:  # its rest stays pending (and sent, if it was)
            head, pending[0] = split_entry(entry, k)
            removed = index
        else:
            head = popleft()
            removed = index + 1
        count += k
        nbytes += head[2]
        if entry[0] == hi + 1:
            hi = upto
        else:
            if lo >= 0:
                acked.add(lo, hi)
            lo, hi = entry[0], upto
        acked.add(lo, hi)
        self.pending_items -= count
        self.sent = max(0, self.sent - removed)
        return count, nbytes

    def _ack_run(self, upto: int) -> tuple[int, int] | None:
        """`ack` when the entries up to `upto` are single items of consecutive seqs from
        the first pending one (a consumer alone on its stream): counted without a Python
        loop per entry. `None` when they are not (then `ack` walks them)."""
        pending = self.pending
        first = pending[0][0]
        k = upto - first  # entries before the one holding `upto`, if consecutive
        if k < 0 or k >= len(pending) or pending[k][0] != upto:
            return None
        # consecutive first seqs of distinct items: every entry before the k-th is one item
        if k and list(map(_seq_of, islice(pending, k))) != list(range(first, upto)):
            return None
        nbytes = sum(map(_bytes_of, islice(pending, k)))
        popleft = pending.popleft
        for _ in repeat(None, k):
            popleft()
        entry = pending[0]
        if entry_count(entry) > 1:  # a block starting at `upto`: its rest stays pending
            head, pending[0] = split_entry(entry, 1)
            removed = k
        else:
            head = popleft()
            removed = k + 1
        nbytes += head[2]
        self.acked.add(first, upto)
        self.pending_items -= k + 1
        self.sent = max(0, self.sent - removed)
        return k + 1, nbytes

    def release(self) -> list[Entry]:
        """Give back every pending entry (to go back into the queue)."""
        out = list(self.pending)
        self.pending.clear()
        self.pending_items = 0
        self.sent = 0
        return out

    def to_send(self) -> Entry | None:
        """The next pending entry the current connection lacks, marked as sent."""
        if self.sent < len(self.pending):
            entry = self.pending[self.sent]
            self.sent += 1
            return entry
        return None
