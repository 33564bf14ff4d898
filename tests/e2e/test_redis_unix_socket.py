"""`ndrelay serve --backend unix:///path/redis.sock?db=N`: the relay reaches a real
redis-server through its Unix socket; items of every size go through and come back
whole, and the streams live in the database the URL names."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _sources import ServeProcess
from conftest import RedisServer

from ndrelay import RelayClient

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def redis_unix(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    sock = str(tmp_path / "redis.sock")
    server = RedisServer(
        "--save", "", "--appendonly", "no", "--unixsocket", sock, "--unixsocketperm", "700"
    )
    yield server, sock
    server.stop()


def test_a_relay_on_redis_through_a_unix_socket(redis_unix: tuple[RedisServer, str]) -> None:
    redis, sock = redis_unix
    relay = ServeProcess("--backend", f"unix://{sock}?db=2")
    try:
        rng = np.random.default_rng(7)
        items = [rng.random(n, dtype=np.float32) for n in (1, 1000, 1 << 18, 3 << 18)]
        with RelayClient(relay.url) as client:
            client.create("cam", size=8, mode="queue")
            client.publish("cam", iter(items))
            got = []
            for item in client.stream("cam"):
                got.append(item)
        assert len(got) == len(items)
        for a, b in zip(got, items, strict=True):
            np.testing.assert_array_equal(a, b)
        keyspace = redis.command("INFO", "keyspace").decode()
        assert "db2:keys=" in keyspace and "db0:" not in keyspace
        assert os.path.exists(sock)
    finally:
        relay.stop()
