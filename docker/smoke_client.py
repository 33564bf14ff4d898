"""Host side of docker/smoke.sh: drives the relay in the container with `RelayClient`.

    python docker/smoke_client.py URL TOKEN push NAME N     # N (2, 3) float32 arrays, then end
    python docker/smoke_client.py URL TOKEN roundtrip       # publish, read back, compare
    python docker/smoke_client.py URL TOKEN producer-error  # a producer's exception crosses
    python docker/smoke_client.py URL TOKEN create NAME...  # empty queue streams
    python docker/smoke_client.py URL TOKEN hold NAME       # read NAME until the relay fails it
    python docker/smoke_client.py URL TOKEN wait-consumers NAME...

Each prints one `ok: ...` line or exits non-zero with the reason.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from ndrelay import RelayClient, RemoteError


def push(client: RelayClient, name: str, n: int) -> None:
    result = client.publish(name, (np.full((2, 3), i, np.float32) for i in range(n)))
    assert result["items"] == n, result
    print(f"ok: pushed {n} frames to {name!r}: {result}")


def roundtrip(client: RelayClient) -> None:
    rng = np.random.default_rng(5)
    sent = [rng.standard_normal((64, 128)).astype(np.float32) for _ in range(50)]
    client.publish("roundtrip", iter(sent))
    got = list(client.stream("roundtrip"))
    assert len(got) == len(sent), (len(got), len(sent))
    for a, b in zip(sent, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    client.publish("batched", (np.full(3, i, np.int64) for i in range(10)))
    shapes = [b.shape for b in client.stream("batched", batch=4, stack=True)]
    assert shapes == [(4, 3), (4, 3), (2, 3)], shapes
    print(f"ok: {len(sent)} float32 (64, 128) arrays back equal; batches {shapes}")


def producer_error(client: RelayClient) -> None:
    def sensor():
        yield np.zeros(3)
        yield np.ones(3)
        raise ValueError("lidar disconnected")

    try:
        client.publish("lidar", sensor())
    except ValueError as exc:
        assert "lidar disconnected" in str(exc), exc
    else:
        raise AssertionError("publish did not re-raise the producer's exception")
    got = []
    try:
        for item in client.stream("lidar"):
            got.append(item)
    except ValueError as exc:
        assert isinstance(exc, RemoteError), type(exc)
        assert exc.origin == "producer" and exc.remote_type == "ValueError", vars(exc)
        assert exc.remote_message == "lidar disconnected", exc.remote_message
        assert "sensor" in exc.remote_traceback, exc.remote_traceback
    else:
        raise AssertionError("the stream ended instead of raising")
    assert len(got) == 2, got
    print("ok: 2 items, then RemoteError (a ValueError) 'lidar disconnected', origin producer")


def hold(client: RelayClient, name: str) -> None:
    try:
        for item in client.stream(name):
            raise AssertionError(f"unexpected item {item!r}")
    except RemoteError as exc:
        assert exc.origin == "relay", exc.origin
        assert exc.remote_message == "server shutting down", exc.remote_message
        print(f"ok: {name!r} got the relay's error frame: {exc.remote_message!r} (origin relay)")
        return
    raise AssertionError("the stream ended instead of failing with the shutdown error")


def main() -> None:
    url, token, command, *args = sys.argv[1:]
    with RelayClient(url, token=token or None) as client:
        if command == "push":
            push(client, args[0], int(args[1]))
        elif command == "roundtrip":
            roundtrip(client)
        elif command == "producer-error":
            producer_error(client)
        elif command == "create":
            for name in args:
                client.create(name)
            print(f"ok: created {args}")
        elif command == "hold":
            hold(client, args[0])
        elif command == "wait-consumers":
            # Until every named stream has a consumer (at most 20 s).
            deadline = time.monotonic() + 20
            while any(client.info(name)["consumers"] < 1 for name in args):
                if time.monotonic() > deadline:
                    raise SystemExit(f"no consumers on {args} after 20 s")
                time.sleep(0.1)
            print(f"ok: consumers on {args}")
        else:
            raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
