"""`/metrics`: per-stream gauges and counters, and the process's own (memory, CPU, open
file descriptors), in the Prometheus text format."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi.responses import Response
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..registry import Registry
from .protocol import vectored_bytes

__all__ = ["metrics_response"]

_COUNTERS = {
    "produced": "Items the stream accepted",
    "consumed": "Items delivered to consumers",
    "dropped": "Items fanout consumers skipped (drop_oldest/latest policies)",
}
#: info key -> (metric name suffix, help)
_GAUGES = {
    "depth": ("depth", "Items buffered"),
    "bytes": ("buffered_bytes", "Payload bytes buffered"),
    "consumers": ("consumers", "Connected consumers"),
    "producers": ("producers", "Active producers"),
}
#: direction label -> info key of the payload bytes counted
_BYTES = {"in": "produced_bytes", "out": "consumed_bytes"}


class _StreamCollector:
    def __init__(self, registry: Registry, infos: list[dict[str, Any]]) -> None:
        self.registry = registry
        self.infos = infos

    def collect(self) -> Iterator[Metric]:
        infos = self.infos
        yield _family(GaugeMetricFamily, "ndrelay_streams", "Streams in the registry", [len(infos)])
        budget = self.registry.budget
        if budget is not None:
            yield _family(
                GaugeMetricFamily,
                "ndrelay_memory_bytes",
                "Payload bytes buffered over all streams",
                [budget.used],
            )
            yield _family(
                GaugeMetricFamily,
                "ndrelay_memory_limit_bytes",
                "The bound on payload bytes buffered over all streams (--max-memory)",
                [budget.limit],
            )
        for key, doc in _COUNTERS.items():
            family = CounterMetricFamily(f"ndrelay_stream_{key}", doc, labels=["stream", "mode"])
            for info in infos:
                family.add_metric([info["name"], info["mode"]], info[key])
            yield family
        traffic = CounterMetricFamily(
            "ndrelay_stream_bytes",
            "Payload bytes accepted from producers (in) and handed to consumers (out, "
            "redeliveries included)",
            labels=["stream", "mode", "direction"],
        )
        for info in infos:
            for direction, key in _BYTES.items():
                if key in info:
                    traffic.add_metric([info["name"], info["mode"], direction], info[key])
        yield traffic
        for key, (suffix, doc) in _GAUGES.items():
            gauge = GaugeMetricFamily(f"ndrelay_stream_{suffix}", doc, labels=["stream", "mode"])
            for info in infos:
                gauge.add_metric([info["name"], info["mode"]], info[key])
            yield gauge
        state = GaugeMetricFamily(
            "ndrelay_stream_open",
            "1 while the stream is open, 0 once ended or failed",
            labels=["stream"],
        )
        for info in infos:
            state.add_metric([info["name"]], 1 if info["state"] == "open" else 0)
        yield state
        yield _family(
            CounterMetricFamily,
            "ndrelay_vectored_write_bytes",
            "Response body bytes written straight from array memory (vectored writes)",
            [vectored_bytes()],
        )


def _family(cls: type, name: str, doc: str, values: list[float]) -> Metric:
    family = cls(name, doc, value=values[0])
    return family  # type: ignore[no-any-return]


async def metrics_response(registry: Registry) -> Response:
    """The current metrics of `registry`'s streams."""
    infos = [await s.ainfo() for s in await registry.list_streams()]
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(_StreamCollector(registry, infos))
    # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
    # (read from /proc; absent where there is none), and python_info
    ProcessCollector(registry=collectors)
    PlatformCollector(registry=collectors)
    return Response(generate_latest(collectors), media_type=CONTENT_TYPE_LATEST)
