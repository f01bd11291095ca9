"""A request gives back its admission slot, the in-flight gauge and its replica's count once,
however it ends (finding 1 and architecture review 4.13 item 4).

The real app runs in-process (httpx.ASGITransport) in front of one `external` replica whose
upstream is a scripted server on a loopback port; each test makes the request end another way,
then reads the books.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from fakes.loopback import serve

from backends.base import Slot
from backends.spec import ModelSpec
from backends.supervisor import Supervisor, Timings, Worker
from gateway.app import create_app
from gateway.config import Config, GatewayConfig
from gateway.errors import UpstreamFailed
from gateway.limits import Admission
from gateway.metrics import Metrics
from gateway.upstream import Upstream

KEY = "sk-lifecycle-2222"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = Timings(startup_poll=0.01, health_interval=60, health_timeout=1, stop_grace=1)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Books:
    client: httpx.AsyncClient
    admission: Admission
    worker: Worker
    metrics: Metrics
    proxy: Any
    arrived: asyncio.Event  # the upstream got a completion request

    def assert_settled(self) -> None:
        gauge = self.metrics.registry.get_sample_value(
            "enginegate_requests_in_flight", {"model": "m"}
        )
        assert (self.admission.in_flight, self.worker.in_flight, gauge) == (0, 0, 0)

    def count(self, status: int) -> float:
        labels = {"model": "m", "status": str(status), "key": "key-0"}
        return self.metrics.registry.get_sample_value("enginegate_requests_total", labels) or 0


Answer = Callable[[web.Request], Any]


@pytest.fixture
async def books(tmp_path: Path) -> AsyncIterator[Callable[[Answer], Any]]:
    """books(answer) → Books for the app in front of an upstream that answers with `answer`."""
    async with AsyncExitStack() as stack:

        async def start(answer: Answer) -> Books:
            arrived = asyncio.Event()

            async def handle(request: web.Request) -> web.StreamResponse:
                if request.path == "/v1/models":
                    return web.json_response({"object": "list", "data": [{"id": "m"}]})
                arrived.set()
                return await answer(request)

            url = await stack.enter_async_context(serve(handle))
            spec = ModelSpec(name="m", backend="external", url=f"{url}/v1", max_in_flight=2)
            config = Config(
                gateway=GatewayConfig(api_keys=[KEY], state_dir=tmp_path), models=[spec]
            )
            probes = await stack.enter_async_context(httpx.AsyncClient())
            supervisor = Supervisor([Slot("m-0", spec, 0)], tmp_path, probes, timings=FAST)
            app = create_app(config, supervisor, probes)
            await stack.enter_async_context(app.router.lifespan_context(app))
            assert await supervisor.wait_ready(timeout=5)
            transport = httpx.ASGITransport(app=app)
            client = httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=10)
            await stack.enter_async_context(client)
            gateway = app.state.gateway
            return Books(
                client,
                gateway.proxy.admissions["m"],
                supervisor.workers[0],
                gateway.metrics,
                gateway.proxy,
                arrived,
            )

        yield start


async def never(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(30)
    return web.Response()


async def test_an_unexpected_exception_after_admission_releases_everything(books) -> None:
    """Finding 1: an exception that is not a GatewayError between admission and the answer
    (here from the routing policy) is a 500, and leaks neither the slot nor the counts."""
    b = await books(never)

    class Exploding:
        def key_for(self, body: object, headers: object) -> str:
            raise RuntimeError("boom")

    b.proxy.policies["m"] = Exploding()
    for _ in range(3):  # more than max_in_flight: a leak would turn the third into a 429
        response = await b.client.post("/v1/chat/completions", json=BODY, headers=AUTH)
        assert response.status_code == 500, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    b.assert_settled()
    assert b.count(500) == 3


@pytest.mark.parametrize("is_stream", [False, True], ids=["whole", "stream"])
async def test_a_request_cancelled_while_the_engine_thinks_releases_everything(
    books, is_stream: bool
) -> None:
    """Finding 1: a cancellation (uvicorn's at shutdown, say) while waiting for the engine's
    first byte leaks nothing, and the engine's request is closed."""
    b = await books(never)
    body = {**BODY, "stream": is_stream}
    sending = asyncio.ensure_future(b.client.post("/v1/chat/completions", json=body, headers=AUTH))
    await asyncio.wait_for(b.arrived.wait(), 5)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    b.assert_settled()
    assert b.count(499) == 1


async def test_a_request_cancelled_mid_stream_releases_everything(books) -> None:
    async def slow_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(100):
            await response.write(b'data: {"choices":[]}\n\n')
            await asyncio.sleep(0.05)
        return response

    b = await books(slow_stream)
    sending = asyncio.ensure_future(
        b.client.post("/v1/chat/completions", json={**BODY, "stream": True}, headers=AUTH)
    )
    await asyncio.wait_for(b.arrived.wait(), 5)
    await asyncio.sleep(0.2)
    assert b.worker.in_flight == 1
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    b.assert_settled()


async def test_a_whole_answer_the_gateway_cannot_read_is_a_502(books) -> None:
    """Finding 9, for whole answers: `choices` that is not a list is a 502 naming the worker."""

    async def odd(request: web.Request) -> web.StreamResponse:
        return web.json_response({"model": "other", "choices": 5})

    b = await books(odd)
    response = await b.client.post("/v1/chat/completions", json=BODY, headers=AUTH)
    assert response.status_code == 502
    assert "worker m-0" in response.json()["error"]["message"]
    b.assert_settled()


@pytest.mark.parametrize("is_chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_read_cap_is_a_502_and_not_kept(is_chunked: bool) -> None:
    """Finding 8, for whole answers and error bodies: they are read up to a cap
    (MAX_ANSWER_BYTES, MAX_ERROR_BYTES), never without end."""

    async def big(request: web.Request) -> web.StreamResponse:
        if not is_chunked:
            return web.Response(body=b" " * 5000)
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(5):
            await response.write(b" " * 1000)
        return response

    upstream = Upstream(connect_timeout=1, read_timeout=1)
    async with serve(big) as url:
        try:
            answer = await upstream.post("m-0", url, b"{}", {})
            with pytest.raises(UpstreamFailed, match="worker m-0 answered more than 4096 bytes"):
                await answer.read(4096)
            answer.close()
            answer = await upstream.post("m-0", url, b"{}", {})
            assert len(await answer.read(5000)) == 5000
        finally:
            await upstream.close()
