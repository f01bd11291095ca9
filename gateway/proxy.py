"""The hot path: one request to one engine, bytes relayed as they arrive.

    parse body → model → admission → pick a ready replica → send → relay (or normalise error)

A failure before the engine answered (connection refused or reset, 502/503, replica gone) is
tried on another ready replica. Once bytes flow to the client only an in-stream error event is
possible (relay.py). A client that goes away closes the upstream request, which makes the engine
abort. Streams always ask the engine for usage (for the token metrics); the usage chunk is
dropped again when the client did not ask for it.

From admission on, the request belongs to its Call (call.py), and `with call:` in serve() is
its one exit.
"""

import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from backends.supervisor import Supervisor, Worker
from gateway import anthropic_chat
from gateway.call import Call
from gateway.engine_api import EngineRoute, check_served
from gateway.errors import (
    BadRequest,
    GatewayError,
    NoReadyReplica,
    ShuttingDown,
    UnknownModel,
    UpstreamError,
    UpstreamFailed,
    error_body,
)
from gateway.fair import WEIGHTS
from gateway.keys import KeyRecord
from gateway.limits import Admission
from gateway.metrics import Metrics
from gateway.pins import ResponsePins
from gateway.relay import Relay
from gateway.request import dumps, parse, read_body
from gateway.routing import RoutingPolicy
from gateway.sse import complete_history, rewrite_json
from gateway.tenancy import Grant, Tenancy
from gateway.typed_sse import StreamReader, TypedEventReader, chat_usage
from gateway.upstream import Upstream, UpstreamResponse

log = logging.getLogger("enginegate.gateway")

# vLLM serves a lower `priority` first; requests without one count as 0.
ENGINE_PRIORITY = {"high": -1, "normal": 0, "low": 1}
MAX_ATTEMPTS = 3
RETRY_STATUSES = frozenset({502, 503})
LACKS_ROUTE = frozenset({404, 405})  # an engine without a route (translates_to applies)
MAX_ANSWER_BYTES = 64 * 1024 * 1024  # a whole (non-stream) answer; larger ones are a 502
MAX_ERROR_BYTES = 64 * 1024  # an engine's error body; a larger one is replaced by its status


@dataclass
class Proxy:
    supervisor: Supervisor
    upstream: Upstream
    metrics: Metrics
    admissions: dict[str, Admission]
    policies: dict[str, RoutingPolicy]
    max_body_bytes: int
    send_timeout: float = 60  # seconds one send to a client that does not read may wait
    is_draining: bool = False  # set on SIGTERM: new requests get 503, in-flight ones finish
    aliases: dict[str, str] = field(default_factory=dict)  # alias → the model it names
    tenancy: Tenancy | None = None  # per-key allow-lists, limits and usage; None: none
    is_fair: bool = True  # a saturated model's line: weighted fair across keys, or FIFO
    # Models whose engine schedules by the request's `priority` (vLLM's
    # --scheduling-policy priority): it is set from the key's priority class.
    priority_models: frozenset[str] = frozenset()
    # What to await before routing to a model that runs on demand (None: nothing).
    waiter: Callable[[str], Coroutine[Any, Any, None] | None] | None = None
    pins: ResponsePins = field(default_factory=ResponsePins)  # stored response → its replica

    @property
    def pending(self) -> int:
        """Requests admitted or waiting, over every model."""
        return sum(a.in_flight + a.queued for a in self.admissions.values())

    async def serve(
        self,
        request: Request,
        send: Send,
        route: EngineRoute,
        key: KeyRecord,
        response_id: str | None = None,
    ) -> None:
        """Answer a request on `route` at a replica of the body's model, or, for a stored
        response's routes (`response_id`), at the replica that stored it.

        Raises GatewayError only before admission, when nothing has been sent; from admission
        on, errors are answered here and every request is counted.
        """
        if self.is_draining:
            raise ShuttingDown("the gateway is shutting down; retry on another instance")
        if response_id is None:
            raw = await read_body(request, self.max_body_bytes)
            body = parse(raw)
            name, pinned = self._replicas(route, body, key)
        else:
            worker = self.pins.replica(response_id, self.supervisor)
            check_served(route.api, worker.model_name, worker.slot.model.backend)
            is_stream = request.query_params.get("stream") == "true"
            raw, body = b"", {"model": worker.model_name, "stream": is_stream}
            name, pinned = worker.model_name, [worker]
        grant = self._admit_key(key, body["model"], name, body, len(raw))
        is_prioritised = route.api is None and name in self.priority_models
        if is_prioritised:
            body["priority"] = ENGINE_PRIORITY[key.priority]  # the key's, never the client's
        if route.api is None and complete_history(body) or is_prioritised:
            raw = dumps(body)
        call = Call(self.metrics, self.admissions[name], name, key.name, raw, body)
        # Typed streams carry usage in their own events: nothing to ask for, nothing to drop.
        call.wants_usage = call.wants_usage or route.has_typed_events
        try:
            if self.is_fair:
                await call.admit(key.name, WEIGHTS[key.priority])
            else:
                await call.admit()
        except GatewayError:
            if grant is not None:
                grant.cancel()
            raise
        call.grant = grant
        with call:
            call.watch(request.receive)  # the body is read: what comes next can only be goodbye
            try:
                response = await self._answer(call, request, pinned, route)
            except GatewayError as exc:
                call.status = exc.status
                response = route.error_response(exc)
            await response(request.scope, request.receive, send)

    def _admit_key(
        self, key: KeyRecord, asked: str, name: str, body: dict[str, Any], size: int
    ) -> Grant | None:
        """The key's allow-list and limits (tenancy.py); refusals are counted here."""
        if self.tenancy is None:
            return None
        try:
            return self.tenancy.admit(key, asked, name, body, size)
        except GatewayError as exc:
            self.metrics.child(self.metrics.requests, name, str(exc.status), key.name).inc()
            raise

    def _replicas(
        self, route: EngineRoute, body: dict[str, Any], key: KeyRecord
    ) -> tuple[str, list[Worker] | None]:
        """The model the body names, and the one replica that must answer it (a stored
        response's), or None: any of the model's."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("`model` is required: the name of a configured model", "model")
        name = self.aliases.get(model, model)  # an alias is answered as itself (Call.reply_as)
        workers = self.supervisor.by_model(name)
        if not workers:
            names = {w.model_name for w in self.supervisor.workers} | self.aliases.keys()
            available = ", ".join(sorted(n for n in names if key.allows(n)))
            raise UnknownModel(f"model `{model}` does not exist; available: {available}", "model")
        backend = workers[0].slot.model.backend
        check_served(route.api, name, backend)
        previous = body.get("previous_response_id") if route.api == "responses" else None
        if previous is None:
            return name, None
        if not isinstance(previous, str):
            raise BadRequest("`previous_response_id` must be a string", "previous_response_id")
        check_served("stored_responses", name, backend)
        worker = self.pins.replica(previous, self.supervisor)
        if worker.model_name != name:
            message = f"response `{previous}` was made by `{worker.model_name}`, not `{model}`"
            raise BadRequest(message, "previous_response_id")
        return name, [worker]

    async def _answer(
        self, call: Call, request: Request, pinned: list[Worker] | None, route: EngineRoute
    ) -> Response | Relay:
        waiting = self.waiter(call.model) if self.waiter is not None else None
        if waiting is not None:
            await call.unless_client_leaves(waiting)
        # Read after admission and any wait: a rolling replacement may have changed them.
        workers = pinned if pinned is not None else self.supervisor.by_model(call.model)
        upstream = await self._send(call, request, workers, route)
        is_translated = route.translates_to is not None and upstream.status in LACKS_ROUTE
        if is_translated:
            upstream = await self._translated(call, request, route)
        if upstream.status >= 400:
            return await self._error_response(call, upstream, route)
        if not call.is_stream:
            answer = await self._whole_response(call, upstream, route)
            if is_translated:
                return anthropic_chat.message_response(answer, call.reply_as)
            return answer
        reader = self._reader(call, route, is_translated)
        return Relay(call, upstream, self.send_timeout, reader, route.error_event)

    def _reader(self, call: Call, route: EngineRoute, is_translated: bool) -> StreamReader | None:
        """What a stream goes through; None: the chat rewriter (sse.py)."""
        if is_translated:
            return anthropic_chat.MessagesStream(call.reply_as)
        if not route.has_typed_events:
            return None
        pin = None
        if route.api == "responses" and call.worker is not None:
            pin = partial(self.pins.remember, worker=call.worker)  # a stored response's replica
        return TypedEventReader(pin, counts_usage=route.has_body)

    async def _translated(
        self, call: Call, request: Request, route: EngineRoute
    ) -> UpstreamResponse:
        """The engine lacks `route` (an external server that speaks only chat): ask the same
        replica's chat completions, translated (anthropic_chat.py)."""
        assert call.worker is not None and route.translates_to is not None
        log.info("worker %s has no %s: translated to chat", call.worker.id, route.path)
        call.body = anthropic_chat.chat_request(call.body)
        call.raw = dumps(call.body)
        return await self._send(call, request, [call.worker], route.translates_to)

    async def _send(
        self, call: Call, request: Request, workers: list[Worker], route: EngineRoute
    ) -> UpstreamResponse:
        """Send to a ready replica, trying others on failures that happened before any output."""
        tried: set[str] = set()
        policy = self.policies[call.model]
        raw, body = call.upstream_body()
        key = policy.key_for(body, request.headers)
        last_error: GatewayError | None = None
        for attempt in range(MAX_ATTEMPTS):
            worker = policy.choose(workers, key, exclude=tried)
            if worker is None:
                break
            if attempt:
                self.metrics.child(self.metrics.retries, call.model).inc()
            tried.add(worker.id)
            call.lease(worker)
            try:
                opening = self._open(worker, route, request, raw, body)
                upstream = await call.unless_client_leaves(opening)
            except UpstreamError as exc:
                if not exc.may_retry:
                    raise
                last_error = exc
                continue
            call.upstream = upstream
            if upstream.status in RETRY_STATUSES and len(tried) < len(workers):
                last_error = UpstreamFailed(f"worker {worker.id} answered {upstream.status}")
                continue
            return upstream
        if last_error is None:
            states = ", ".join(f"{w.id} {w.state.value}" for w in workers)
            last_error = NoReadyReplica(f"no ready replica for `{call.model}`: {states}")
        raise last_error

    async def _open(
        self,
        worker: Worker,
        route: EngineRoute,
        request: Request,
        raw: bytes,
        body: dict[str, Any],
    ) -> UpstreamResponse:
        headers = route.forwarded(request.headers)
        if route.has_body:
            headers["content-type"] = "application/json"
            if worker.upstream_model != body["model"]:
                raw = dumps({**body, "model": worker.upstream_model})
        if worker.api_key:
            headers["authorization"] = f"Bearer {worker.api_key}"
        url = route.url(worker.base_url, "" if route.has_body else request.url.query)
        return await self.upstream.post(
            worker.id, url, raw, headers, worker.socket_path, method=route.method
        )

    async def _error_response(
        self, call: Call, upstream: UpstreamResponse, route: EngineRoute
    ) -> Response:
        try:
            content = await upstream.read(MAX_ERROR_BYTES)
        except UpstreamError:
            content = b""
        status = upstream.status
        if status in (401, 403):
            # Our per-worker secret was refused: the client's key is fine, the setup is not.
            message = f"worker {upstream.worker_id} refused the gateway's credentials"
            status, content = 502, dumps(error_body(message, "upstream_error"))
        call.status = status
        return route.upstream_error(status, content)

    async def _whole_response(
        self, call: Call, upstream: UpstreamResponse, route: EngineRoute
    ) -> Response:
        content = await upstream.read(MAX_ANSWER_BYTES)
        try:
            content, usage = rewrite_json(content, call.reply_as, call.splits_tags)
        except Exception as exc:  # the body is JSON, but not in a shape the rewriter knows
            log.warning("worker %s: answer not rewritten: %r", upstream.worker_id, exc)
            raise UpstreamFailed(
                f"worker {upstream.worker_id} sent an answer the gateway could not read"
            ) from None
        if route.has_body:  # not a stored response fetched again: its tokens were counted
            call.add_usage(chat_usage(usage))
        if route.api == "responses" and call.worker is not None:
            response_id = _response_id(content)
            if response_id is not None:
                self.pins.remember(response_id, call.worker)
        call.status = upstream.status
        media_type = upstream.headers.get("content-type", "application/json")
        return Response(content, status_code=upstream.status, media_type=media_type)


def _response_id(content: bytes) -> str | None:
    try:
        obj = json.loads(content)
    except ValueError:
        return None
    response_id = obj.get("id") if isinstance(obj, dict) else None
    return response_id if isinstance(response_id, str) else None
