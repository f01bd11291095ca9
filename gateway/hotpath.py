"""The OpenAI routes that carry the traffic, answered before FastAPI's own stack.

POST /v1/chat/completions, /v1/completions and /v1/embeddings go straight to the proxy;
everything else (models, health, metrics, admin, the status page) is FastAPI as usual.
FastAPI's middleware, routing and dependency solving cost more CPU per request than the
whole proxy does (`python -m bench.overhead --profile`: its telemetry check alone reads the
environment on every request), and these routes need none of it.
"""

import logging

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.state import Gateway

log = logging.getLogger("enginegate.gateway")

PROXIED = {
    "/v1/chat/completions": "/chat/completions",
    "/v1/completions": "/completions",
    "/v1/embeddings": "/embeddings",
}


class GatewayApp(FastAPI):
    gateway: Gateway  # set by create_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = PROXIED.get(scope["path"]) if scope["type"] == "http" else None
        if path is None or scope["method"] != "POST":
            await super().__call__(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            principal = self.gateway.keys.authenticate(request)
            response = await self.gateway.proxy.forward(request, path, principal)
        except GatewayError as exc:
            response = exc.response()
        except Exception:
            log.exception("request to %s failed", scope["path"])
            response = GatewayError("internal error in the gateway; see its log").response()
        await response(scope, receive, send)
