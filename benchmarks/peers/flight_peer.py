"""Arrow Flight peer (`do_get`).

Schema: one column `item` of type FixedSizeList<float32 | uint8, N> where N is the number
of elements of one item, so one row = one item. One item per record batch (W1, W2, W3);
W2b: 256 rows per record batch. The producer is a Flight server whose `do_get` returns a
`GeneratorStream` yielding record batches built (zero-copy, before timing) from the same
pool items the other peers send; for W2b each record batch is built in the timed loop from
256 individual items (`np.concatenate` + `FixedSizeListArray.from_arrays`), the Arrow
equivalent of the raw peer's packing. The consumer calls `do_get` and turns each batch into
numpy with `column(0).flatten().to_numpy()` (zero-copy) and a reshape.

Relayed: a middle Flight server whose `do_get` calls `do_get` on the producer's server and
returns `RecordBatchStream(reader.to_reader())`, i.e. the batches are forwarded in C++
without the GIL. (A pull chain, where ndrelay's relayed producer pushes; Flight's push,
`do_put`, would need the middle to buffer between two RPCs, which is more code than a
Flight user writes for a relay.) gRPC over TCP on 127.0.0.1, no TLS.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from _common import (
    POOL,
    Checker,
    LatencyRecorder,
    Meter,
    Paced,
    Workload,
    item_pool,
    paced_items,
    self_vm,
)

__all__ = ["consumer", "lat_consumer", "lat_producer", "middle", "producer"]

TIMEOUT = 60.0


def _arrow_type(dtype: str) -> Any:
    import pyarrow as pa

    return {"<f4": pa.float32(), "|u1": pa.uint8()}[np.dtype(dtype).str]


def _batch(schema: Any, flat: np.ndarray, list_size: int) -> Any:
    import pyarrow as pa

    values = pa.array(flat)  # zero-copy view of a contiguous numeric numpy array
    col = pa.FixedSizeListArray.from_arrays(values, list_size)
    return pa.RecordBatch.from_arrays([col], schema=schema)


def _server(make_stream: Any) -> Any:
    """A Flight server on a free 127.0.0.1 port whose do_get returns `make_stream()`."""
    import pyarrow.flight as fl

    class Server(fl.FlightServerBase):  # type: ignore[misc]
        def do_get(self, context: Any, ticket: Any) -> Any:
            return make_stream()

    return Server("grpc://127.0.0.1:0")


def producer(
    q: Any,
    go: Any,
    wl: dict[str, Any],
    duration: float,
    limit: int | None = None,
    role: str = "producer",
    **_: Any,
) -> None:
    import pyarrow as pa
    import pyarrow.flight as fl

    w = Workload.from_dict(wl)
    pool = item_pool(w)
    count = int(np.prod(w.shape))
    schema = pa.schema([("item", pa.list_(_arrow_type(w.dtype), count))])
    batches = [_batch(schema, p.reshape(-1), count) for p in pool]
    lock = threading.Lock()

    def gen() -> Any:
        paced = Paced(go, duration, limit)
        n = 0
        k = 0
        if w.batch:
            while not paced.done(n):
                parts = []
                for _ in range(w.batch):
                    parts.append(pool[k].reshape(-1))
                    k = k + 1 if k + 1 < POOL else 0
                yield _batch(schema, np.concatenate(parts), count)
                n += w.batch
        else:
            every = 64 if w.small else 1
            while not paced.done(n):
                for _ in range(every):
                    yield batches[k]
                    k = k + 1 if k + 1 < POOL else 0
                n += every
        with lock:
            q.put({"role": role, "result": {"sent": n, "vm": self_vm()}})

    server = _server(lambda: fl.GeneratorStream(schema, gen()))
    q.put({"role": role, "ready": True, "port": server.port})
    server.serve()


def middle(q: Any, upstream: int, role: str = "middle", **_: Any) -> None:
    import pyarrow.flight as fl

    def stream() -> Any:
        client = fl.connect(f"grpc://127.0.0.1:{upstream}")
        reader = client.do_get(fl.Ticket(b"x"))
        return fl.RecordBatchStream(reader.to_reader())

    server = _server(stream)
    q.put({"role": role, "ready": True, "port": server.port})
    server.serve()


def consumer(q: Any, go: Any, wl: dict[str, Any], port: int, role: str = "consumer") -> None:
    import pyarrow.flight as fl

    w = Workload.from_dict(wl)
    check = Checker(w)
    meter = Meter(w.warmup)
    shape = tuple(w.shape)
    client = fl.connect(f"grpc://127.0.0.1:{port}")
    reader = client.do_get(fl.Ticket(b"x"), options=fl.FlightCallOptions(timeout=TIMEOUT))
    read = reader.read_chunk
    n = 0
    go.set()
    last = None
    nb = 0
    while True:
        try:
            chunk = read()
        except StopIteration:
            break
        b = chunk.data
        rows = b.num_rows
        arr = b.column(0).flatten().to_numpy()
        if w.batch:
            arr = arr.reshape(rows, *shape)
            if nb % 16 == 0:
                check.batch(n, arr)
            last = (n, arr)
            nb += 1
            n += rows
            meter.tick(n)
        elif w.small:
            if rows != 1:
                raise AssertionError(f"record batch of {rows} rows, want 1")
            arr = arr.reshape(shape)
            if n & 1023 == 0:
                check.item(n, arr)
                meter.tick(n)
            last = (n, arr)
            n += 1
        else:
            check.item(n, arr.reshape(shape))
            n += 1
            meter.tick(n)
    if last is not None:
        (check.batch if w.batch else check.item)(*last)
    meter.finish(n)
    q.put(
        {
            "role": role,
            "result": {**meter.result(w.itemsize), "checked": check.checked, "vm": self_vm()},
        }
    )
    client.close()


def lat_producer(
    q: Any, go: Any, duration: float, rate: float, role: str = "producer", **_: Any
) -> None:
    import pyarrow as pa
    import pyarrow.flight as fl

    schema = pa.schema([("item", pa.list_(pa.uint8(), 1024))])

    def gen() -> Any:
        n = 0
        for item in paced_items(go, duration, rate):
            yield _batch(schema, item, 1024)
            n += 1
        q.put({"role": role, "result": {"sent": n, "vm": self_vm()}})

    server = _server(lambda: fl.GeneratorStream(schema, gen()))
    q.put({"role": role, "ready": True, "port": server.port})
    server.serve()


def lat_consumer(q: Any, go: Any, port: int, warmup: float, role: str = "consumer") -> None:
    import pyarrow.flight as fl

    client = fl.connect(f"grpc://127.0.0.1:{port}")
    reader = client.do_get(fl.Ticket(b"x"), options=fl.FlightCallOptions(timeout=TIMEOUT))
    rec = LatencyRecorder(warmup)
    go.set()
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        rec.add(chunk.data.column(0).flatten().to_numpy())
    q.put({"role": role, "result": {**rec.result(), "vm": self_vm()}})
    client.close()
