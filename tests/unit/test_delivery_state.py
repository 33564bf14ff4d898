"""Acknowledged queue delivery under random interleavings (hypothesis state machine).

Invariant after every step: each item the stream ever held is queued, pending for exactly
one consumer id, or acknowledged, exactly once; the stream's counters agree; an
acknowledged item is never delivered again; an item given back comes back in seq order.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ndrelay import AckConflict, ConsumerNotFound, EndFrame
from ndrelay.registry import Block, MemoryRegistry, StreamSpec
from ndrelay.registry._delivery import ConsumerRecord, SeqRanges, entry_count

IDS = ["a", "b", "c"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Delivery(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.registry = MemoryRegistry(lease=5.0, clock=self.clock)
        self.stream, _ = self.registry.create("q", StreamSpec(size=40, mode="queue"))
        self.conns: dict[str, object] = {}  # consumer id -> open connection
        self.received: dict[str, list[int]] = {c: [] for c in IDS}  # per id, delivery order
        self.acked: set[int] = set()
        self.loop = asyncio.new_event_loop()

    def teardown(self) -> None:
        self.loop.close()

    # -- producer ------------------------------------------------------------------------

    @precondition(lambda self: not self.stream.finished)
    @rule(n=st.integers(1, 6), block=st.booleans())
    def put(self, n: int, block: bool) -> None:
        if block:
            items = [Block(np.arange(n, dtype=np.int32).reshape(n, 1))]
        else:
            items = [np.zeros(1, np.int32) for _ in range(n)]

        async def offer() -> None:  # what does not fit is dropped (never placed)
            rest, fut = self.stream.offer(items)
            if fut is not None:
                self.stream.forget(fut)

        self.loop.run_until_complete(offer())

    # -- consumers -----------------------------------------------------------------------

    @rule(cid=st.sampled_from(IDS), resume=st.booleans())
    def connect(self, cid: str, resume: bool) -> None:
        got = self.received[cid]
        after = got[-1] if resume and got else None
        old = self.conns.get(cid)
        conn = self.stream.open_consumer(consumer=cid, after=after)
        if old is not None:
            assert old.superseded
            old.close()
        self.conns[cid] = conn
        if after is None:
            # everything pending is sent again: what the client had is forgotten
            self.received[cid] = [s for s in got if s not in self.stream.pending_of(cid)]

    @rule(cid=st.sampled_from(IDS), k=st.integers(1, 8))
    def take(self, cid: str, k: int) -> None:
        conn = self.conns.get(cid)
        if conn is None:
            return
        got = conn.take(k)
        if got is None or isinstance(got, EndFrame):
            return
        assert isinstance(got, list)
        for seq, item in got:
            seqs = range(seq, seq + len(item.array)) if type(item) is Block else [seq]
            for s in seqs:
                assert s not in self.acked, f"acknowledged seq {s} delivered again"
                self.received[cid].append(s)

    @rule(cid=st.sampled_from(IDS), data=st.data(), release=st.booleans())
    def ack(self, cid: str, data: st.DataObject, release: bool) -> None:
        before = self.stream.pending_of(cid)
        got = self.received[cid]
        upto = data.draw(st.sampled_from(got)) if got and data.draw(st.booleans()) else None
        try:
            answer = self.stream.ack_now(cid, upto, release)
        except ConsumerNotFound:
            assert cid not in self._records()
            return
        except AckConflict:
            assert upto not in before
            return
        after = self.stream.pending_of(cid)
        done = before[: len(before) - len(after)] if not release else None
        if upto is not None and upto in before:
            prefix = before[: before.index(upto) + 1]
            assert answer["acked"] == len(prefix)
            self.acked.update(prefix)
            if not release:
                assert after == before[len(prefix) :], (before, after, upto, done)
        else:
            assert answer["acked"] == 0
        if release:
            assert after == []
            assert cid not in self.conns or self.conns[cid].superseded
            self.conns.pop(cid, None)
            self.received[cid] = []

    @rule(cid=st.sampled_from(IDS))
    def disconnect(self, cid: str) -> None:
        conn = self.conns.pop(cid, None)
        if conn is not None:
            conn.close()

    @rule(dt=st.floats(0, 8))
    def time_passes(self, dt: float) -> None:
        self.clock.now += dt
        before = {c: self.stream.pending_of(c) for c in IDS}
        self.stream.expire()
        for cid, seqs in before.items():
            if seqs and not self.stream.pending_of(cid):
                assert cid not in self.conns  # only departed consumers expire
                self.received[cid] = []

    @precondition(lambda self: not self.stream.finished)
    @rule()
    def finish(self) -> None:
        self.stream.finish(EndFrame(seq=0))

    # -- the invariant ---------------------------------------------------------------------

    def _records(self) -> dict[str, object]:
        return self.stream._records

    @invariant()
    def every_item_exactly_once(self) -> None:
        s = self.stream
        queued: list[int] = []
        for seq, item, _ in s._items:
            queued += range(seq, seq + len(item.array)) if type(item) is Block else [seq]
        assert queued == sorted(queued), "the queue is in seq order"
        pending: list[int] = []
        for cid in IDS:
            pending += s.pending_of(cid)
        everything = queued + pending + sorted(self.acked)
        assert sorted(everything) == list(range(s._next_seq)), "each item exactly once"
        assert s._pending_items == len(pending)
        assert s._depth == len(queued) + len(pending)
        assert s.info()["depth"] == len(queued)
        assert s._depth <= s.spec.size + 6  # a Block may be split across the bound
        leased = any(
            s.pending_of(c) and (c not in self.conns or self.conns[c].superseded) for c in IDS
        )
        if s.finished and not queued and not leased:
            for cid, conn in self.conns.items():
                # once a connection has been handed its pending items again, the end follows
                if not conn.superseded and set(s.pending_of(cid)) <= set(self.received[cid]):
                    assert isinstance(conn.take(1), EndFrame)


TestDelivery = Delivery.TestCase
TestDelivery.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_seq_ranges_merge_and_contain():
    r = SeqRanges()
    for lo, hi in [(0, 4), (10, 12), (5, 9), (20, 20), (14, 15)]:
        r.add(lo, hi)
    assert all(s in r for s in range(13))
    assert 13 not in r and 14 in r and 15 in r and 16 not in r and 20 in r
    assert -1 not in r


@pytest.mark.parametrize("release", [False, True])
def test_ack_inside_a_block_splits_it(release):
    registry = MemoryRegistry()
    stream, _ = registry.create("q", StreamSpec(size=64))
    stream.offer([Block(np.arange(10, dtype=np.int64).reshape(10, 1))])
    conn = stream.open_consumer(consumer="w")
    got = conn.take(100)
    assert [seq for seq, _ in got] == [0]
    answer = stream.ack_now("w", 3, release)
    assert answer["acked"] == 4
    if release:
        assert answer["released"] == 6
        assert stream.pending_of("w") == []
        assert stream.info()["depth"] == 6
    else:
        assert stream.pending_of("w") == list(range(4, 10))


def test_the_producer_table_forgets_the_ids_not_heard_of_longest() -> None:
    """Every `publish` names itself: the relay keeps at most `MAX_PRODUCERS` ids per
    stream, and a retry (a recent id) still finds its position."""
    from ndrelay.registry.memory import MAX_PRODUCERS

    registry = MemoryRegistry()
    stream, _ = registry.create("p", StreamSpec(size=8, mode="queue"))

    async def run() -> tuple[int, int, int]:
        claim, _ = await stream.claim_producer("first")
        stream.offer_seq("first", claim, [(0, np.zeros(1)), (1, np.zeros(1))])
        for i in range(MAX_PRODUCERS - 1):
            await stream.claim_producer(f"p{i}")
        kept = await stream.producer_position("first")
        await stream.claim_producer("one-more")  # "first" is now the oldest: forgotten
        return kept, await stream.producer_position("first"), len(stream._producer_claims)

    try:
        kept, forgotten, size = asyncio.run(run())
    finally:
        registry.close()
    assert (kept, forgotten, size) == (2, 0, MAX_PRODUCERS)


class _Walking(ConsumerRecord):
    """A record that always walks its pending entries (no counting shortcut)."""

    def _ack_run(self, upto: int) -> tuple[int, int] | None:
        return None


@st.composite
def _deliveries(draw: st.DrawFn) -> tuple[list[tuple[int, int, int]], int]:
    """Pending entries as (first seq, items, bytes) in delivery order: runs of consecutive
    single items, blocks, gaps (items another consumer got) and seqs given back (lower
    ones after higher), and an `upto` that may or may not be pending."""
    entries = []
    seqs = draw(st.lists(st.integers(0, 60), min_size=1, max_size=30, unique=True))
    if draw(st.booleans()):
        seqs.sort()
    taken: set[int] = set()
    for seq in seqs:
        n = draw(st.integers(1, 3)) if draw(st.integers(0, 4)) == 0 else 1
        span = range(seq, seq + n)
        if taken.intersection(span):
            continue
        taken.update(span)
        entries.append((seq, n, draw(st.integers(1, 100)) * n))
    upto = draw(st.one_of(st.sampled_from(sorted(taken)), st.integers(-1, 70)))
    return entries, upto


@given(_deliveries())
@settings(max_examples=400, deadline=None)
def test_acknowledging_counts_what_walking_the_entries_counts(delivery) -> None:
    """The shortcut for consecutive single items (a consumer alone on its stream) gives
    what walking every entry gives: items, bytes, what stays pending, and the same
    answer to a repeated or wrong acknowledgement."""
    entries, upto = delivery
    records = ConsumerRecord("a", 5.0), _Walking("a", 5.0)
    for record in records:
        for seq, n, nbytes in entries:
            item = Block(np.zeros((n, 2), np.uint8)) if n > 1 else np.zeros(2, np.uint8)
            record.deliver((seq, item, nbytes))
    outcomes = []
    for record in records:
        try:
            first = record.ack(upto)
            again = record.ack(upto)
        except AckConflict:
            outcomes.append("conflict")
            continue
        left = [(seq, entry_count((seq, item, b)), b) for seq, item, b in record.pending]
        outcomes.append((first, again, left, record.pending_items, record.sent))
    assert outcomes[0] == outcomes[1]
