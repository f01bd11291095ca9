"""What Prometheus scrapes: `/metrics` (the gateway's own) and `/metrics/workers` (the engines').

Engines listen on 127.0.0.1 or a private Unix socket, so Prometheus cannot reach them;
`/metrics/workers` fetches every ready worker's `/metrics` at scrape time (through the worker's
own client, which knows its socket), all at once with a short timeout, adds `model` and `worker`
labels and serves the lot as one page. A worker that does not answer in time is left out of
that scrape and counted in `enginegate_worker_scrape_failures_total`.

Both endpoints take `Authorization: Bearer <gateway.metrics_token>` when that is set; without
it they are open to whoever reaches the gateway's address (127.0.0.1 by default).
"""

import asyncio
import logging

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter

from backends.supervisor import Supervisor, Worker
from gateway.auth import KeyRing
from gateway.exposition import Family, relabel
from gateway.exposition import merge as merge_pages
from gateway.metrics import Metrics

log = logging.getLogger("enginegate.metrics")

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
# Under Prometheus' default scrape_timeout (10 s), so one slow engine cannot fail the scrape.
WORKER_TIMEOUT = 3.0


class EngineScraper:
    """Fetches, relabels and merges the engines' own metrics pages."""

    def __init__(
        self, supervisor: Supervisor, registry: CollectorRegistry, timeout: float = WORKER_TIMEOUT
    ) -> None:
        self.supervisor = supervisor
        self.timeout = timeout
        self.failures = Counter(
            "enginegate_worker_scrape_failures",
            "Scrapes of /metrics/workers that left a ready worker out (error or timeout)",
            ["model", "worker"],
            registry=registry,
        )
        for worker in supervisor.workers:
            self.failures.labels(worker.model_name, worker.id)  # a 0 series from the start

    async def scrape(self) -> str:
        workers = [w for w in self.supervisor.workers if w.is_ready and metrics_url(w)]
        pages = await asyncio.gather(*(self._fetch(w) for w in workers))
        return merge_pages(page for page in pages if page is not None)

    async def _fetch(self, worker: Worker) -> dict[str, Family] | None:
        url = metrics_url(worker)
        assert url is not None
        # Some engines' /metrics ignore the key, others require it: sending it always is harmless.
        headers = {"Accept": "text/plain; version=0.0.4"}
        if worker.api_key:
            headers["Authorization"] = f"Bearer {worker.api_key}"
        try:
            resp = await worker.client.get(url, headers=headers, timeout=self.timeout)
            resp.raise_for_status()
            return relabel(resp.text, {"model": worker.model_name, "worker": worker.id})
        except (httpx.HTTPError, ValueError) as exc:
            self.failures.labels(worker.model_name, worker.id).inc()
            log.warning("metrics of worker %s left out: %s: %s", worker.id, type(exc).__name__, exc)
            return None


def metrics_url(worker: Worker) -> str | None:
    """Where the worker's engine serves its metrics (its adapter says); None for a server
    someone else runs, theirs to scrape."""
    return worker.launch.metrics_url if worker.launch else None


def metrics_router(metrics: Metrics, scraper: EngineScraper, token: str | None) -> APIRouter:
    router = APIRouter()
    keys = KeyRing([token] if token else [])  # no keys: open

    @router.get("/metrics")
    async def gateway_metrics(request: Request) -> Response:
        keys.authenticate(request, "metrics token")
        return Response(metrics.render(), media_type=TEXT_FORMAT)

    @router.get("/metrics/workers")
    async def worker_metrics(request: Request) -> Response:
        keys.authenticate(request, "metrics token")
        return Response(await scraper.scrape(), media_type=TEXT_FORMAT)

    return router
