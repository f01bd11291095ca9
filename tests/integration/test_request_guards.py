"""Open mode's Host/Origin guard and the send timeout, over real sockets (findings 18 and 11).

The gateway's app, built by create_app from the config, is served by uvicorn in this process;
the upstream is a scripted process whose stream is large enough to fill a socket.
"""

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fakes.metrics import sample_values

from backends.base import Slot
from backends.supervisor import Supervisor, Timings
from gateway.app import create_app
from gateway.config import Config

from .servers import Spawner, Upstream, free_port, start_upstream, wait_upstream

SEND_TIMEOUT = 0.5
FAST = Timings(startup_poll=0.05, health_interval=60, health_timeout=1, stop_grace=1)


@dataclass
class Open:
    base: str
    port: int
    upstream: Upstream

    async def metric(self, name: str, **labels: str) -> float:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{self.base}/metrics")).text
        return sum(sample_values(text, name, **labels))


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Open]:
    """An open-mode gateway (no API keys) with one model, `one`: a single slot
    (max_in_flight 1) over an upstream whose events carry 64 KiB each."""
    spawner = Spawner(tmp_path / "logs")
    try:
        upstream = start_upstream(spawner, "padded", "--interval", "0", "--pad", "65536")
        wait_upstream(spawner, upstream)
        port = free_port()
        config = Config.model_validate(
            {
                "gateway": {
                    "host": "127.0.0.1",
                    "port": port,
                    "allow_unauthenticated": True,
                    "state_dir": str(tmp_path / "state"),
                    "send_timeout": SEND_TIMEOUT,
                },
                "models": [
                    {
                        "name": "one",
                        "backend": "external",
                        "url": upstream.url,
                        "upstream_model": "fake-model",
                        "max_in_flight": 1,
                    }
                ],
            }
        )
        probes = httpx.AsyncClient()
        slots = [Slot("one-0", config.models[0], 0)]
        supervisor = Supervisor(slots, tmp_path, probes, timings=FAST)
        app = create_app(config, supervisor, probes)
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, ws="none")
        )
        serving = asyncio.ensure_future(server.serve())
        try:
            while not server.started:
                assert not serving.done(), "uvicorn did not start"
                await asyncio.sleep(0.05)
            assert await supervisor.wait_ready(timeout=10)
            yield Open(f"http://127.0.0.1:{port}", port, upstream)
        finally:
            server.should_exit = True
            await serving
    finally:
        spawner.stop_all()


def chat(**fields: object) -> dict[str, object]:
    return {"model": "one", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/health", {"Host": "rebind.attacker.example"}),
        ("GET", "/v1/models", {"Host": "rebind.attacker.example:8000"}),
        ("POST", "/admin/workers/one-0/restart", {"Host": "rebind.attacker.example"}),
        ("POST", "/v1/chat/completions", {"Origin": "http://attacker.example"}),
        ("POST", "/v1/chat/completions", {"Origin": "null"}),
    ],
)
async def test_open_mode_refuses_requests_for_another_site(
    gateway: Open, method: str, path: str, headers: dict[str, str]
) -> None:
    """Finding 18: a web page reaches an open gateway by a cross-site request (its Origin) or
    by DNS rebinding (its Host); both are refused with 403 on every route."""
    before = gateway.upstream.stats()["requests"]
    async with httpx.AsyncClient(base_url=gateway.base, timeout=10) as client:
        response = await client.request(method, path, json=chat(), headers=headers)
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["type"] == "permission_error" and "DNS rebinding" in error["message"]
    assert gateway.upstream.stats()["requests"] == before


@pytest.mark.parametrize(
    "headers",
    [{}, {"Host": "localhost:{port}"}, {"Origin": "http://127.0.0.1:{port}"}],
    ids=["own-host", "localhost", "own-origin"],
)
async def test_open_mode_serves_requests_for_itself(gateway: Open, headers: dict[str, str]) -> None:
    headers = {k: v.format(port=gateway.port) for k, v in headers.items()}
    async with httpx.AsyncClient(base_url=gateway.base, timeout=10) as client:
        response = await client.post("/v1/chat/completions", json=chat(), headers=headers)
    assert response.status_code == 200, response.text


async def test_a_client_that_stops_reading_gives_its_slot_back(gateway: Open) -> None:
    """Finding 11: 1. a raw socket with a small receive buffer asks `one` (a single slot) for
    a stream of 64 KiB events, more than every buffer on the way holds, and never reads; 2. once
    the socket buffers are full,
    uvicorn's send waits, and after SEND_TIMEOUT the gateway ends the stream: the upstream's
    stream is closed, the request counts as 408 and nothing is in flight; 3. the slot serves
    the next request."""
    before = gateway.upstream.stats()
    body = json.dumps(chat(stream=True, max_tokens=1000)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gateway.port))
        sock.sendall(head + body)
        started = time.monotonic()
        while await gateway.metric("enginegate_requests_in_flight", model="one") == 0:
            assert time.monotonic() - started < 5, "the stream never started"
            await asyncio.sleep(0.05)
        while await gateway.metric("enginegate_requests_in_flight", model="one") > 0:
            assert time.monotonic() - started < 10, "the slot stayed taken"
            await asyncio.sleep(0.1)
        assert time.monotonic() - started >= SEND_TIMEOUT
        assert await gateway.metric("enginegate_requests_total", model="one", status="408") == 1
        while gateway.upstream.stats()["cancelled"] == before["cancelled"]:
            assert time.monotonic() - started < 10, "the upstream stream was not closed"
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=gateway.base, timeout=10) as client:
            response = await client.post("/v1/chat/completions", json=chat(max_tokens=2))
        assert response.status_code == 200, response.text
