"""Which failures before the first byte are tried again on the other replica, and the counter.

The real app runs in-process over two `external` replicas of one model; their upstream is an
httpx.MockTransport that fails the first completion request in a scripted way.
"""

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from backends.supervisor import Supervisor, Timings
from gateway.app import create_app
from gateway.config import Config, plan_workers

KEY = "sk-retries-1111"
FAST = Timings(startup_poll=0.01, health_interval=60, health_timeout=1, stop_grace=1)
BODY = {"model": "pair", "messages": [{"role": "user", "content": "hi"}]}


def failing_once(error: Exception, calls: list[str]) -> Callable[[httpx.Request], httpx.Response]:
    """An upstream listing `pair` whose first completion request raises `error`."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "pair"}]})
        calls.append(request.url.path)
        if len(calls) == 1:
            raise error
        return httpx.Response(200, json={"object": "chat.completion", "choices": []})

    return handle


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Callable]:
    """gateway(handler) → (client of the app, its retries_total for `pair`)."""
    supervisors: list[Supervisor] = []

    async def start(handle: Callable[[httpx.Request], httpx.Response]):
        config = Config.model_validate(
            {
                "gateway": {"api_keys": [KEY], "state_dir": str(tmp_path)},
                "models": [
                    {"name": "pair", "backend": "external", "url": "http://up/v1", "replicas": 2}
                ],
            }
        )
        upstream = httpx.AsyncClient(transport=httpx.MockTransport(handle))
        slots = plan_workers(config, "test.yaml", gpu_count=0, cpu_cores=[0])
        supervisor = Supervisor(slots, tmp_path, upstream, timings=FAST)
        supervisors.append(supervisor)
        app = create_app(config, supervisor, upstream)
        await supervisor.start()
        assert await supervisor.wait_ready(timeout=5)
        registry = app.state.gateway.metrics.registry
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")

        def retries() -> float:
            return registry.get_sample_value("enginegate_retries_total", {"model": "pair"}) or 0

        return client, retries

    yield start
    for supervisor in supervisors:
        await supervisor.stop()


@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError("refused"), httpx.ConnectTimeout("connect timed out")],
    ids=["connect-refused", "connect-timeout"],
)
async def test_connect_failure_is_retried_on_the_other_replica(gateway, error) -> None:
    """The request never reached the first engine, so sending it to the second is safe."""
    calls: list[str] = []
    client, retries = await gateway(failing_once(error, calls))
    async with client:
        response = await client.post("/v1/chat/completions", json=BODY, headers=_auth())
    assert response.status_code == 200, response.text
    assert len(calls) == 2 and retries() == 1


async def test_no_first_byte_in_time_is_504_and_not_retried(gateway) -> None:
    """The engine may be generating already: a second replica would do the work twice."""
    calls: list[str] = []
    client, retries = await gateway(failing_once(httpx.ReadTimeout("no answer"), calls))
    async with client:
        response = await client.post("/v1/chat/completions", json=BODY, headers=_auth())
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert len(calls) == 1 and retries() == 0


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}
