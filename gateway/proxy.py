"""The hot path: one request to one engine, bytes relayed as they arrive.

    parse body → model → admission → pick a ready replica → send → relay (or normalise error)

A failure before the engine answered (connection refused or reset, 502/503, replica gone) is
tried on another ready replica. Once bytes flow to the client only an in-stream error event is
possible. A client that goes away closes the upstream request, which makes the engine abort.
Streams always ask the engine for usage (for the token metrics); the usage chunk is dropped
again when the client did not ask for it.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from backends.reasoning import is_split_by_gateway
from backends.supervisor import Supervisor, Worker
from gateway.errors import (
    BadRequest,
    GatewayError,
    NoReadyReplica,
    TooLarge,
    UnknownModel,
    UpstreamFailed,
    UpstreamTimeout,
    error_body,
    from_upstream,
)
from gateway.limits import Admission
from gateway.metrics import Metrics
from gateway.routing import RoutingPolicy
from gateway.sse import EventRewriter, complete_history, rewrite_json

MAX_ATTEMPTS = 3
RETRY_STATUSES = frozenset({502, 503})
PASS_HEADERS = ("content-type", "cache-control")


@dataclass
class Proxy:
    supervisor: Supervisor
    client: httpx.AsyncClient
    metrics: Metrics
    admissions: dict[str, Admission]
    policies: dict[str, RoutingPolicy]
    max_body_bytes: int
    is_draining: bool = False  # set on SIGTERM: new requests get 503, in-flight ones finish
    aliases: dict[str, str] = field(default_factory=dict)  # alias → the model it names

    @property
    def pending(self) -> int:
        """Requests admitted or waiting, over every model."""
        return sum(a.in_flight + a.queued for a in self.admissions.values())

    async def forward(self, request: Request, path: str, principal: str) -> Response:
        """POST an OpenAI request body to `path` under a replica's /v1 of the requested model."""
        if self.is_draining:
            raise ShuttingDown("the gateway is shutting down; retry on another instance")
        raw, body = await self._read_body(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("`model` is required: the name of a configured model", "model")
        name = self.aliases.get(model, model)  # an alias is answered as itself (Call.reply_as)
        workers = self.supervisor.by_model(name)
        if not workers:
            names = {w.model_name for w in self.supervisor.workers} | self.aliases.keys()
            available = ", ".join(sorted(names))
            raise UnknownModel(f"model `{model}` does not exist; available: {available}", "model")
        if complete_history(body):
            raw = json.dumps(body).encode()
        call = Call(self.metrics, self.admissions[name], name, principal, body)
        await call.admit()
        try:
            worker, upstream = await self._send(request, workers, path, call.upstream_body(raw))
        except GatewayError as exc:
            call.finish(exc.status)
            raise
        call.worker = worker
        if upstream.status_code >= 400:
            return await self._error_response(call, upstream)
        if not call.is_stream:
            return await self._whole_response(call, upstream)
        headers = {k: upstream.headers[k] for k in PASS_HEADERS if k in upstream.headers}
        return RelayResponse(self._relay(call, upstream), status_code=200, headers=headers)

    async def _read_body(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        too_large = TooLarge(f"request body over {self.max_body_bytes} bytes")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            raise too_large
        # A running count, not request.body(): a chunked body announces no length, and
        # buffering all of it before refusing would let one client fill the gateway's memory.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        except RecursionError:  # `[[[[...` deeper than the interpreter's recursion limit
            raise BadRequest("request body is not valid JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return raw, body

    async def _send(
        self, request: Request, workers: list[Worker], path: str, body: tuple[bytes, dict]
    ) -> tuple[Worker, httpx.Response]:
        """Send to a ready replica, trying others on failures that happened before any output."""
        tried: set[str] = set()
        model = workers[0].model_name
        policy = self.policies[model]
        key = policy.key_for(body[1], request.headers)
        states = ", ".join(f"{w.id} {w.state.value}" for w in workers)
        last_error: GatewayError = NoReadyReplica(f"no ready replica for `{model}`: {states}")
        for attempt in range(MAX_ATTEMPTS):
            worker = policy.choose(workers, key, exclude=tried)
            if worker is None:
                break
            if attempt:
                self.metrics.retries.labels(model).inc()
            tried.add(worker.id)
            worker.in_flight += 1
            try:
                upstream = await _until_disconnect(request, self._open(worker, path, *body))
            except httpx.ConnectTimeout:
                worker.in_flight -= 1  # the request never reached the engine: try another
                last_error = UpstreamTimeout(f"worker {worker.id}: connect timed out")
                continue
            except httpx.TimeoutException:
                worker.in_flight -= 1
                raise UpstreamTimeout(f"worker {worker.id} did not answer in time") from None
            except ClientGone:
                worker.in_flight -= 1
                raise
            except httpx.TransportError as exc:
                worker.in_flight -= 1
                last_error = UpstreamFailed(f"worker {worker.id}: {type(exc).__name__}: {exc}")
                continue
            if upstream.status_code in RETRY_STATUSES and len(tried) < len(workers):
                await upstream.aclose()
                worker.in_flight -= 1
                last_error = UpstreamFailed(f"worker {worker.id} answered {upstream.status_code}")
                continue
            return worker, upstream
        raise last_error

    async def _open(
        self, worker: Worker, path: str, raw: bytes, body: dict[str, Any]
    ) -> httpx.Response:
        if worker.upstream_model != body["model"]:
            raw = json.dumps({**body, "model": worker.upstream_model}).encode()
        headers = {"content-type": "application/json"}
        if worker.api_key:
            headers["authorization"] = f"Bearer {worker.api_key}"
        upstream_request = self.client.build_request(
            "POST", worker.base_url + path, content=raw, headers=headers
        )
        return await self.client.send(upstream_request, stream=True)

    async def _error_response(self, call: "Call", upstream: httpx.Response) -> JSONResponse:
        try:
            content = await upstream.aread()
        finally:
            await upstream.aclose()
        status = upstream.status_code
        if status in (401, 403):
            # Our per-worker secret was refused: the client's key is fine, the setup is not.
            assert call.worker is not None
            message = f"worker {call.worker.id} refused the gateway's credentials"
            status, content = 502, json.dumps(error_body(message, "upstream_error")).encode()
        call.finish(status)
        return JSONResponse(from_upstream(status, content), status)

    async def _whole_response(self, call: "Call", upstream: httpx.Response) -> Response:
        status = 502
        try:
            content = await upstream.aread()
            status = upstream.status_code
        except httpx.HTTPError as exc:
            raise UpstreamFailed(f"worker failed while answering: {type(exc).__name__}") from None
        finally:
            await upstream.aclose()
            call.finish(status)
        call.count_usage(content)
        content = rewrite_json(content, call.reply_as, call.splits_tags)
        media_type = upstream.headers.get("content-type", "application/json")
        return Response(content, status_code=status, media_type=media_type)

    async def _relay(self, call: "Call", upstream: httpx.Response) -> AsyncIterator[bytes]:
        rewriter = EventRewriter(
            call.reply_as, strip_usage=not call.wants_usage, split_tags=call.splits_tags
        )
        status = upstream.status_code
        try:
            async for chunk in upstream.aiter_raw():
                call.saw_chunk()
                out = rewriter.feed(chunk)
                if out:
                    yield out
            yield rewriter.flush()
        except httpx.HTTPError as exc:
            status = 502
            assert call.worker is not None
            yield _error_event(f"worker {call.worker.id} failed mid-stream: {type(exc).__name__}")
        finally:
            await upstream.aclose()
            call.add_usage(rewriter.usage)
            call.finish(status)


class Call:
    """One request's bookkeeping: admission slot, replica load, metrics. finish() runs once."""

    def __init__(
        self, metrics: Metrics, admission: Admission, model: str, principal: str, body: dict
    ) -> None:
        self.metrics = metrics
        self.admission = admission
        self.model = model
        self.principal = principal
        self.body = body
        self.reply_as: str = body["model"]  # responses name the model as the client did
        self.is_stream = body.get("stream") is True
        options = body.get("stream_options")
        self.wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.worker: Worker | None = None
        self.started = time.perf_counter()
        self.last_chunk: float | None = None
        self.is_admitted = False
        self.is_finished = False

    @property
    def splits_tags(self) -> bool:
        """The engine has no reasoning parser for this model: the gateway splits the text."""
        return self.worker is not None and is_split_by_gateway(self.worker.slot.model.reasoning)

    async def admit(self) -> None:
        queued = self.metrics.queued.labels(self.model)
        queued.inc()
        try:
            await self.admission.enter()
        except GatewayError as exc:
            self.metrics.requests.labels(self.model, str(exc.status), self.principal).inc()
            raise
        finally:
            queued.dec()
        self.is_admitted = True
        self.metrics.in_flight.labels(self.model).inc()

    def upstream_body(self, raw: bytes) -> tuple[bytes, dict]:
        """The body to send: streams always ask for usage, so tokens can be counted."""
        if self.is_stream and not self.wants_usage:
            options = self.body.get("stream_options")
            options = {**options, "include_usage": True} if isinstance(options, dict) else None
            self.body = {**self.body, "stream_options": options or {"include_usage": True}}
            raw = json.dumps(self.body).encode()
        return raw, self.body

    def saw_chunk(self) -> None:
        now = time.perf_counter()
        if self.last_chunk is None:
            self.metrics.ttft.labels(self.model).observe(now - self.started)
        else:
            self.metrics.itl.labels(self.model).observe(now - self.last_chunk)
        self.last_chunk = now

    def count_usage(self, content: bytes) -> None:
        try:
            usage = json.loads(content).get("usage")
        except (ValueError, AttributeError):
            return
        self.add_usage(usage)

    def add_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        for kind in ("prompt", "completion"):
            tokens = usage.get(f"{kind}_tokens")
            if isinstance(tokens, int) and tokens > 0:
                self.metrics.tokens.labels(self.model, self.principal, kind).inc(tokens)

    def finish(self, status: int) -> None:
        if self.is_finished:
            return
        self.is_finished = True
        if self.worker is not None:
            self.worker.in_flight -= 1
        if self.is_admitted:
            self.admission.leave()
            self.metrics.in_flight.labels(self.model).dec()
        self.metrics.requests.labels(self.model, str(status), self.principal).inc()
        self.metrics.duration.labels(self.model).observe(time.perf_counter() - self.started)


class RelayResponse(StreamingResponse):
    """A StreamingResponse that always closes its iterator, so the upstream closes at once."""

    def __init__(self, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._iterator = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._iterator.aclose()  # type: ignore[attr-defined]


class ShuttingDown(NoReadyReplica):
    code = "shutting_down"


class ClientGone(GatewayError):
    """The client disconnected while we waited for the engine's first byte (nginx's 499)."""

    status = 499


async def _until_disconnect(request: Request, sending: Awaitable[httpx.Response]) -> httpx.Response:
    """Await `sending`, but give up (and cancel it) if the client disconnects meanwhile.

    A non-streaming engine answers only when generation is done, so without this a client that
    hangs up would leave the engine generating for nobody.
    """
    send = asyncio.ensure_future(sending)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((send, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if send.done():
        return send.result()
    send.cancel()
    raise ClientGone("client disconnected")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_event(message: str) -> bytes:
    event = json.dumps(error_body(message, "upstream_error", None, 502))
    return f"data: {event}\n\ndata: [DONE]\n\n".encode()
