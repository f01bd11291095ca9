"""A scripted upstream served in-process on a real loopback port, for tests of the app.

The proxy talks to engines over real sockets (aiohttp), so an httpx.MockTransport cannot stand
between them. `serve` runs an aiohttp handler on 127.0.0.1; `from_httpx` turns the simpler
httpx-style handler (httpx.Request → httpx.Response) into one. Like tests/fakes/upstream.py
this is an instrument for the proxy's edge cases, never an engine stand-in.
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    """Yields the server's base URL (http://127.0.0.1:PORT); stops it on exit."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await handler(request)  # any awaitable-returning callable, not only functions

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def from_httpx(handle: Callable[[httpx.Request], httpx.Response]) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        reply = handle(httpx.Request(request.method, str(request.url), content=body))
        content = reply.read()
        headers = {"content-type": reply.headers.get("content-type", "application/json")}
        return web.Response(status=reply.status_code, body=content, headers=headers)

    return handler
