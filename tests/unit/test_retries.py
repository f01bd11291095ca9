"""Which failures before the first byte are tried again on the other replica, and the counter.

The real app runs in-process over two `external` replicas of one model, each its own scripted
upstream on a loopback port (tests/fakes/loopback.py); replica 0 is the first one chosen.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import httpx
import pytest
from aiohttp import web
from fakes.loopback import Handler, serve

from backends.base import Slot
from backends.spec import ModelSpec
from backends.supervisor import Supervisor, Timings
from gateway.app import create_app
from gateway.config import Config, GatewayConfig
from gateway.errors import UpstreamFailed, UpstreamTimeout
from gateway.upstream import Upstream, sort_failure

KEY = "sk-retries-1111"
FAST = Timings(startup_poll=0.01, health_interval=60, health_timeout=1, stop_grace=1)
BODY = {"model": "pair", "messages": [{"role": "user", "content": "hi"}]}
READ_TIMEOUT = 0.5


class Replica:
    """An upstream listing `pair`; `answer` decides what a completion request gets."""

    def __init__(self, answer: Callable[[web.Request], web.StreamResponse] | None = None):
        self.calls = 0
        self.answer = answer

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "pair"}]})
        self.calls += 1
        if self.answer is not None:
            return await self.answer(request)
        return web.json_response({"object": "chat.completion", "choices": []})


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Callable]:
    """gateway(first, second) → (client of the app, retries_total for `pair`, a function
    that stops the first replica's server)."""
    async with AsyncExitStack() as stack:

        async def start(first: Handler, second: Handler):
            first_server = AsyncExitStack()
            stack.push_async_callback(first_server.aclose)
            urls = [
                await first_server.enter_async_context(serve(first)),
                await stack.enter_async_context(serve(second)),
            ]
            specs = [ModelSpec(name="pair", backend="external", url=f"{u}/v1") for u in urls]
            slots = [Slot(f"pair-{i}", spec, i) for i, spec in enumerate(specs)]
            gateway = GatewayConfig(api_keys=[KEY], state_dir=tmp_path, read_timeout=READ_TIMEOUT)
            config = Config(gateway=gateway, models=specs[:1])
            client = await stack.enter_async_context(httpx.AsyncClient())
            supervisor = Supervisor(slots, tmp_path, client, timings=FAST)
            app = create_app(config, supervisor, client)
            await stack.enter_async_context(app.router.lifespan_context(app))
            assert await supervisor.wait_ready(timeout=5)
            registry = app.state.gateway.metrics.registry
            transport = httpx.ASGITransport(app=app)
            caller = httpx.AsyncClient(transport=transport, base_url="http://gw")
            await stack.enter_async_context(caller)

            def retries() -> float:
                sample = registry.get_sample_value("enginegate_retries_total", {"model": "pair"})
                return sample or 0

            return caller, retries, first_server.aclose

        yield start


async def test_connect_refused_is_retried_on_the_other_replica(gateway):
    """Replica 0 was ready, then its server went away (the gateway has not noticed yet): the
    request never reached an engine, so the second replica takes it."""
    gone, other = Replica(), Replica()
    client, retries, stop_first = await gateway(gone, other)
    await stop_first()
    response = await client.post("/v1/chat/completions", json=BODY, headers=AUTH)
    assert response.status_code == 200, response.text
    assert (gone.calls, other.calls, retries()) == (0, 1, 1)


async def test_connection_dropped_before_an_answer_is_retried(gateway):
    async def drop(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(1)
        return web.Response()

    dropping, other = Replica(drop), Replica()
    client, retries, _ = await gateway(dropping, other)
    response = await client.post("/v1/chat/completions", json=BODY, headers=AUTH)
    assert response.status_code == 200, response.text
    assert (dropping.calls, other.calls, retries()) == (1, 1, 1)


async def test_no_first_byte_in_time_is_504_and_not_retried(gateway):
    """The engine may be generating already: a second replica would do the work twice."""

    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(READ_TIMEOUT * 4)
        return web.Response()

    slow, other = Replica(silent), Replica()
    client, retries, _ = await gateway(slow, other)
    response = await client.post("/v1/chat/completions", json=BODY, headers=AUTH)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert (slow.calls, other.calls, retries()) == (1, 0, 0)


@pytest.mark.parametrize(
    ("failure", "error", "may_retry"),
    [
        (aiohttp.ConnectionTimeoutError("connect"), UpstreamTimeout, True),
        (aiohttp.SocketTimeoutError("read"), UpstreamTimeout, False),
        (aiohttp.ServerDisconnectedError(), UpstreamFailed, True),
        (ConnectionRefusedError(111, "refused"), UpstreamFailed, True),
    ],
    ids=["connect-timeout", "read-timeout", "disconnected", "refused"],
)
def test_failures_are_sorted_into_retry_or_not(failure, error, may_retry) -> None:
    """A connect timeout cannot be made on loopback on demand: the sorting is checked here."""
    sorted_error = sort_failure(failure, "pair-0")
    assert type(sorted_error) is error and sorted_error.may_retry is may_retry


async def test_an_unreachable_worker_is_named_by_id_not_by_address() -> None:
    """Finding 15: a replica whose server is gone is reported as `worker pair-0 could not be
    reached`; its host:port and the client library's exception text (which holds it) go to
    the log only."""
    async with serve(Replica()) as url:
        pass  # the server is gone: its port refuses connections
    upstream = Upstream(connect_timeout=1, read_timeout=1)
    try:
        with pytest.raises(UpstreamFailed) as failed:
            await upstream.post("pair-0", f"{url}/v1/chat/completions", b"{}", {})
    finally:
        await upstream.close()
    assert failed.value.message == "worker pair-0 could not be reached"
    assert failed.value.may_retry
    assert url.removeprefix("http://") not in failed.value.response().body.decode()


AUTH = {"Authorization": f"Bearer {KEY}"}
