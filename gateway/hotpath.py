"""The OpenAI routes that carry the traffic, served as plain ASGI in front of FastAPI.

POST /v1/chat/completions, /v1/completions and /v1/embeddings go straight to the proxy;
everything else (models, health, metrics, admin, the status page) goes to the FastAPI app.
FastAPI's routing, dependency solving and exception middleware cost more CPU per request than
the whole proxy does (`python -m bench.overhead --profile`), and these routes need none of it.
"""

import logging

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.state import Gateway

log = logging.getLogger("enginegate.gateway")

PROXIED = {
    "/v1/chat/completions": "/chat/completions",
    "/v1/completions": "/completions",
    "/v1/embeddings": "/embeddings",
}


class HotPath:
    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = PROXIED.get(scope["path"]) if scope["type"] == "http" else None
        if path is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
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
