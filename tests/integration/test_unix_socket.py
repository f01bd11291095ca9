"""The gateway's clients reach an engine on a Unix socket: the proxy's (aiohttp) and the
probe's (httpx), against a scripted server that uvicorn serves on a socket, as vLLM does with
`--uds`. Never an engine stand-in: tests/e2e/test_engine_socket.py runs the real one.

Finding 19: vLLM's key guards only /v1, /v2, /inference and /cohere, so its workers moved from
a loopback port to a socket in a private directory; these say the gateway still reaches them.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import uvicorn
from fakes.loopback import from_httpx, serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from backends.base import Launch
from backends.probe import probe
from gateway.errors import UpstreamFailed
from gateway.upstream import Upstream

KEY = "worker-key-Qs3"


async def chat(request: Request) -> Response:
    async def events() -> AsyncIterator[bytes]:
        for n in range(3):
            yield f"data: {n}\n\n".encode()
            await asyncio.sleep(0.01)

    auth = request.headers.get("authorization")
    return StreamingResponse(events(), headers={"x-seen-auth": str(auth)})


async def models(request: Request) -> Response:
    if request.headers.get("authorization") != f"Bearer {KEY}":
        return JSONResponse({"error": "Unauthorized"}, status_code=401)
    return JSONResponse({"object": "list", "data": [{"id": "tiny"}]})


APP = Starlette(
    routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", lambda request: Response()),
    ]
)


@pytest.fixture
async def engine_socket(tmp_path: Path) -> AsyncIterator[str]:
    """uvicorn serving APP on a Unix socket, as vLLM's launcher does; its path."""
    path = str(tmp_path / "run" / "tiny-0.sock")
    Path(path).parent.mkdir(mode=0o700)
    server = uvicorn.Server(uvicorn.Config(APP, uds=path, log_config=None, lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    yield path
    server.should_exit = True
    await asyncio.wait_for(task, 10)


def socket_launch(path: str) -> Launch:
    base = "http://localhost"
    return Launch(
        argv=["vllm"],
        env={},
        base_url=f"{base}/v1",
        health_url=f"{base}/health",
        served_name="tiny",
        api_key=KEY,
        socket_path=path,
    )


async def test_the_proxy_streams_from_a_socket_and_a_port_side_by_side(engine_socket: str) -> None:
    """One session per socket beside the shared TCP one: both answer, then close() ends all."""
    upstream = Upstream(connect_timeout=2, read_timeout=5)
    tcp_answer = from_httpx(lambda request: httpx.Response(200, json={"via": "tcp"}))
    try:
        async with serve(tcp_answer) as tcp_url:
            headers = {"authorization": f"Bearer {KEY}"}
            url = "http://localhost/v1/chat/completions"
            answer = await upstream.post("tiny-0", url, b"{}", headers, engine_socket)
            assert answer.status == 200 and answer.headers["x-seen-auth"] == f"Bearer {KEY}"
            assert b"".join([chunk async for chunk in answer.chunks()]) == (
                b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            )
            answer.close()
            other = await upstream.post("remote-0", f"{tcp_url}/v1/chat/completions", b"{}", {})
            assert await other.read(1000) == b'{"via":"tcp"}'
            other.close()
    finally:
        await upstream.close()


async def test_a_missing_socket_is_a_failure_another_replica_may_take(tmp_path: Path) -> None:
    """An engine restarting has no socket yet: like a refused connection, the request never
    reached it, so the proxy may try another replica."""
    upstream = Upstream(connect_timeout=2, read_timeout=5)
    try:
        with pytest.raises(UpstreamFailed) as failed:
            url = "http://localhost/v1/chat/completions"
            await upstream.post("tiny-0", url, b"{}", {}, str(tmp_path / "gone.sock"))
        assert failed.value.may_retry and "could not be reached" in str(failed.value)
        assert "gone.sock" not in str(failed.value)  # the worker is named, not its address
    finally:
        await upstream.close()


async def test_the_probe_reaches_the_engine_through_its_socket(engine_socket: str) -> None:
    transport = httpx.AsyncHTTPTransport(uds=engine_socket)
    async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
        launch = socket_launch(engine_socket)
        assert (await probe(client, launch, None, timeout=2, full=True)).ok
        wrong_key = replace(launch, api_key="not-the-key")
        assert (await probe(client, wrong_key, None, timeout=2, full=True)).verdict == "refused"
