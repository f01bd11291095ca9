"""The engine routes that carry the traffic, answered before FastAPI's own stack.

POST /v1/chat/completions, /v1/completions, /v1/embeddings and the other engine APIs
(engine_api.py: Responses, Anthropic's Messages, rerank, score, tokenize) go straight to the
proxy; everything else (models, health, metrics, admin, the status page) is FastAPI as usual.
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

from gateway import anthropic
from gateway.engine_api import ROUTES, EngineRoute, stored_route
from gateway.errors import GatewayError, MethodNotAllowed, UnsupportedMediaType
from gateway.origin import refusal
from gateway.request import is_json
from gateway.state import Gateway

log = logging.getLogger("enginegate.gateway")


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
        route, response_id = ROUTES.get(scope["path"]), None
        if route is None:
            stored = stored_route(scope["path"])
            if stored is None:
                await super().__call__(scope, receive, send)
                return
            route, response_id = stored
        try:
            await self._proxy(Request(scope, receive), send, route, response_id)
            return
        except GatewayError as exc:
            response = route.error_response(exc)
        except Exception:
            log.exception("request to %s failed", scope["path"])
            error = GatewayError("internal error in the gateway; see its log")
            response = route.error_response(error)
        await response(scope, receive, send)

    async def _proxy(
        self, request: Request, send: Send, route: EngineRoute, response_id: str | None
    ) -> None:
        if request.method != route.method:
            message = f"{request.url.path} takes {route.method}, not {request.method}"
            raise MethodNotAllowed(message, route.method)
        keys = self.gateway.keys
        if route.is_anthropic:
            key = anthropic.authenticate(keys, request)
        else:
            key = keys.authenticate(request)
        content_type = request.headers.get("content-type")
        if route.has_body and not is_json(content_type):
            sent = f"`{content_type}`" if content_type else "none"
            raise UnsupportedMediaType(
                f"send the body as `Content-Type: application/json`, not {sent}"
            )
        await self.gateway.proxy.serve(request, send, route, key, response_id)
