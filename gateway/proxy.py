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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
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
    error_body,
    from_upstream,
)
from gateway.limits import Admission
from gateway.metrics import Metrics
from gateway.routing import RoutingPolicy
from gateway.sse import EventRewriter, complete_history, rewrite_json
from gateway.upstream import FAILURES, Upstream, sort_failure

MAX_ATTEMPTS = 3
RETRY_STATUSES = frozenset({502, 503})
PASS_HEADERS = ("content-type", "cache-control")
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclass
class Proxy:
    supervisor: Supervisor
    upstream: Upstream
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

    async def forward(
        self, request: Request, path: str, principal: str
    ) -> "Response | RelayResponse":
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
        call = Call(self.metrics, self.admissions[name], name, principal, raw, body)
        await call.admit()
        call.watch(request.receive)  # the body is read: what comes next can only be goodbye
        try:
            worker, upstream = await self._send(call, request, workers, path)
        except GatewayError as exc:
            call.finish(exc.status)
            raise
        call.worker = worker
        if upstream.status >= 400:
            return await self._error_response(call, upstream)
        if not call.is_stream:
            return await self._whole_response(call, upstream)
        passed = upstream.headers
        headers = [(k.encode(), passed[k].encode()) for k in PASS_HEADERS if k in passed]
        return RelayResponse(self._relay(call, upstream), headers or SSE_HEADERS)

    async def _read_body(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            raise self._too_large()
        # A running count, not request.body(): a chunked body announces no length, and
        # buffering all of it before refusing would let one client fill the gateway's memory.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
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

    def _too_large(self) -> TooLarge:
        return TooLarge(f"request body over {self.max_body_bytes} bytes")

    async def _send(
        self, call: "Call", request: Request, workers: list[Worker], path: str
    ) -> tuple[Worker, aiohttp.ClientResponse]:
        """Send to a ready replica, trying others on failures that happened before any output."""
        tried: set[str] = set()
        model = workers[0].model_name
        policy = self.policies[model]
        body = call.upstream_body()
        key = policy.key_for(body[1], request.headers)
        last_error: GatewayError | None = None
        for attempt in range(MAX_ATTEMPTS):
            worker = policy.choose(workers, key, exclude=tried)
            if worker is None:
                break
            if attempt:
                self.metrics.child(self.metrics.retries, model).inc()
            tried.add(worker.id)
            worker.in_flight += 1
            try:
                upstream = await call.unless_client_leaves(self._open(worker, path, *body))
            except ClientGone:
                worker.in_flight -= 1
                raise
            except FAILURES as exc:
                worker.in_flight -= 1
                error, may_retry = sort_failure(exc, worker.id)
                if not may_retry:
                    raise error from None
                last_error = error
                continue
            if upstream.status in RETRY_STATUSES and len(tried) < len(workers):
                upstream.close()
                worker.in_flight -= 1
                last_error = UpstreamFailed(f"worker {worker.id} answered {upstream.status}")
                continue
            return worker, upstream
        if last_error is None:
            states = ", ".join(f"{w.id} {w.state.value}" for w in workers)
            last_error = NoReadyReplica(f"no ready replica for `{model}`: {states}")
        raise last_error

    async def _open(
        self, worker: Worker, path: str, raw: bytes, body: dict[str, Any]
    ) -> aiohttp.ClientResponse:
        if worker.upstream_model != body["model"]:
            raw = json.dumps({**body, "model": worker.upstream_model}).encode()
        headers = {"content-type": "application/json"}
        if worker.api_key:
            headers["authorization"] = f"Bearer {worker.api_key}"
        return await self.upstream.post(worker.base_url + path, raw, headers)

    async def _error_response(self, call: "Call", upstream: aiohttp.ClientResponse) -> Response:
        try:
            content = await upstream.read()
        except FAILURES:
            content = b""
        finally:
            upstream.close()
        status = upstream.status
        if status in (401, 403):
            # Our per-worker secret was refused: the client's key is fine, the setup is not.
            assert call.worker is not None
            message = f"worker {call.worker.id} refused the gateway's credentials"
            status, content = 502, json.dumps(error_body(message, "upstream_error")).encode()
        call.finish(status)
        return JSONResponse(from_upstream(status, content), status)

    async def _whole_response(self, call: "Call", upstream: aiohttp.ClientResponse) -> Response:
        status = 502
        try:
            content = await upstream.read()
            status = upstream.status
        except FAILURES as exc:
            raise UpstreamFailed(f"worker failed while answering: {type(exc).__name__}") from None
        finally:
            upstream.release()
            call.finish(status)
        content, usage = rewrite_json(content, call.reply_as, call.splits_tags)
        call.add_usage(usage)
        media_type = upstream.headers.get("content-type", "application/json")
        return Response(content, status_code=status, media_type=media_type)

    async def _relay(self, call: "Call", upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        rewriter = EventRewriter(
            call.reply_as, strip_usage=not call.wants_usage, split_tags=call.splits_tags
        )
        status = upstream.status
        call.on_client_gone(upstream.close)  # the engine sees the connection close and aborts
        try:
            async for chunk in upstream.content.iter_any():
                call.saw_chunk()
                out = rewriter.feed(chunk)
                if out:
                    yield out
            yield rewriter.flush()
        except FAILURES as exc:
            if call.client_gone:
                # A client may hang up right after [DONE], before the engine's last bytes: the
                # answer was whole all the same.
                status = 200 if rewriter.is_done else ClientGone.status
            else:
                status = 502
                assert call.worker is not None
                if isinstance(exc, TimeoutError):
                    failure = "sent nothing for longer than the gateway's read_timeout"
                else:
                    failure = f"failed mid-stream: {type(exc).__name__} {exc}".rstrip()
                yield _error_event(f"worker {call.worker.id} {failure}")
        finally:
            upstream.close()  # a no-op after a whole stream; otherwise the engine aborts
            call.add_usage(rewriter.usage)
            call.finish(status)


class Call:
    """One request's bookkeeping: admission slot, replica load, the client's presence, metrics.
    finish() runs once."""

    def __init__(
        self,
        metrics: Metrics,
        admission: Admission,
        model: str,
        principal: str,
        raw: bytes,
        body: dict,
    ) -> None:
        self.metrics = metrics
        self.admission = admission
        self.model = model
        self.principal = principal
        self.raw = raw
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
        self._client_left: asyncio.Future[None] | None = None

    @property
    def splits_tags(self) -> bool:
        """The engine has no reasoning parser for this model: the gateway splits the text."""
        return self.worker is not None and is_split_by_gateway(self.worker.slot.model.reasoning)

    async def admit(self) -> None:
        m = self.metrics
        queued = m.child(m.queued, self.model)
        queued.inc()
        try:
            await self.admission.enter()
        except GatewayError as exc:
            m.child(m.requests, self.model, str(exc.status), self.principal).inc()
            raise
        finally:
            queued.dec()
        self.is_admitted = True
        m.child(m.in_flight, self.model).inc()

    def upstream_body(self) -> tuple[bytes, dict]:
        """The body to send: streams always ask for usage, so tokens can be counted."""
        if self.is_stream and not self.wants_usage:
            options = self.body.get("stream_options")
            options = {**options, "include_usage": True} if isinstance(options, dict) else None
            self.body = {**self.body, "stream_options": options or {"include_usage": True}}
            self.raw = json.dumps(self.body).encode()
        return self.raw, self.body

    def watch(self, receive: Receive) -> None:
        """Notice the client leaving: one task per request, until finish()."""
        self._client_left = asyncio.ensure_future(_disconnected(receive))

    @property
    def client_gone(self) -> bool:
        left = self._client_left
        return left is not None and left.done() and not left.cancelled()

    def on_client_gone(self, callback: Callable[[], object]) -> None:
        assert self._client_left is not None
        self._client_left.add_done_callback(lambda left: left.cancelled() or callback())

    async def unless_client_leaves(self, sending: Awaitable[Any]) -> Any:
        """Await `sending`, but cancel it and raise ClientGone if the client leaves first.

        A non-streaming engine answers only when generation is done, so without this a client
        that hangs up would leave the engine generating for nobody. (Cancelling this task
        instead, asyncio.timeout-style, saves a task but let aiohttp's own timer context take
        the cancellation for a timeout: the engine's connection stayed open.)
        """
        left = self._client_left
        assert left is not None
        send = asyncio.ensure_future(sending)
        await asyncio.wait((send, left), return_when=asyncio.FIRST_COMPLETED)
        if send.done():
            return send.result()
        send.cancel()
        raise ClientGone("client disconnected")

    def saw_chunk(self) -> None:
        now, m = time.perf_counter(), self.metrics
        if self.last_chunk is None:
            m.child(m.ttft, self.model).observe(now - self.started)
        else:
            m.child(m.itl, self.model).observe(now - self.last_chunk)
        self.last_chunk = now

    def add_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        m = self.metrics
        for kind in ("prompt", "completion"):
            tokens = usage.get(f"{kind}_tokens")
            if isinstance(tokens, int) and tokens > 0:
                m.child(m.tokens, self.model, self.principal, kind).inc(tokens)

    def finish(self, status: int) -> None:
        if self.is_finished:
            return
        self.is_finished = True
        if self._client_left is not None:
            self._client_left.cancel()
        if self.worker is not None:
            self.worker.in_flight -= 1
        m = self.metrics
        if self.is_admitted:
            self.admission.leave()
            m.child(m.in_flight, self.model).dec()
        m.child(m.requests, self.model, str(status), self.principal).inc()
        m.child(m.duration, self.model).observe(time.perf_counter() - self.started)


class RelayResponse:
    """An ASGI response that streams `chunks` and always closes them, so the upstream closes at
    once. Not Starlette's StreamingResponse: that one starts a task group per response to
    notice a disconnect, which the Call's watcher does already.
    """

    def __init__(self, chunks: AsyncIterator[bytes], headers: list[tuple[bytes, bytes]]) -> None:
        self.chunks = chunks
        self.raw_headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.chunks.aclose()  # type: ignore[attr-defined]


class ShuttingDown(NoReadyReplica):
    code = "shutting_down"


class ClientGone(GatewayError):
    """The client disconnected while we waited for the engine's first byte (nginx's 499)."""

    status = 499


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _error_event(message: str) -> bytes:
    event = json.dumps(error_body(message, "upstream_error", None, 502))
    return f"data: {event}\n\ndata: [DONE]\n\n".encode()
