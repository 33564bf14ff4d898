"""Stream expiry over a real in-memory registry, with an explicit clock."""

from __future__ import annotations

import asyncio

import anyio
import numpy as np
import pytest

from ndrelay._frames import EndFrame
from ndrelay.registry import MemoryRegistry, StreamSpec
from ndrelay.server.expiry import Expiry


def names(registry: MemoryRegistry) -> list[str]:
    return sorted(s.name for s in registry.streams())


def test_finished_and_empty_unused_streams_go_after_the_ttl() -> None:
    registry = MemoryRegistry()
    expiry = Expiry(registry, ttl=60)
    empty, _ = registry.create("empty", StreamSpec())
    done, _ = registry.create("done", StreamSpec())
    done.put_blocking(np.arange(3))
    done.finish(EndFrame(0))
    full, _ = registry.create("full", StreamSpec())
    full.put_blocking(np.arange(3))  # open, holding an item: waits for its reader
    read, _ = registry.create("read", StreamSpec())
    consumer = read.open_consumer()
    assert asyncio.run(expiry.sweep(now=0)) == []
    assert (
        expiry.expires_in(empty, empty.info(), now=0) == 60
        and expiry.expires_in(read, read.info()) is None
    )
    assert expiry.expires_in(empty, empty.info(), now=45) == 15
    assert asyncio.run(expiry.sweep(now=59)) == []
    assert sorted(asyncio.run(expiry.sweep(now=60))) == ["done", "empty"]
    assert names(registry) == ["full", "read"]
    consumer.close()  # unused from now on: its clock starts at the next sweep
    assert asyncio.run(expiry.sweep(now=61)) == []
    assert asyncio.run(expiry.sweep(now=121)) == ["read"]


def test_use_restarts_the_clock() -> None:
    registry = MemoryRegistry()
    expiry = Expiry(registry, ttl=10)
    stream, _ = registry.create("s", StreamSpec())
    asyncio.run(expiry.sweep(now=0))
    with stream.producing():
        asyncio.run(expiry.sweep(now=5))  # in use
    asyncio.run(expiry.sweep(now=6))
    assert asyncio.run(expiry.sweep(now=15)) == []
    assert asyncio.run(expiry.sweep(now=16)) == ["s"]


def test_a_stream_made_again_under_its_name_starts_a_new_clock() -> None:
    registry = MemoryRegistry()
    expiry = Expiry(registry, ttl=10)
    registry.create("s", StreamSpec())
    asyncio.run(expiry.sweep(now=0))
    registry.delete("s")
    registry.create("s", StreamSpec())
    assert asyncio.run(expiry.sweep(now=10)) == []
    assert asyncio.run(expiry.sweep(now=20)) == ["s"]


def test_no_ttl_no_expiry() -> None:
    registry = MemoryRegistry()
    registry.create("s", StreamSpec())
    expiry = Expiry(registry, ttl=0)
    assert asyncio.run(expiry.sweep(now=0)) == asyncio.run(expiry.sweep(now=1e9)) == []
    assert expiry.expires_in(registry.get("s"), registry.get("s").info()) is None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_sweeper_stops_when_its_relay_closes(anyio_backend: str) -> None:
    registry = MemoryRegistry()
    registry.create("s", StreamSpec())
    closed = False
    expiry = Expiry(registry, ttl=0.2)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(expiry.run, lambda: closed)
            for _ in range(400):  # it sweeps while the relay is open
                if not names(registry):
                    break
                await anyio.sleep(0.02)
            assert names(registry) == []
            closed = True
    # the task group returned: the sweeper ended by itself, nobody cancelled it
