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

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Send

from backends.supervisor import Supervisor, Worker
from gateway.call import Call
from gateway.errors import (
    BadRequest,
    GatewayError,
    NoReadyReplica,
    ShuttingDown,
    UnknownModel,
    UpstreamError,
    UpstreamFailed,
    error_body,
    from_upstream,
)
from gateway.fair import WEIGHTS
from gateway.keys import KeyRecord
from gateway.limits import Admission
from gateway.metrics import Metrics
from gateway.relay import Relay
from gateway.request import dumps, parse, read_body
from gateway.routing import RoutingPolicy
from gateway.sse import complete_history, rewrite_json
from gateway.tenancy import Grant, Tenancy
from gateway.upstream import Upstream, UpstreamResponse

log = logging.getLogger("enginegate.gateway")

# vLLM serves a lower `priority` first; requests without one count as 0.
ENGINE_PRIORITY = {"high": -1, "normal": 0, "low": 1}
MAX_ATTEMPTS = 3
RETRY_STATUSES = frozenset({502, 503})
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

    @property
    def pending(self) -> int:
        """Requests admitted or waiting, over every model."""
        return sum(a.in_flight + a.queued for a in self.admissions.values())

    async def serve(self, request: Request, send: Send, path: str, key: KeyRecord) -> None:
        """Answer an OpenAI request by POSTing its body to `path` under a replica's /v1.

        Raises GatewayError only before admission, when nothing has been sent; from admission
        on, errors are answered here and every request is counted.
        """
        if self.is_draining:
            raise ShuttingDown("the gateway is shutting down; retry on another instance")
        raw = await read_body(request, self.max_body_bytes)
        body = parse(raw)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("`model` is required: the name of a configured model", "model")
        name = self.aliases.get(model, model)  # an alias is answered as itself (Call.reply_as)
        if not self.supervisor.by_model(name):
            names = {w.model_name for w in self.supervisor.workers} | self.aliases.keys()
            available = ", ".join(sorted(n for n in names if key.allows(n)))
            raise UnknownModel(f"model `{model}` does not exist; available: {available}", "model")
        grant = self._admit_key(key, model, name, body, len(raw))
        if name in self.priority_models:
            body["priority"] = ENGINE_PRIORITY[key.priority]  # the key's, never the client's
        if complete_history(body) or name in self.priority_models:
            raw = dumps(body)
        call = Call(self.metrics, self.admissions[name], name, key.name, raw, body)
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
                response = await self._answer(call, request, path)
            except GatewayError as exc:
                call.status = exc.status
                response = exc.response()
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

    async def _answer(self, call: Call, request: Request, path: str) -> Response | Relay:
        waiting = self.waiter(call.model) if self.waiter is not None else None
        if waiting is not None:
            await call.unless_client_leaves(waiting)
        # Read after admission and any wait: a rolling replacement may have changed them.
        workers = self.supervisor.by_model(call.model)
        upstream = await self._send(call, request, workers, path)
        if upstream.status >= 400:
            return await self._error_response(call, upstream)
        if not call.is_stream:
            return await self._whole_response(call, upstream)
        return Relay(call, upstream, self.send_timeout)

    async def _send(
        self, call: Call, request: Request, workers: list[Worker], path: str
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
                upstream = await call.unless_client_leaves(self._open(worker, path, raw, body))
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
        self, worker: Worker, path: str, raw: bytes, body: dict[str, Any]
    ) -> UpstreamResponse:
        if worker.upstream_model != body["model"]:
            raw = dumps({**body, "model": worker.upstream_model})
        headers = {"content-type": "application/json"}
        if worker.api_key:
            headers["authorization"] = f"Bearer {worker.api_key}"
        url = worker.base_url + path
        return await self.upstream.post(worker.id, url, raw, headers, worker.socket_path)

    async def _error_response(self, call: Call, upstream: UpstreamResponse) -> Response:
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
        return JSONResponse(from_upstream(status, content), status)

    async def _whole_response(self, call: Call, upstream: UpstreamResponse) -> Response:
        content = await upstream.read(MAX_ANSWER_BYTES)
        try:
            content, usage = rewrite_json(content, call.reply_as, call.splits_tags)
        except Exception as exc:  # the body is JSON, but not in a shape the rewriter knows
            log.warning("worker %s: answer not rewritten: %r", upstream.worker_id, exc)
            raise UpstreamFailed(
                f"worker {upstream.worker_id} sent an answer the gateway could not read"
            ) from None
        call.add_usage(usage)
        call.status = upstream.status
        media_type = upstream.headers.get("content-type", "application/json")
        return Response(content, status_code=upstream.status, media_type=media_type)
