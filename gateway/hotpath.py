"""The OpenAI routes that carry the traffic, answered before FastAPI's own stack.

POST /v1/chat/completions, /v1/completions and /v1/embeddings go straight to the proxy;
everything else (models, health, metrics, admin, the status page) is FastAPI as usual.
FastAPI's middleware, routing and dependency solving cost more CPU per request than the
whole proxy does (`python -m bench.overhead --profile`: its telemetry check alone reads the
environment on every request), and these routes need none of it.

In open mode (no API keys) every request, on any route, must first be addressed to this
gateway (origin.py).
"""

import logging

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, MethodNotAllowed, UnsupportedMediaType
from gateway.origin import refusal
from gateway.request import is_json
from gateway.state import Gateway

log = logging.getLogger("enginegate.gateway")

PROXIED = {
    "/v1/chat/completions": "/chat/completions",
    "/v1/completions": "/completions",
    "/v1/embeddings": "/embeddings",
}


class GatewayApp(FastAPI):
    gateway: Gateway  # set by create_app
    # Open mode: the Host (and Origin) names a request must carry (origin.allowed_hosts);
    # None: any, as API keys keep other web sites out. Set by create_app.
    allowed_hosts: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if self.allowed_hosts is not None:
            foreign = refusal(scope["headers"], self.allowed_hosts)
            if foreign is not None:
                await foreign.response()(scope, receive, send)
                return
        path = PROXIED.get(scope["path"])
        if path is None:
            await super().__call__(scope, receive, send)
            return
        try:
            await self._proxy(Request(scope, receive), send, path)
            return
        except GatewayError as exc:
            response = exc.response()
        except Exception:
            log.exception("request to %s failed", scope["path"])
            response = GatewayError("internal error in the gateway; see its log").response()
        await response(scope, receive, send)

    async def _proxy(self, request: Request, send: Send, path: str) -> None:
        if request.method != "POST":
            raise MethodNotAllowed(f"{request.url.path} takes POST, not {request.method}", "POST")
        key = self.gateway.keys.authenticate(request)
        content_type = request.headers.get("content-type")
        if not is_json(content_type):
            sent = f"`{content_type}`" if content_type else "none"
            raise UnsupportedMediaType(
                f"send the body as `Content-Type: application/json`, not {sent}"
            )
        await self.gateway.proxy.serve(request, send, path, key)
