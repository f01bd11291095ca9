"""Admission under overload, against the real gateway process and a scripted slow upstream.

The upstream takes SLOW seconds before it answers anything, so the requests admitted first hold
their slots while the rest arrive: what the gateway does with those is the test.
"""

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from .servers import Spawner, Upstream, free_port, start_gateway, start_upstream, wait_upstream
from .test_proxy import assert_openai_error, chat

KEY = "gw-admission-key-5c1f"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOW = 1.0  # seconds before the upstream's first byte


@dataclass
class Fleet:
    base: str
    upstream: Upstream


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """1. Start the slow upstream; 2. start a gateway with three models over it (`busy`: 2
    slots and a line of 2; `impatient`: 1 slot, a line of 1 that gives up after 0.3 s) and one
    over a port nobody listens on (`nowhere`, never ready); 3. wait until the upstream's
    models are ready."""
    tmp = tmp_path_factory.mktemp("admission")
    spawner = Spawner(tmp / "logs")
    try:
        upstream = start_upstream(spawner, "slow", "--first-byte-delay", str(SLOW))
        wait_upstream(spawner, upstream)
        port = free_port()
        config = tmp / "enginegate.yaml"
        config.write_text(f"""\
gateway:
  host: 127.0.0.1
  port: {port}
  api_keys: ["{KEY}"]
  state_dir: {tmp / "state"}
  drain_timeout: 1
  stop_grace: 1
models:
  - {{name: fake-model, backend: external, url: '{upstream.url}',
      max_in_flight: 2, max_queue: 2, queue_timeout: 10}}
  - {{name: impatient, backend: external, url: '{upstream.url}', upstream_model: fake-model,
      max_in_flight: 1, max_queue: 1, queue_timeout: 0.3}}
  - {{name: nowhere, backend: external, url: 'http://127.0.0.1:{free_port()}/v1'}}
""")
        start_gateway(spawner, config)
        base = f"http://127.0.0.1:{port}"
        spawner.wait_http("gateway", f"{base}/health")
        _wait_models_ready(base, {"fake-model", "impatient"})
        yield Fleet(base, upstream)
    finally:
        spawner.stop_all()


def _wait_models_ready(base: str, names: set[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        listed = httpx.get(f"{base}/v1/models", headers=AUTH, timeout=5).json()["data"]
        if names <= {m["id"] for m in listed if m["ready"]}:
            return
        assert time.monotonic() < deadline, f"not ready in {timeout} s: {listed}"
        time.sleep(0.05)


async def _simultaneous(base: str, model: str, count: int) -> list[tuple[httpx.Response, float]]:
    """`count` requests sent at once; each response with its seconds since the start."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:

        async def one() -> tuple[httpx.Response, float]:
            response = await client.post("/v1/chat/completions", json=chat(model), headers=AUTH)
            return response, time.monotonic() - started

        started = time.monotonic()
        return await asyncio.gather(*(one() for _ in range(count)))


async def test_limit_2_queue_2_of_10_simultaneous_requests_gives_6_429s(fleet: Fleet) -> None:
    """1. Send 10 requests at once to `fake-model` (2 slots, line of 2); 2. six are refused at
    once with 429 and Retry-After; 3. four are answered 200: two right away, two after waiting
    for a slot; 4. the upstream saw exactly those four."""
    before = fleet.upstream.stats()["requests"]
    results = await _simultaneous(fleet.base, "fake-model", 10)

    refused = [(r, t) for r, t in results if r.status_code == 429]
    answered = [(r, t) for r, t in results if r.status_code == 200]
    assert (len(refused), len(answered)) == (6, 4), [r.status_code for r, _ in results]
    for response, seconds in refused:
        error = assert_openai_error(response, 429)
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert int(response.headers["retry-after"]) >= 1
        assert seconds < SLOW, "a refusal must not wait for a slot"
    waits = sorted(seconds for _, seconds in answered)
    assert waits[1] < 2 * SLOW <= waits[2], waits  # two served at once, two after them
    assert fleet.upstream.stats()["requests"] - before == 4


async def test_queue_timeout_refuses_the_waiting_request_with_429(fleet: Fleet) -> None:
    """`impatient`: 1 slot, a line of 1 with a 0.3 s wait. Of three requests at once, one is
    answered, one is refused at once (line full) and one after waiting 0.3 s in line."""
    results = await _simultaneous(fleet.base, "impatient", 3)
    by_status = sorted((r.status_code, round(t, 1)) for r, t in results)
    assert [status for status, _ in by_status] == [200, 429, 429], by_status
    waited = [t for r, t in results if r.status_code == 429]
    assert min(waited) < 0.25 and 0.25 <= max(waited) < SLOW, waited
    for response, _ in results:
        if response.status_code == 429:
            assert "retry-after" in response.headers
            assert_openai_error(response, 429)


def test_model_without_a_ready_replica_gets_503_with_retry_after(fleet: Fleet) -> None:
    response = httpx.post(
        f"{fleet.base}/v1/chat/completions", json=chat("nowhere"), headers=AUTH, timeout=10
    )
    error = assert_openai_error(response, 503)
    assert (error["type"], error["code"]) == ("service_unavailable", "no_ready_replica")
    assert int(response.headers["retry-after"]) >= 1
