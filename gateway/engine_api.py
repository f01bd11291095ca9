"""The engine APIs the gateway routes by the body's `model`, and how each one differs.

    path                          upstream (under the engine's /v1, or its root)  notes
    /v1/chat/completions          /chat/completions                               every engine
    /v1/completions               /completions                                    every engine
    /v1/embeddings                /embeddings                                     every engine
    /v1/responses                 /responses                 typed events, pinned (pins.py)
    GET  /v1/responses/{id}       /responses/{id}            to the replica that stored it
    POST /v1/responses/{id}/cancel
    /v1/messages                  /messages                  Anthropic's errors and key header;
                                  else /chat/completions     translated (anthropic_chat.py)
    /v1/messages/count_tokens     /messages/count_tokens     Anthropic's errors and key header
    /v1/rerank, /v1/score         /rerank, /score
    /tokenize, /detokenize        root /tokenize, /detokenize (vLLM has them only there)

Every route shares the hot path (proxy.py): auth, admission, retries before the first byte,
disconnects, metrics. Which engines serve which API is each adapter's `apis`
(backends/base.py); a model whose engine lacks one gets ApiNotServed naming the engine.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import quote

from starlette.responses import JSONResponse

from backends.adapters import ADAPTERS
from gateway import anthropic
from gateway.errors import ApiNotServed, GatewayError, from_upstream
from gateway.sse import error_event


@dataclass(frozen=True)
class EngineRoute:
    path: str  # the engine's path, under its base URL (…/v1) or, `at_root`, its root
    api: str | None = None  # its name in ENGINE_APIS; None: every engine serves it
    at_root: bool = False
    is_anthropic: bool = False  # Anthropic's key header, error shape and headers
    has_typed_events: bool = False  # streams of `event:` lines that carry their own usage
    method: str = "POST"
    has_body: bool = True  # False: the request names no model (a stored response's routes)
    # The route asked instead when the engine answers 404 or 405 (anthropic_chat.py).
    translates_to: "EngineRoute | None" = None

    def url(self, base_url: str, query: str = "") -> str:
        base = base_url.removesuffix("/v1") if self.at_root else base_url
        return f"{base}{self.path}" + (f"?{query}" if query else "")

    def forwarded(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The client's headers the engine gets as well."""
        if not self.is_anthropic:
            return {}
        return {h: headers[h] for h in anthropic.PASSED_HEADERS if h in headers}

    def error_response(self, exc: GatewayError) -> JSONResponse:
        if self.is_anthropic:
            return anthropic.error_response(exc.status, exc.message, exc.headers())
        return exc.response()

    def upstream_error(self, status: int, content: bytes) -> JSONResponse:
        """An engine's error body, in this route's shape."""
        body = from_upstream(status, content)
        if self.is_anthropic:
            return anthropic.error_response(status, body["error"]["message"])
        return JSONResponse(body, status)

    def error_event(self, message: str) -> bytes:
        if self.is_anthropic:
            return anthropic.error_event(message)
        if self.has_typed_events:
            return responses_error_event(message)
        return error_event(message)


CHAT = EngineRoute("/chat/completions")
ROUTES: dict[str, EngineRoute] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": EngineRoute("/completions"),
    "/v1/embeddings": EngineRoute("/embeddings"),
    "/v1/responses": EngineRoute("/responses", "responses", has_typed_events=True),
    "/v1/messages": EngineRoute(
        "/messages", "messages", is_anthropic=True, has_typed_events=True, translates_to=CHAT
    ),
    "/v1/messages/count_tokens": EngineRoute(
        "/messages/count_tokens", "messages", is_anthropic=True
    ),
    "/v1/rerank": EngineRoute("/rerank", "rerank"),
    "/v1/score": EngineRoute("/score", "score"),
    "/tokenize": EngineRoute("/tokenize", "tokenize", at_root=True),
    "/detokenize": EngineRoute("/detokenize", "tokenize", at_root=True),
}
API_NAMES = {
    "responses": "the Responses API (/v1/responses)",
    "stored_responses": "stored responses (GET /v1/responses/{id}, /cancel, previous_response_id)",
    "messages": "Anthropic's Messages API (/v1/messages)",
    "rerank": "/v1/rerank",
    "score": "/v1/score",
    "tokenize": "/tokenize and /detokenize",
}
STORED_PREFIX = "/v1/responses/"
_STORED = EngineRoute(
    "/responses/", "stored_responses", has_typed_events=True, method="GET", has_body=False
)


def check_served(api: str | None, model: str, backend: str) -> None:
    """ApiNotServed unless `backend`, the engine of `model`, serves `api`."""
    if api is not None and api not in ADAPTERS[backend].apis:
        raise ApiNotServed(
            f"model `{model}` runs on {backend}, which does not serve {API_NAMES[api]}"
        )


def stored_route(path: str) -> tuple[EngineRoute, str] | None:
    """`GET /v1/responses/{id}` or `POST /v1/responses/{id}/cancel`: the route and the id."""
    if not path.startswith(STORED_PREFIX):
        return None
    response_id, _, action = path[len(STORED_PREFIX) :].partition("/")
    if not response_id or action not in ("", "cancel"):
        return None
    upstream = f"/responses/{quote(response_id, safe='')}" + ("/cancel" if action else "")
    method = "POST" if action else "GET"
    return replace(_STORED, path=upstream, method=method), response_id


def responses_error_event(message: str) -> bytes:
    """The end of a Responses stream that failed after its first byte: its `error` event."""
    error = {"type": "error", "code": "upstream_error", "message": message, "param": None}
    return f"event: error\ndata: {json.dumps(error)}\n\n".encode()
