"""The server's /metrics in Prometheus text: latency histograms, memory against the budget, queue depth,
engine loads and evictions. One registry per server (prometheus_client), so several servers in one
process (tests) never share counters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from omniedge.runtime.memory import RssMeter

if TYPE_CHECKING:
    from omniedge.runtime.app import Omni

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _LiveCollector(Collector):
    """Values read when scraped: memory, queue, engines."""

    def __init__(self, omni: Omni) -> None:
        self.omni = omni
        self.meter = omni.scheduler.meter if omni.scheduler is not None else RssMeter()

    def collect(self) -> Iterator[Metric]:
        s = self.omni.scheduler
        q = self.omni._queue

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("omniedge_memory_bytes", f"memory in use now ({self.meter.kind})", self.meter.current())
        yield gauge(
            "omniedge_memory_peak_bytes", "largest memory in use since start", self.meter.lifetime_peak()
        )
        yield gauge("omniedge_queue_waiting", "requests waiting for their turn", q.waiting)
        yield gauge("omniedge_queue_running", "requests running (0 or 1)", q.running)
        yield CounterMetricFamily(
            "omniedge_queue_refused", "requests refused because the queue was full", value=q.refused
        )
        yield gauge(
            "omniedge_context_tokens", "context length the KV cache is sized for", self.omni.max_context
        )
        if s is None:
            return
        yield gauge("omniedge_memory_budget_bytes", "the memory budget", s.plan.budget)
        yield CounterMetricFamily(
            "omniedge_memory_over_budget", "loads or runs whose measured peak passed the budget",
            value=s.stats.over_budget,
        )  # fmt: skip
        loaded = GaugeMetricFamily("omniedge_engine_loaded", "1 when the engine is loaded", labels=["engine"])
        size = GaugeMetricFamily(
            "omniedge_engine_footprint_bytes",
            "measured bytes the engine holds when loaded",
            labels=["engine"],
        )
        loads = CounterMetricFamily("omniedge_engine_loads", "engine loads", labels=["engine"])
        evictions = CounterMetricFamily(
            "omniedge_engine_evictions", "engines unloaded to make room", labels=["engine"]
        )
        for name, backend in s.backends.items():
            loaded.add_metric([name], float(backend.loaded))
            size.add_metric([name], s.costs[name].load_bytes)
            loads.add_metric([name], s.stats.loads[name])
            evictions.add_metric([name], s.stats.evictions[name])
        yield from (loaded, size, loads, evictions)


class ServerMetrics:
    """Counters and histograms the request handlers update, and the text /metrics returns."""

    def __init__(self, omni: Omni) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "omniedge_requests",
            "requests by kind and HTTP status",
            ["kind", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "omniedge_request_seconds", "request latency, arrival to last token", ["kind"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "omniedge_time_to_first_token_seconds", "arrival to first token (queue wait included)", ["kind"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter("omniedge_generated_tokens", "tokens generated", registry=self.registry)
        self.registry.register(_LiveCollector(omni))

    def text(self) -> bytes:
        return generate_latest(self.registry)
