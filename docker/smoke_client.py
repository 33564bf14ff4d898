"""Host side of docker/smoke.sh: drives the relay in the container with `RelayClient`.

    python docker/smoke_client.py URL TOKEN push NAME N     # N (2, 3) float32 arrays, then end
    python docker/smoke_client.py URL TOKEN roundtrip       # publish, read back, compare
    python docker/smoke_client.py URL TOKEN producer-error  # a producer's exception crosses
    python docker/smoke_client.py URL TOKEN create NAME...  # empty queue streams
    python docker/smoke_client.py URL TOKEN hold NAME       # read NAME until the relay fails it
    python docker/smoke_client.py URL TOKEN wait-consumers NAME...
    python docker/smoke_client.py URL TOKEN scale NAME N HOLD   # across a replica kill

Each prints one `ok: ...` line or exits non-zero with the reason.

`scale` is the replica-kill check of docker/smoke-scale.sh and tests/e2e/test_nginx.py:
through a balancer in front of relay replicas on one Redis, it uploads N numbered items to
the queue stream NAME (raw HTTP with a producer id, so a retry after a cut is safe) and
reads them with `RelayClient.stream` (a consumer id). Once the consumer has the first HOLD
items it prints `hold: ...` and the upload waits (its connection open) for one line on
stdin: the caller kills a replica meanwhile (the access log of the one serving
`GET /streams/NAME?consumer=...` says which). Then both go on, reconnecting through the
balancer, and it checks that every item arrived exactly once.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import httpx
import numpy as np

from ndrelay import MEDIA_TYPE, DataFrame, EndFrame, RelayClient, RemoteError, encode_frame


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


def scale(client: RelayClient, url: str, token: str, name: str, n: int, hold: int) -> None:
    client.create(name, size=16)
    resume = threading.Event()
    upload: dict[str, Any] = {}

    def produce() -> None:
        try:
            upload.update(_produce(url, token, name, n, hold, resume))
        except BaseException as exc:  # reported by the main thread
            upload["error"] = exc

    producer = threading.Thread(target=produce, name="smoke-producer", daemon=True)
    producer.start()
    got: list[int] = []
    with client.stream(name, consumer="smoke-consumer", reconnect=90) as stream:
        for item in stream:
            got.append(int(item[0]))
            if len(got) == hold:
                print(f"hold: {hold} items read; the upload waits for a line on stdin", flush=True)
                if not sys.stdin.readline():
                    raise SystemExit("stdin closed before the go-ahead")
                resume.set()
        reconnects = stream.reconnects
    producer.join(30)
    if "error" in upload:
        raise SystemExit(f"the upload failed: {upload['error']!r}")
    if producer.is_alive():
        raise SystemExit("the upload did not finish within 30 s of the stream's end")
    lost = sorted(set(range(n)) - set(got))
    dup = len(got) - len(set(got))
    extra = sorted(set(got) - set(range(n)))
    line = (
        f"{n} items sent, {len(got)} received, {len(lost)} lost, {dup} duplicated "
        f"(consumer reconnects: {reconnects}, upload retries: {upload['retries']})"
    )
    if lost or dup or extra:
        raise SystemExit(f"FAIL: {line}; lost {lost[:10]}, unknown {extra[:10]}")
    print(f"ok: {line}", flush=True)


def _produce(
    url: str, token: str, name: str, n: int, hold: int, resume: threading.Event
) -> dict[str, Any]:
    """Upload items 0..n-1 (int64 [i, i*i]) and the end to `name` with a producer id; on
    a cut connection or a balancer's 502/503/504, ask the relay where it stands (an
    empty upload) and go on from there. Waits before item `hold` until `resume`."""
    producer = "smoke-producer"
    headers = {"Content-Type": MEDIA_TYPE}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    target = f"{url}/streams/{name}"
    params = {"producer": producer}

    def body(start: int) -> Any:
        for i in range(start, n):
            if i == hold and not resume.wait(120):
                raise TimeoutError("no go-ahead within 120 s")
            yield encode_frame(DataFrame(seq=i, data=np.array([i, i * i], np.int64)))
            time.sleep(0.01)  # a sensor's pace: the stream lasts while the replica dies
        yield encode_frame(EndFrame(seq=n))

    retries = 0
    start = 0
    deadline = time.monotonic() + 180
    timeout = httpx.Timeout(30.0, read=None)
    with httpx.Client(timeout=timeout) as http:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"upload not done after 180 s ({retries} retries)")
            try:
                answer = http.post(target, params=params, headers=headers, content=body(start))
                if answer.status_code == 200:
                    return {"retries": retries, "answer": answer.json()}
                if answer.status_code == 409 and "expected_seq" in answer.json():
                    start = answer.json()["expected_seq"]
                    if start >= n:  # the end was accepted before the cut: done
                        return {"retries": retries, "answer": answer.json()}
                    continue
                if answer.status_code not in (502, 503, 504):
                    raise RuntimeError(f"upload answered {answer.status_code}: {answer.text}")
            except httpx.TransportError:
                pass
            retries += 1
            time.sleep(0.2)
            try:  # where does the relay stand? an empty upload asks
                asked = http.post(target, params=params, headers=headers, content=b"")
                if asked.status_code == 200:
                    start = asked.json()["expected_seq"]
                elif asked.status_code == 409 and asked.json().get("expected_seq", 0) >= n:
                    return {"retries": retries, "answer": asked.json()}  # the end was in
            except httpx.TransportError:
                pass  # the balancer has not noticed yet: ask again on the next round


def main() -> None:
    url, token, command, *args = sys.argv[1:]
    with RelayClient(url, token=token or None) as client:
        if command == "scale":
            scale(client, url, token, args[0], int(args[1]), int(args[2]))
        elif command == "push":
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
