"""One admitted request, from its admission to the last byte of its response.

A Call is the one owner of what a request holds: its admission slot, the in-flight gauge, a
replica's count of it (`worker.in_flight`, which routing reads) and the engine's response. It is
used as `with call:`, and that block is its one exit: whatever ends the request (the response
sent, an error, a cancellation, a client that stopped reading), finish() gives everything back
exactly once and counts the request under `call.status`.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from starlette.types import Receive

from backends.reasoning import is_split_by_gateway
from backends.supervisor import Worker
from gateway.errors import ClientGone, GatewayError
from gateway.limits import Admission
from gateway.metrics import Metrics
from gateway.request import dumps
from gateway.tenancy import Grant
from gateway.upstream import UpstreamResponse

T = TypeVar("T")


class Call:
    def __init__(
        self,
        metrics: Metrics,
        admission: Admission,
        model: str,
        principal: str,
        raw: bytes,
        body: dict[str, Any],
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
        self.status: int | None = None  # what the request is counted as; unset at exit: 500
        self.worker: Worker | None = None  # the replica that counts this request
        self.upstream: UpstreamResponse | None = None  # that replica's answer
        self.started = time.perf_counter()
        self.last_chunk: float | None = None
        self.is_admitted = False
        self.admitted_as = ""  # the key the admission slot is held for
        self.is_finished = False
        self.grant: Grant | None = None  # the key's share of its limits (tenancy.py)
        self.usage: dict[str, Any] | None = None  # the engine's usage, when it sent one
        self.chunks = 0
        self.ttft: float | None = None
        self.worker_id: str | None = None  # the last replica that took the request
        self._client_left: asyncio.Future[None] | None = None

    @property
    def splits_tags(self) -> bool:
        """The engine has no reasoning parser for this model: the gateway splits the text."""
        return self.worker is not None and is_split_by_gateway(self.worker.slot.model.reasoning)

    async def admit(self, key: str = "", weight: float = 1.0) -> None:
        """Take an admission slot (or wait for one, as `key` with `weight`: fair.py); enter
        `with call:` right after."""
        m = self.metrics
        queued = m.child(m.queued, self.model)
        queued.inc()
        try:
            await self.admission.enter(key, weight)
            self.admitted_as = key
        except GatewayError as exc:
            m.child(m.requests, self.model, str(exc.status), self.principal).inc()
            raise
        finally:
            queued.dec()
        self.is_admitted = True
        m.child(m.in_flight, self.model).inc()

    def __enter__(self) -> "Call":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.status is None:
            self.status = ClientGone.status if kind is asyncio.CancelledError else 500
        self.finish()

    def lease(self, worker: Worker) -> None:
        """Count the request on `worker` from now on, instead of on the replica before it."""
        self.release()
        worker.in_flight += 1
        self.worker = worker
        self.worker_id = worker.id

    def release(self) -> None:
        """Close the engine's response (the engine aborts what is unfinished) and uncount the
        request on its replica."""
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self.worker is not None:
            self.worker.in_flight -= 1
            self.worker = None

    def upstream_body(self) -> tuple[bytes, dict[str, Any]]:
        """The body to send: streams always ask for usage, so tokens can be counted."""
        if self.is_stream and not self.wants_usage:
            options = self.body.get("stream_options") or {}
            self.body = {**self.body, "stream_options": {**options, "include_usage": True}}
            self.raw = dumps(self.body)
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

    async def unless_client_leaves(self, sending: Awaitable[T]) -> T:
        """Await `sending`, but cancel it and raise ClientGone if the client leaves first.

        A non-streaming engine answers only when generation is done, so without this a client
        that hangs up would leave the engine generating for nobody. (Cancelling this task
        instead, asyncio.timeout-style, saves a task but let the HTTP client's own timer
        context take the cancellation for a timeout: the engine's connection stayed open.)
        """
        left = self._client_left
        assert left is not None
        send = asyncio.ensure_future(sending)
        try:
            await asyncio.wait((send, left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not send.done():
                send.cancel()
        if send.done() and not send.cancelled():
            return send.result()
        raise ClientGone("client disconnected")

    def saw_chunk(self) -> None:
        now, m = time.perf_counter(), self.metrics
        self.chunks += 1
        if self.last_chunk is None:
            self.ttft = now - self.started
            m.child(m.ttft, self.model).observe(self.ttft)
        else:
            m.child(m.itl, self.model).observe(now - self.last_chunk)
        self.last_chunk = now

    def add_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self.usage = usage
        m = self.metrics
        for kind in ("prompt", "completion"):
            tokens = usage.get(f"{kind}_tokens")
            if isinstance(tokens, int) and tokens > 0:
                m.child(m.tokens, self.model, self.principal, kind).inc(tokens)

    def finish(self) -> None:
        """Give back everything the request holds and count it; runs once."""
        if self.is_finished:
            return
        self.is_finished = True
        if self._client_left is not None:
            self._client_left.cancel()
        self.release()
        m = self.metrics
        if self.is_admitted:
            self.admission.leave(self.admitted_as)
            m.child(m.in_flight, self.model).dec()
        status = self.status or 500
        duration = time.perf_counter() - self.started
        m.child(m.requests, self.model, str(status), self.principal).inc()
        m.child(m.duration, self.model).observe(duration)
        if self.grant is not None:
            self.grant.finish(status, self.usage, self.chunks, self.worker_id, self.ttft, duration)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
