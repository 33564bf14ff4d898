"""`RelayClient` end to end through a real server (DESIGN.md §1, §2, §6).

Every consuming loop runs under `bounded(...)`, so a client or server bug fails a test
instead of hanging the suite.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from _sources import bounded, wait_until

import ndrelay
from ndrelay import (
    Buffer,
    ExceptionSentinel,
    LocalProtocolError,
    ReadableQueue,
    RelayClient,
    RemoteError,
    StreamClosed,
    StreamConflict,
    StreamNotFound,
    UploadRefused,
    batch_iterator,
)

pytestmark = [pytest.mark.e2e, pytest.mark.backends]


@pytest.fixture
def client(server):
    with RelayClient(server.url, read_timeout=20) as c:
        yield c


def assert_same_item(got, expected):
    """Exactly the same item: same type, dtype (byte order included), shape and values."""
    if isinstance(expected, np.generic):
        expected = np.asarray(expected)
    if isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray)
        assert got.dtype == expected.dtype
        assert got.shape == expected.shape
        assert got.tobytes() == np.ascontiguousarray(expected).tobytes()
    else:
        assert type(got) is bytes
        assert got == bytes(expected)


def sample_items():
    """Arrays of several dtypes and shapes (0-d, empty, non-contiguous), and bytes."""
    return [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.linspace(-1.0, 1.0, 7),
        np.array(3.5),
        np.array([[1, -2], [3, -4]], dtype=np.int8),
        np.arange(6, dtype=">i4").reshape(2, 3),
        np.array([True, False, True]),
        np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
        np.zeros((0, 5), dtype=np.uint16),
        np.arange(24, dtype=np.uint64).reshape(2, 3, 4)[:, ::2],
        np.array(["ab", "cde"]),
        np.array(["2024-01-01T00:00:00"], dtype="datetime64[ns]"),
        np.float32(2.25),
        b"raw \x00\xff bytes",
        b"",
        bytearray(b"a bytearray"),
        np.full((64, 1024), 7, dtype=np.uint16),  # a frame over the decoder's spill size
    ]


# -- JSON calls ---------------------------------------------------------------------------


def test_healthz_streams_info(client):
    assert client.healthz()["status"] == "ok"
    assert client.healthz()["version"] == ndrelay.__version__
    assert client.streams() == []
    client.create("cam", 16, dtype="f4", shape=(3,))
    [info] = client.streams()
    assert info["name"] == "cam"
    info = client.info("cam")
    assert info["size"] == 16
    assert info["dtype"] == "<f4"
    assert info["shape"] == [3]
    assert info["mode"] == "queue"
    assert info["state"] == "open"
    assert (info["depth"], info["produced"], info["consumers"]) == (0, 0, 0)


def test_create_is_idempotent_and_conflicts(client):
    first = client.create("s", 8, mode="fanout", dtype=np.float32, shape=(2, 2))
    again = client.create("s", 8, mode="fanout", dtype="<f4", shape=[2, 2])
    assert again == first
    with pytest.raises(StreamConflict) as info:
        client.create("s", 8, mode="fanout", dtype="f8", shape=(2, 2))
    assert info.value.stream_name == "s"
    with pytest.raises(StreamConflict):
        client.create("s", 9, mode="fanout", dtype="f4", shape=(2, 2))
    assert client.info("s")["dtype"] == "<f4"


def test_delete(client):
    client.create("gone")
    client.delete("gone")
    assert client.streams() == []
    with pytest.raises(StreamNotFound):
        client.info("gone")
    with pytest.raises(StreamNotFound):
        client.delete("gone")


def test_delete_fails_an_open_consumer_with_a_relay_error(client):
    client.create("doomed")
    with client.stream("doomed") as s:
        assert wait_until(lambda: client.info("doomed")["consumers"] == 1)
        client.delete("doomed")
        with pytest.raises(RemoteError) as info:
            bounded(lambda: list(s))
    assert info.value.origin == "relay"


# -- publish and stream -------------------------------------------------------------------


def test_publish_then_stream_round_trips_exactly_in_order(client):
    items = sample_items()
    result = client.publish("mix", items)
    assert result["items"] == len(items)
    assert result["next_seq"] == len(items)
    assert client.info("mix")["state"] == "ended"
    with client.stream("mix") as s:
        got = bounded(lambda: list(s))
        assert s.state.last_seq == len(items) - 1
    assert len(got) == len(items)
    for g, e in zip(got, items, strict=True):
        assert_same_item(g, e)


def test_publish_of_nothing_ends_the_stream(client):
    assert client.publish("empty", iter(()))["items"] == 0
    assert client.info("empty")["state"] == "ended"
    assert bounded(lambda: list(client.stream("empty"))) == []


def test_many_items_in_order_with_backpressure(client):
    n = 1000  # far more than the stream's buffer (64): publish waits for the consumer
    result = {}
    producer = threading.Thread(
        target=lambda: result.update(client.publish("many", (np.array([i]) for i in range(n)))),
        daemon=True,
    )
    client.create("many", 16)
    producer.start()
    try:
        got = bounded(lambda: [int(a[0]) for a in client.stream("many", prefetch=8)])
    finally:
        producer.join(20)
    assert not producer.is_alive()
    assert got == list(range(n))
    assert result["items"] == n


def test_end_false_leaves_the_stream_open_and_a_second_publish_appends(client):
    first = [np.full(2, i, np.int32) for i in range(3)]
    second = [np.full(2, i, np.int32) for i in range(3, 6)]
    result = client.publish("parts", first, end=False)
    assert result["items"] == 3
    assert client.info("parts")["state"] == "open"
    result = client.publish("parts", second)
    assert result["next_seq"] == 6
    assert client.info("parts")["state"] == "ended"
    got = bounded(lambda: list(client.stream("parts")))
    assert [int(a[0]) for a in got] == list(range(6))


def test_stream_of_in_process_publish(server, client):
    items = sample_items()
    server.relay.publish("local", items)
    got = bounded(lambda: list(client.stream("local")))
    for g, e in zip(got, items, strict=True):
        assert_same_item(g, e)


def test_a_finished_stream_gives_late_readers_its_end(client):
    client.publish("done", [np.zeros(1)])
    assert len(bounded(lambda: list(client.stream("done")))) == 1
    assert bounded(lambda: list(client.stream("done"))) == []  # queue mode: items taken


# -- batches ------------------------------------------------------------------------------


def frames_2x3(n):
    return [np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(n)]


@pytest.mark.parametrize("where", ["remote", "in-process"])
def test_batch_gives_lists_like_batch_iterator(server, client, where):
    items = frames_2x3(21)
    if where == "remote":
        client.publish("b", items)
    else:
        server.relay.publish("b", items)
        assert wait_until(lambda: client.info("b")["state"] == "ended")
    got = bounded(lambda: list(client.stream("b", batch=8)))
    assert [len(b) for b in got] == [8, 8, 5]
    assert all(isinstance(b, list) for b in got)
    for g, e in zip(got, batch_iterator(items, 8), strict=True):
        for gi, ei in zip(g, e, strict=True):
            assert_same_item(gi, ei)


@pytest.mark.parametrize("where", ["remote", "in-process"])
def test_batch_stack_gives_arrays(server, client, where):
    items = frames_2x3(21)
    if where == "remote":
        client.publish("b", items)
    else:
        server.relay.publish("b", items)
        assert wait_until(lambda: client.info("b")["state"] == "ended")
    got = bounded(lambda: list(client.stream("b", batch=8, stack=True)))
    assert [b.shape for b in got] == [(8, 2, 3), (8, 2, 3), (5, 2, 3)]
    for g, e in zip(got, batch_iterator(items, 8, stack=True), strict=True):
        assert_same_item(g, e)


def test_batch_from_a_slow_producer_regroups_exactly(server, client):
    items = frames_2x3(50)

    def slow():
        for i, item in enumerate(items):
            if i % 3 == 0:
                time.sleep(0.002)  # the relay sends whatever it has: frames of 1..N items
            yield item

    server.relay.publish("slow", slow())
    got = bounded(lambda: list(client.stream("slow", batch=8, stack=True, prefetch=2)))
    assert [b.shape[0] for b in got] == [8, 8, 8, 8, 8, 8, 2]
    for g, e in zip(got, batch_iterator(items, 8, stack=True), strict=True):
        assert_same_item(g, e)


def test_batch_of_one(client):
    client.publish("one", frames_2x3(3))
    got = bounded(lambda: list(client.stream("one", batch=1)))
    assert [len(b) for b in got] == [1, 1, 1]


def test_batch_of_bytes_items(client):
    items = [bytes([i]) * i for i in range(10)]
    client.publish("raw", items)
    got = bounded(lambda: list(client.stream("raw", batch=4)))
    assert got == [items[0:4], items[4:8], items[8:10]]


def test_batch_exact_multiple_has_no_empty_last_batch(client):
    client.publish("b16", frames_2x3(16))
    got = bounded(lambda: list(client.stream("b16", batch=8, stack=True)))
    assert [b.shape[0] for b in got] == [8, 8]


def test_stack_without_batch_is_a_value_error(client):
    client.create("s")
    with pytest.raises(ValueError, match="batch"):
        client.stream("s", stack=True)
    assert client.info("s")["consumers"] == 0


def test_two_consumers_of_a_queue_stream_share_the_items(server, client):
    n = 300
    server.relay.publish("work", (np.array([i]) for i in range(n)), size=8)
    with client.stream("work", prefetch=2) as a, client.stream("work", prefetch=2) as b:
        results = {}

        def read(key, s):
            results[key] = [int(x[0]) for x in s]

        readers = [
            threading.Thread(target=read, args=kv, daemon=True) for kv in (("a", a), ("b", b))
        ]
        for t in readers:
            t.start()
        for t in readers:
            t.join(30)
        assert not any(t.is_alive() for t in readers)
    assert sorted(results["a"] + results["b"]) == list(range(n))  # none lost, none twice
    assert results["a"] == sorted(results["a"]) and results["b"] == sorted(results["b"])


# -- producer errors ----------------------------------------------------------------------


ERRORS = [
    (ValueError, ValueError("lidar disconnected")),
    (KeyError, KeyError("lidar disconnected")),
    (TimeoutError, TimeoutError("lidar disconnected")),
]


def failing_lidar_source(exc):
    for i in range(3):
        yield np.full(4, i, np.float32)
    raise exc


def check_remote_error(err, builtin):
    assert isinstance(err, RemoteError)
    assert isinstance(err, builtin)
    assert err.remote_type == builtin.__name__
    assert "lidar disconnected" in err.remote_message
    assert err.origin == "producer"
    assert "failing_lidar_source" in err.remote_traceback
    assert err.stream_name == "lidar"


@pytest.mark.parametrize(("builtin", "exc"), ERRORS, ids=lambda v: getattr(v, "__name__", ""))
def test_in_process_producer_error_reraises_in_consumer(server, client, builtin, exc):
    server.relay.publish("lidar", failing_lidar_source(exc))
    got = []

    def consume():
        try:
            for item in client.stream("lidar"):
                got.append(int(item[0]))
        except builtin as caught:  # the builtin type catches it
            return caught
        raise AssertionError("the stream ended quietly")

    check_remote_error(bounded(consume), builtin)
    assert got == [0, 1, 2]
    assert client.info("lidar")["state"] == "failed"


@pytest.mark.parametrize(("builtin", "exc"), ERRORS, ids=lambda v: getattr(v, "__name__", ""))
def test_remote_producer_error_reraises_locally_and_in_consumer(client, builtin, exc):
    with pytest.raises(builtin) as local:
        client.publish("lidar", failing_lidar_source(exc))
    assert local.value is exc  # the producer's own exception, re-raised by publish
    assert not isinstance(local.value, RemoteError)
    # publish returned after the relay had the error frame
    assert client.info("lidar")["state"] == "failed"
    got = []

    def consume():
        for item in client.stream("lidar"):
            got.append(int(item[0]))

    with pytest.raises(RemoteError) as remote:
        bounded(consume)
    check_remote_error(remote.value, builtin)
    assert got == [0, 1, 2]


class SensorError(Exception):
    pass


def test_producer_error_of_a_non_builtin_type_is_a_plain_remote_error(server, client):
    server.relay.publish("lidar", failing_lidar_source(SensorError("lidar disconnected")))
    with pytest.raises(RemoteError) as info:
        bounded(lambda: list(client.stream("lidar")))
    err = info.value
    assert type(err) is RemoteError  # no builtin to mix in; nothing is unpickled
    assert err.remote_type == "SensorError"
    assert "lidar disconnected" in err.remote_message
    assert "failing_lidar_source" in err.remote_traceback


def test_producer_error_after_a_partial_batch(client):
    with pytest.raises(ValueError):
        client.publish("lidar", failing_lidar_source(ValueError("lidar disconnected")))
    got = []

    def consume():
        for b in client.stream("lidar", batch=2, stack=True):
            got.append(b.shape)

    with pytest.raises(ValueError, match="lidar disconnected"):
        bounded(consume)
    assert got == [(2, 4), (1, 4)]  # the partial batch comes before the error


def test_error_is_sticky_on_the_remote_stream(server, client):
    server.relay.publish("lidar", failing_lidar_source(ValueError("lidar disconnected")))
    s = client.stream("lidar")
    with pytest.raises(ValueError) as first:
        bounded(lambda: list(s))
    with pytest.raises(ValueError) as second:
        next(s)
    assert second.value is first.value
    s.close()


# -- refused and unsupported items --------------------------------------------------------


def test_upload_refused_against_declared_schema(client):
    client.create("vec", dtype="f4", shape=(3,))
    good = [np.full(3, i, np.float32) for i in range(2)]
    with pytest.raises(UploadRefused) as info:
        client.publish("vec", [*good, np.zeros(4, np.float32), np.zeros(3, np.float32)])
    err = info.value
    assert err.frame_index == 2
    assert err.accepted == 2
    assert err.status == 422
    assert err.stream_name == "vec"
    assert "(4,)" in str(err)
    stream_info = client.info("vec")
    assert stream_info["state"] == "open"
    assert stream_info["depth"] == 2
    # the stream keeps the earlier items and stays usable
    client.publish("vec", [np.full(3, 2, np.float32)])
    got = bounded(lambda: list(client.stream("vec")))
    assert [float(a[0]) for a in got] == [0.0, 1.0, 2.0]


def test_upload_refused_for_a_wrong_dtype_in_a_long_upload(client):
    client.create("vec", dtype="f4", shape=(3,))

    def items():
        yield np.zeros(3, np.float32)
        yield np.zeros(3, np.float64)  # refused
        for _ in range(200):  # more body after the refused frame: still no hang
            yield np.zeros(3, np.float32)

    with pytest.raises(UploadRefused) as info:
        bounded(lambda: client.publish("vec", items(), timeout=20))
    assert (info.value.frame_index, info.value.accepted) == (1, 1)
    assert client.info("vec")["depth"] == 1


def test_upload_to_a_finished_stream_is_refused(client):
    client.publish("fin", [b"x"])
    with pytest.raises(StreamClosed):
        bounded(lambda: client.publish("fin", [b"y"], timeout=20))
    assert client.info("fin")["produced"] == 1


UNSUPPORTED = {
    "list": [1, 2, 3],
    "object-array": np.array([1, "two", None], dtype=object),
    "None": None,
    "str": "text",
}


@pytest.mark.parametrize("bad", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_item_in_remote_publish_is_a_local_error_and_an_error_frame(client, bad):
    items = [np.zeros(2), bad, np.ones(2)]
    with pytest.raises(LocalProtocolError):
        bounded(lambda: client.publish("bad", items, timeout=20))
    assert client.info("bad")["state"] == "failed"
    got = []

    def consume():
        for item in client.stream("bad"):
            got.append(item)

    with pytest.raises(RemoteError) as info:
        bounded(consume)
    assert info.value.remote_type == "LocalProtocolError"
    assert len(got) == 1


@pytest.mark.parametrize("bad", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_item_in_process_fails_the_stream(server, client, bad):
    server.relay.publish("bad", [np.zeros(2), bad, np.ones(2)])
    got = []

    def consume():
        for item in client.stream("bad"):
            got.append(item)

    with pytest.raises(RemoteError):
        bounded(consume)
    assert len(got) == 1
    assert client.info("bad")["state"] == "failed"


# -- seed compatibility: .queue -----------------------------------------------------------


def test_queue_is_a_readable_queue_with_a_sticky_end(client):
    client.publish("q", [np.full(2, i) for i in range(5)])
    q = client.stream("q").queue
    assert isinstance(q, ReadableQueue)
    got = [bounded(lambda: q.get(timeout=20)) for _ in range(5)]
    assert [int(a[0]) for a in got] == list(range(5))
    for _ in range(3):  # the end again on every later call
        assert q.get(timeout=20) is None


def test_buffer_over_the_queue_consumes_it(client):
    client.publish("q", [np.full(2, i) for i in range(5)])
    q = client.stream("q").queue
    got = bounded(lambda: list(Buffer(q)))
    assert [int(a[0]) for a in got] == list(range(5))
    assert q.get(timeout=1) is None


def test_two_buffers_over_one_queue_both_end(client):
    n = 40
    client.publish("q", [np.full(2, i) for i in range(n)])
    q = client.stream("q", prefetch=4).queue
    b1, b2 = Buffer(q), Buffer(q)

    def interleave():
        got, live = [], [b1, b2]
        while live:
            for b in list(live):
                try:
                    got.append(int(next(b)[0]))
                except StopIteration:
                    live.remove(b)
        return got

    got = bounded(interleave)
    assert sorted(got) == list(range(n))
    assert list(b1) == [] and list(b2) == []


def test_queue_sentinels_give_an_exception_sentinel_on_a_producer_error(server, client):
    """`.queue.sentinels`: the seed's way, ndrelay's `ExceptionSentinel` as an item."""
    server.relay.publish("q", failing_lidar_source(KeyError("lidar disconnected")))
    q = client.stream("q").queue.sentinels
    assert isinstance(q, ReadableQueue)

    def until_terminal():
        units = []
        while True:
            unit = q.get(timeout=20)
            if unit is None or isinstance(unit, ExceptionSentinel):
                return units, unit
            units.append(unit)

    units, terminal = bounded(until_terminal)
    assert len(units) == 3
    assert isinstance(terminal, ExceptionSentinel)
    assert isinstance(terminal.exception, RemoteError)
    assert isinstance(terminal.exception, KeyError)
    assert isinstance(q.get(timeout=1), ExceptionSentinel)  # sticky too
    with pytest.raises(KeyError):
        next(Buffer(q))


class CalibrationError(ValueError):
    """A producer's own exception class, derived from a builtin."""


def test_queue_raises_a_producer_error_in_the_seeds_own_buffer(server, client):
    """roverd wraps any queue in *its own* `Buffer`, which knows only its own
    `ExceptionSentinel`: the remote error must still raise there, as the builtin type,
    after the items before it; and an end must end it."""
    import _seed

    assert _seed.ExceptionSentinel is not ExceptionSentinel
    server.relay.publish("bad", failing_lidar_source(ValueError("lidar disconnected")))
    q = client.stream("bad").queue
    assert isinstance(q, ReadableQueue)
    got = []

    def read():
        for item in _seed.Buffer(q):
            got.append(int(item[0]))

    with pytest.raises(ValueError, match="lidar disconnected") as info:
        bounded(read)
    assert isinstance(info.value, RemoteError) and got == [0, 1, 2]
    with pytest.raises(ValueError):  # sticky: every later read raises it again
        q.get(timeout=1)

    server.relay.publish("good", (np.full(2, i) for i in range(3)))
    assert [
        int(a[0]) for a in bounded(lambda: list(_seed.Buffer(client.stream("good").queue)))
    ] == [
        0,
        1,
        2,
    ]


def test_seed_style_sentinel_check_still_raises(server, client):
    """Code that reads `.queue` and checks for ndrelay's `ExceptionSentinel` to re-raise
    it (the seed's own pattern) raises the same exception, from `get()`."""
    server.relay.publish("q", failing_lidar_source(KeyError("gone")))
    q = client.stream("q").queue

    def seed_style():
        while True:
            item = q.get(timeout=20)
            if isinstance(item, ExceptionSentinel):
                raise item.exception
            if item is None:
                return

    with pytest.raises(KeyError, match="gone"):
        bounded(seed_style)


def test_a_producers_own_exception_class_is_caught_as_its_builtin_base(server, client):
    """`class CalibrationError(ValueError)`: the error frame carries its builtin bases, so
    the consumer's `except ValueError` catches it; its own name stays in `remote_type`."""
    server.relay.publish("s", failing_lidar_source(CalibrationError("lidar disconnected")))
    with pytest.raises(ValueError, match="lidar disconnected") as info:
        bounded(lambda: list(client.stream("s")))
    exc = info.value
    assert isinstance(exc, RemoteError)
    assert exc.remote_type == "CalibrationError"
    assert exc.remote_bases == ("ValueError", "Exception", "BaseException")


def test_a_10mb_camera_frame_and_a_100mb_array_arrive_whole(client):
    """Payloads far past any default size cliff (the frame limit is 256 MiB): through a
    queue stream of size 2, uploaded and read back byte for byte."""
    rng = np.random.default_rng(7)
    camera = rng.integers(0, 255, (1080, 1920, 5), dtype=np.uint8)  # 10.4 MB
    volume = rng.random(25_000_000, dtype=np.float32)  # 100 MB
    client.create("big", size=2)
    uploaded: list[dict] = []
    producer = threading.Thread(
        target=lambda: uploaded.append(client.publish("big", iter([camera, volume]))),
        daemon=True,
    )
    producer.start()
    got = bounded(lambda: list(client.stream("big")), 120)
    producer.join(60)
    assert len(got) == 2 and uploaded and uploaded[0]["items"] == 2
    assert_same_item(got[0], camera)
    assert_same_item(got[1], volume)
