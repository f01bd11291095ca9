"""Prometheus metrics, named once, on a registry of the app's own (no global state)."""

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from backends.supervisor import Supervisor, WorkerState
from gateway.gpu_metrics import GpuCollector

# LLM requests take from milliseconds (cached, short) to many minutes (long reasoning).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# Time to first token: ms (short prompt, idle engine) to tens of s (long prefill, queueing).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30, 60)
# Between chunks: a few ms on a fast GPU to ~1 s on a CPU or an overloaded engine.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class Metrics:
    def __init__(self, supervisor: Supervisor) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "enginegate_requests", "Requests answered, by model, HTTP status and API key name",
            ["model", "status", "key"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "enginegate_request_duration_seconds", "Time from request to last byte sent",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "enginegate_time_to_first_token_seconds", "Time from request to first streamed bytes",
            ["model"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "enginegate_inter_token_latency_seconds", "Time between streamed chunks",
            ["model"], buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "enginegate_tokens", "Tokens from the engines' usage, by model, key name and kind",
            ["model", "key", "kind"], registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "enginegate_retries", "Requests sent to another replica after a failure before the "
            "first byte (connect error, reset, 502/503)", ["model"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "enginegate_requests_in_flight", "Requests being answered now", ["model"], registry=r
        )
        self.queued = Gauge(
            "enginegate_requests_queued", "Requests waiting for an admission slot", ["model"],
            registry=r,
        )  # fmt: skip
        r.register(WorkerCollector(supervisor))
        self.gpus = GpuCollector()
        r.register(self.gpus)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: labels() validates and takes a lock on
        every call, 4 % of the gateway's CPU under load. Label values are bounded (models,
        statuses, key names), so the cache is too."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerCollector(Collector):
    """Worker states are read from the supervisor at scrape time, not pushed on change."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model", "worker"]
        states = GaugeMetricFamily(
            "enginegate_worker_state",
            "1 for the state each worker is in",
            labels=[*labels, "state"],
        )
        restarts = CounterMetricFamily(
            "enginegate_worker_restarts", "Worker restarts since the gateway started", labels=labels
        )
        start = GaugeMetricFamily(
            "enginegate_worker_last_start_seconds", "How long the last start took", labels=labels
        )
        for worker in self.supervisor.workers:
            ids = [worker.model_name, worker.id]
            for state in WorkerState:
                states.add_metric([*ids, state.value], 1.0 if worker.state is state else 0.0)
            restarts.add_metric(ids, worker.restarts)
            if worker.ready_seconds is not None:
                start.add_metric(ids, worker.ready_seconds)
        yield states
        yield restarts
        yield start
