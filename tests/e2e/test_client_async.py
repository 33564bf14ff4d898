"""`AsyncRelayClient` end to end through a real server: the core of test_client_sync.

Every wait sits under `anyio.fail_after`, so nothing can hang the suite.
"""

from __future__ import annotations

import anyio
import numpy as np
import pytest
from _sources import free_port, wait_until

from ndrelay import (
    AsyncRelayClient,
    AuthError,
    ConnectError,
    RelayClient,
    RelayTimeout,
    RemoteError,
    StreamConflict,
    StreamNotFound,
    UploadRefused,
    batch_iterator,
)

pytestmark = [pytest.mark.e2e, pytest.mark.anyio, pytest.mark.backends]

LIMIT = 20  # seconds any one step may take


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
async def client(server):
    async with AsyncRelayClient(server.url, read_timeout=LIMIT) as c:
        yield c


async def collect(stream):
    with anyio.fail_after(LIMIT):
        return [item async for item in stream]


def items_2x3(n):
    return [np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(n)]


async def test_json_calls(client):
    assert (await client.healthz())["status"] == "ok"
    assert await client.streams() == []
    created = await client.create("s", 8, dtype="f4", shape=(2, 3))
    assert await client.create("s", 8, dtype="f4", shape=(2, 3)) == created
    with pytest.raises(StreamConflict):
        await client.create("s", 8, dtype="f8", shape=(2, 3))
    info = await client.info("s")
    assert (info["dtype"], info["shape"], info["state"]) == ("<f4", [2, 3], "open")
    await client.delete("s")
    with pytest.raises(StreamNotFound):
        await client.info("s")


async def test_publish_and_stream_round_trip(client):
    items = [
        *items_2x3(3),
        np.array(7, dtype=np.int16),
        np.arange(4, dtype=">f8"),
        b"raw \x00 bytes",
        np.zeros((300, 300), dtype=np.uint8),
    ]
    result = await client.publish("mix", items)
    assert result["items"] == len(items)
    assert (await client.info("mix"))["state"] == "ended"
    got = await collect(await client.stream("mix"))
    assert len(got) == len(items)
    for g, e in zip(got, items, strict=True):
        if isinstance(e, np.ndarray):
            assert g.dtype == e.dtype and g.shape == e.shape
            assert np.array_equal(g, e)
        else:
            assert g == e


async def test_publish_an_async_iterable_with_end_false_then_append(client):
    async def first():
        for i in range(3):
            yield np.array([i])

    await client.publish("parts", first(), end=False)
    assert (await client.info("parts"))["state"] == "open"
    await client.publish("parts", [np.array([i]) for i in range(3, 5)])
    assert (await client.info("parts"))["state"] == "ended"
    got = await collect(await client.stream("parts"))
    assert [int(a[0]) for a in got] == [0, 1, 2, 3, 4]


async def test_stream_of_in_process_publish(server, client):
    server.relay.publish("local", (np.array([i]) for i in range(50)))
    got = await collect(await client.stream("local"))
    assert [int(a[0]) for a in got] == list(range(50))


async def test_batch_and_stack(client):
    items = items_2x3(21)
    await client.publish("b", items)
    await client.publish("c", items)
    lists = await collect(await client.stream("b", batch=8))
    assert [len(b) for b in lists] == [8, 8, 5]
    for g, e in zip(lists, batch_iterator(items, 8), strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(g, e, strict=True))
    stacked = await collect(await client.stream("c", batch=8, stack=True))
    assert [b.shape for b in stacked] == [(8, 2, 3), (8, 2, 3), (5, 2, 3)]
    for g, e in zip(stacked, batch_iterator(items, 8, stack=True), strict=True):
        assert np.array_equal(g, e)


async def test_stack_without_batch_is_a_value_error(client):
    await client.create("s")
    with pytest.raises(ValueError, match="batch"):
        await client.stream("s", stack=True)


def failing_lidar_source(exc):
    for i in range(3):
        yield np.full(4, i, np.float32)
    raise exc


@pytest.mark.parametrize("builtin", [ValueError, KeyError, TimeoutError])
async def test_in_process_producer_error(server, client, builtin):
    server.relay.publish("lidar", failing_lidar_source(builtin("lidar disconnected")))
    got = []
    s = await client.stream("lidar")
    with pytest.raises(builtin) as info:
        with anyio.fail_after(LIMIT):
            async for item in s:
                got.append(int(item[0]))
    err = info.value
    assert isinstance(err, RemoteError)
    assert err.remote_type == builtin.__name__
    assert "lidar disconnected" in err.remote_message
    assert "failing_lidar_source" in err.remote_traceback
    assert err.origin == "producer"
    assert got == [0, 1, 2]
    with pytest.raises(builtin):  # sticky
        await s.__anext__()


@pytest.mark.parametrize("builtin", [ValueError, KeyError, TimeoutError])
async def test_remote_producer_error(client, builtin):
    exc = builtin("lidar disconnected")
    with pytest.raises(builtin) as local:
        await client.publish("lidar", failing_lidar_source(exc))
    assert local.value is exc
    assert (await client.info("lidar"))["state"] == "failed"
    got = []
    with pytest.raises(RemoteError) as info:
        with anyio.fail_after(LIMIT):
            async for item in await client.stream("lidar", batch=2):
                got.append(len(item))
    assert isinstance(info.value, builtin)
    assert "failing_lidar_source" in info.value.remote_traceback
    assert got == [2, 1]


async def test_upload_refused_against_declared_schema(client):
    await client.create("vec", dtype="f4", shape=(3,))
    items = [np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(4, np.float32)]
    with pytest.raises(UploadRefused) as info:
        with anyio.fail_after(LIMIT):
            await client.publish("vec", items)
    assert (info.value.frame_index, info.value.accepted) == (2, 2)
    assert (await client.info("vec"))["depth"] == 2


async def test_unknown_stream(client):
    with pytest.raises(StreamNotFound) as info:
        await client.stream("no-such-stream")
    assert info.value.stream_name == "no-such-stream"


def endless_items():
    i = 0
    while True:
        yield np.array([i])
        i += 1


async def test_aclose_of_a_half_read_stream(server, client):
    server.relay.publish("endless", endless_items(), size=8)
    s = await client.stream("endless", prefetch=2)
    with anyio.fail_after(LIMIT):
        first = [int((await s.__anext__())[0]) for _ in range(3)]
    assert first == [0, 1, 2]
    assert (await client.info("endless"))["consumers"] == 1
    with anyio.fail_after(LIMIT):
        await s.aclose()
    with pytest.raises(StopAsyncIteration):
        await s.__anext__()
    with anyio.fail_after(LIMIT):  # the relay sees the consumer go
        while True:
            if (await client.info("endless"))["consumers"] == 0:
                break
            await anyio.sleep(0.02)


async def test_async_with_and_client_aclose_close_streams(server):
    server.relay.publish("e1", endless_items(), size=8)
    server.relay.publish("e2", endless_items(), size=8)
    client = AsyncRelayClient(server.url, read_timeout=LIMIT)
    async with await client.stream("e1", prefetch=2) as s:
        with anyio.fail_after(LIMIT):
            await s.__anext__()
    other = await client.stream("e2", prefetch=2)
    with anyio.fail_after(LIMIT):
        await other.__anext__()
        await client.aclose()
    with RelayClient(server.url) as observer:
        assert await anyio.to_thread.run_sync(
            lambda: wait_until(
                lambda: [observer.info(n)["consumers"] for n in ("e1", "e2")] == [0, 0], 10
            )
        )


async def test_read_timeout_on_a_silent_stream(serve):
    handle = serve(heartbeat_interval=60)
    async with AsyncRelayClient(handle.url, read_timeout=0.5) as client:
        await client.create("silent")
        s = await client.stream("silent")
        with pytest.raises(RelayTimeout) as info:
            with anyio.fail_after(LIMIT):
                await s.__anext__()
        assert handle.url in str(info.value)
        await s.aclose()


async def test_heartbeats_keep_an_idle_stream_alive(serve):
    handle = serve(heartbeat_interval=0.1)
    # generous read timeout: a loaded CI machine may stall the server for a while
    async with AsyncRelayClient(handle.url, read_timeout=1.5) as client:
        await client.create("idle")
        s = await client.stream("idle")
        with anyio.move_on_after(3.5):  # idle for over 2 read timeouts; heartbeats: 0.1 s
            await s.__anext__()
            pytest.fail("an item arrived on an idle stream")
        await client.publish("idle", [np.array([i]) for i in range(3)])
        assert [int(a[0]) for a in await collect(s)] == [0, 1, 2]


async def test_connection_refused_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncRelayClient(url, timeout=5, read_timeout=5) as client:
        for call in (client.stream("x"), client.publish("x", [b"a"]), client.healthz()):
            with pytest.raises(ConnectError) as info:
                with anyio.fail_after(LIMIT):
                    await call
            assert url in str(info.value)


async def test_wrong_token(serve):
    handle = serve(token="s3cret")
    handle.relay.publish("numbers", [np.arange(3)])
    async with AsyncRelayClient(handle.url, token="wrong", read_timeout=5) as client:
        assert (await client.healthz())["status"] == "ok"
        for call in (client.streams(), client.stream("numbers"), client.publish("x", [b"a"])):
            with pytest.raises(AuthError):
                with anyio.fail_after(LIMIT):
                    await call
    async with AsyncRelayClient(handle.url, token="s3cret", read_timeout=5) as client:
        assert [a.tolist() for a in await collect(await client.stream("numbers"))] == [[0, 1, 2]]


async def test_large_arrays_and_batched_bursts_round_trip_on_the_zero_copy_path(client):
    big = [np.random.default_rng(i).random(1 << 18, dtype=np.float32) for i in range(6)]
    answer = await client.publish("big", big, prefetch=2)
    assert answer["items"] == 6
    with anyio.fail_after(LIMIT):
        got = [a async for a in await client.stream("big")]
    assert [a.tobytes() for a in got] == [a.tobytes() for a in big]
    assert all(a.flags.writeable for a in got)

    bursts = [np.arange(12, dtype=np.int16).reshape(4, 3) + 100 * i for i in range(5)]
    answer = await client.publish("imu", bursts, batched=True)
    assert (answer["accepted"], answer["items"]) == (6, 20)  # 5 bursts and the end
    with anyio.fail_after(LIMIT):
        stacked = [b async for b in await client.stream("imu", batch=8, stack=True)]
    assert [len(b) for b in stacked] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate(stacked), np.concatenate(bursts))
