"""The Redis backend's lean RESP client (`registry._resp`): its reply parser on arbitrary
nested replies split at arbitrary byte boundaries (hypothesis), its command encoding, and
its transactions against a real redis-server: payloads in and out, error replies in
place, a refused transaction, a lost connection, and closing."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Any

import numpy as np
import pytest
from conftest import RedisServer
from hypothesis import given, settings, strategies as st
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError, ResponseError

from ndrelay.registry._resp import BIG_ARG, ReplyReader, RespClient, encode

# -- the parser ---------------------------------------------------------------------------

LINE = st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b)
ERROR = st.builds(
    lambda code, text: f"{code} {text}".strip(),
    st.sampled_from(["ERR", "NOSCRIPT", "EXECABORT", "WRONGTYPE", "OOM", "LOADING", "BUSY"]),
    st.text(alphabet="abcdefgh XYZ-_:", max_size=20),
)
LEAF = st.one_of(
    st.tuples(st.just("int"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("simple"), LINE),
    st.tuples(st.just("bulk"), st.binary(max_size=300)),
    st.tuples(st.just("error"), ERROR),
    st.tuples(st.just("nil"), st.sampled_from([b"$-1\r\n", b"*-1\r\n"])),
)
REPLY = st.recursive(
    LEAF, lambda inner: st.tuples(st.just("array"), st.lists(inner, max_size=6)), max_leaves=25
)


def wire(reply: tuple[str, Any]) -> bytes:
    kind, value = reply
    if kind == "int":
        return b":%d\r\n" % value
    if kind == "simple":
        return b"+" + value + b"\r\n"
    if kind == "bulk":
        return b"$%d\r\n" % len(value) + value + b"\r\n"
    if kind == "error":
        return b"-" + value.encode() + b"\r\n"
    if kind == "nil":
        return bytes(value)
    return b"*%d\r\n" % len(value) + b"".join(wire(r) for r in value)


def expected(reply: tuple[str, Any]) -> Any:
    kind, value = reply
    if kind == "error":
        error = BaseParser.parse_error(value)
        return ("error", type(error), str(error))
    if kind == "nil":
        return None
    if kind == "array":
        return [expected(r) for r in value]
    return value


def seen(value: Any) -> Any:
    if isinstance(value, Exception):
        return ("error", type(value), str(value))
    if isinstance(value, list):
        return [seen(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tobytes()
    return value


def feed(reader: ReplyReader, data: bytes, cuts: list[int]) -> None:
    """Write `data` into the reader's buffers in pieces of the sizes in `cuts` (cycled),
    or less where a buffer it hands out is shorter."""
    pos, i = 0, 0
    while pos < len(data):
        buf = reader.get_buffer()
        assert len(buf) > 0
        k = min(len(buf), cuts[i % len(cuts)], len(data) - pos)
        buf[:k] = data[pos : pos + k]
        reader.buffer_updated(k)
        pos += k
        i += 1


@settings(max_examples=300, deadline=None)
@given(
    replies=st.lists(REPLY, min_size=1, max_size=5),
    cuts=st.lists(st.integers(1, 64), min_size=1, max_size=10),
    scratch=st.sampled_from([16, 64, 4096]),
    direct_min=st.sampled_from([1, 8, 100, 1 << 16]),
)
def test_replies_parse_alike_however_the_bytes_are_split(
    replies: list[tuple[str, Any]], cuts: list[int], scratch: int, direct_min: int
) -> None:
    reader = ReplyReader(scratch=scratch, direct_min=direct_min)
    feed(reader, b"".join(wire(r) for r in replies), cuts)
    assert [seen(r) for r in reader.replies] == [expected(r) for r in replies]


def test_a_large_bulk_string_is_read_into_its_own_buffer() -> None:
    body = bytes(range(256)) * 1024
    reader = ReplyReader(scratch=1024, direct_min=4096)
    feed(reader, b"*2\r\n$%d\r\n" % len(body) + body + b"\r\n:7\r\n", [300, 70000])
    (reply,) = reader.replies
    assert type(reply[0]) is np.ndarray and reply[0].tobytes() == body and reply[1] == 7


def test_an_unknown_reply_type_is_a_connection_error() -> None:
    reader = ReplyReader()
    with pytest.raises(RedisConnectionError, match="unknown type"):
        feed(reader, b"!5\r\n", [10])


# -- encoding -----------------------------------------------------------------------------


def test_commands_encode_as_resp_arrays_with_large_arguments_not_copied() -> None:
    payload = np.arange(BIG_ARG, dtype=np.uint8)
    out = encode([("SET", "k", 12), ("XADD", b"x", payload.data, 1.5)])
    joined = b"".join(bytes(b) for b in out)
    assert joined == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n"
        b"*4\r\n$4\r\nXADD\r\n$1\r\nx\r\n$%d\r\n"
        % BIG_ARG
        + payload.tobytes()
        + b"\r\n$3\r\n1.5\r\n"
    )
    views = [b for b in out if isinstance(b, memoryview)]
    assert len(views) == 1 and np.shares_memory(np.frombuffer(views[0], np.uint8), payload)


# -- against a real redis-server ----------------------------------------------------------


def _client(redis_server: Any) -> RespClient:
    redis_server.command("FLUSHALL")
    return RespClient(("127.0.0.1", redis_server.port))


def _clients(redis_server: Any) -> int:
    listed = redis_server.command("CLIENT", "LIST").decode()
    return sum(1 for line in listed.splitlines() if "cmd=" in line)


def test_payloads_go_in_and_come_back_whole(redis_server: Any) -> None:
    big = np.random.default_rng(1).integers(0, 255, 3 << 20, dtype=np.uint8)

    async def main() -> list[Any]:
        client = _client(redis_server)
        try:
            await client.transaction([("XGROUP", "CREATE", "x", "g", "0", "MKSTREAM")])
            added = await client.transaction(
                [("XADD", "x", "1-1", "d", big.data), ("XADD", "x", "2-1", "d", b"small")]
            )
            assert added == [b"1-1", b"2-1"]
            return await client.transaction(
                [("XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "STREAMS", "x", ">")]
            )
        finally:
            await client.aclose()

    ((key, entries),) = asyncio.run(main())[0]
    assert key == b"x"
    (id1, (f1, d1)), (id2, (f2, d2)) = entries
    assert (id1, f1, id2, f2, d2) == (b"1-1", b"d", b"2-1", b"d", b"small")
    assert np.array_equal(d1, big)


def test_an_error_reply_inside_exec_comes_back_in_place(redis_server: Any) -> None:
    async def main() -> list[Any]:
        client = _client(redis_server)
        try:
            return await client.transaction(
                [("SET", "s", "v"), ("XADD", "s", "*", "f", "v"), ("GET", "s")]
            )
        finally:
            await client.aclose()

    ok, error, value = asyncio.run(main())
    assert ok == b"OK" and value == b"v"
    assert isinstance(error, ResponseError) and "WRONGTYPE" in str(error)


def test_a_command_redis_refuses_to_queue_raises_and_nothing_runs(redis_server: Any) -> None:
    async def main() -> None:
        client = _client(redis_server)
        try:
            with pytest.raises(ResponseError, match="wrong number of arguments"):
                await client.transaction([("SET", "a", "1"), ("GET",)])
            assert await client.transaction([("EXISTS", "a")]) == [0]
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_lost_connection_raises_connection_error(redis_server: Any) -> None:
    async def main() -> None:
        client = _client(redis_server)
        try:
            redis_server.command("CLIENT", "PAUSE", "3000", "WRITE")  # EXEC of a SET waits
            writing = asyncio.create_task(client.transaction([("SET", "k", "v")]))
            await asyncio.sleep(0.3)
            assert not writing.done()
            redis_server.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            with pytest.raises(RedisConnectionError):
                await writing
            redis_server.command("CLIENT", "UNPAUSE")
            assert await client.transaction([("PING",)]) == [b"PONG"]  # a new connection
        finally:
            await client.aclose()

    asyncio.run(main())


def test_idle_connections_closed_by_redis_are_replaced_unseen(redis_server: Any) -> None:
    async def main() -> None:
        client = _client(redis_server)
        try:
            await asyncio.gather(*(client.transaction([("PING",)]) for _ in range(2)))
            redis_server.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            for _ in range(3):  # as a restarted Redis would: no error for the caller
                assert await client.transaction([("PING",)]) == [b"PONG"]
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_server_that_is_gone_raises_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed

    async def main() -> None:
        client = RespClient(("127.0.0.1", port))
        with pytest.raises(RedisConnectionError, match="connecting"):
            await client.transaction([("PING",)])
        await client.aclose()

    asyncio.run(main())


def test_closing_ends_its_connections_even_mid_transaction(redis_server: Any) -> None:
    async def main() -> None:
        client = _client(redis_server)
        before = _clients(redis_server)
        await asyncio.gather(*(client.transaction([("PING",)]) for _ in range(3)))
        assert _clients(redis_server) == before + 3
        redis_server.command("CLIENT", "PAUSE", "2000", "ALL")  # transactions wait
        stuck = [asyncio.create_task(client.transaction([("PING",)])) for _ in range(4)]
        await asyncio.sleep(0.2)
        assert not any(task.done() for task in stuck)
        await client.aclose()
        for task in stuck:
            with pytest.raises(RedisConnectionError):
                await task
        for _ in range(500):
            if _clients(redis_server) == before:
                break
            await asyncio.sleep(0.01)
        assert _clients(redis_server) == before
        with pytest.raises(RedisConnectionError, match="closed"):
            await client.transaction([("PING",)])

    asyncio.run(main())


def test_credentials_and_database_of_the_url_are_used(tmp_path: Any) -> None:
    server = RedisServer(workdir=str(tmp_path))
    try:
        server.command("CONFIG", "SET", "requirepass", "s3cret")

        async def main() -> Any:
            r = Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3")
            db0 = Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/0")
            client = RespClient.of(r)
            assert client is not None
            try:
                await client.transaction([("SET", "k", "v")])
                return await r.get("k"), await db0.exists("k")
            finally:
                await client.aclose()
                await r.aclose()
                await db0.aclose()

        assert asyncio.run(main()) == (b"v", 0)
    finally:
        server.stop(signal.SIGTERM)
