"""A stream's way to the client: the engine's chunks, through the EventRewriter, out by ASGI send.

How a stream can end, and what it is counted as:

- the engine ended it: its status (200);
- the engine failed, stayed silent past read_timeout, or sent what the gateway cannot read (an
  event over MAX_EVENT_BYTES, a malformed chunk): an OpenAI-shaped error event and
  `data: [DONE]` end the stream; 502;
- the client hung up: the engine's response is closed, which makes the engine abort; 499, or
  200 when `data: [DONE]` had gone through already;
- the client stopped reading: uvicorn's send waits while the socket's buffers are full, and a
  send that waits longer than `send_timeout` ends the stream and closes the connection; 408
  (security review finding 11).

Not Starlette's StreamingResponse: that one starts a task group per response to notice a
disconnect, which the Call's watcher does already.
"""

import asyncio
import logging
from collections.abc import Callable
from types import TracebackType

from starlette.types import Message, Receive, Scope, Send

from gateway.call import Call
from gateway.errors import ClientGone, UpstreamError
from gateway.sse import EventRewriter, error_event
from gateway.typed_sse import StreamReader
from gateway.upstream import UpstreamResponse

log = logging.getLogger("enginegate.gateway")

PASS_HEADERS = ("content-type", "cache-control")
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
STALLED = 408  # what a stream is counted as when its client stopped reading


class Relay:
    """The ASGI response of a stream; it sets `call.status` and leaves the rest to the Call."""

    def __init__(
        self,
        call: Call,
        upstream: UpstreamResponse,
        send_timeout: float,
        reader: StreamReader | None = None,
        end_with: Callable[[str], bytes] = error_event,
    ) -> None:
        """`reader`: instead of the chat rewriter, for typed events (typed_sse.py) or a
        translation (anthropic_chat.py);
        `end_with`: the error event that ends a stream which failed."""
        self.call = call
        self.upstream = upstream
        self.send_timeout = send_timeout
        self.reader = reader
        self.end_with = end_with
        passed = upstream.headers
        headers = [(k.encode(), passed[k].encode()) for k in PASS_HEADERS if k in passed]
        self.headers = headers or SSE_HEADERS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = self.call
        rewriter: StreamReader = self.reader or EventRewriter(
            call.reply_as, strip_usage=not call.wants_usage, split_tags=call.splits_tags
        )
        call.on_client_gone(self.upstream.close)  # the engine sees the connection close
        try:
            async with TimedSend(send, self.send_timeout) as out:
                await out({"type": "http.response.start", "status": 200, "headers": self.headers})
                call.status = await self._relay(rewriter, out)
                await out({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            # The response stays unfinished, so uvicorn closes the connection (and logs that).
            log.warning(
                "%s: the client read nothing for %g s; stream cut", call.model, self.send_timeout
            )
            call.status = STALLED
        finally:
            call.add_usage(rewriter.usage)

    async def _relay(self, rewriter: StreamReader, out: "TimedSend") -> int:
        """Relay until the stream ends; the status to count it as."""
        call, upstream = self.call, self.upstream
        try:
            async for chunk in upstream.chunks():
                call.saw_chunk()
                data = rewriter.feed(chunk)
                if data:
                    await out({"type": "http.response.body", "body": data, "more_body": True})
                if rewriter.failure is not None:
                    failure = f"worker {upstream.worker_id} {rewriter.failure}"
                    log.warning("%s: %r", failure, rewriter.error)
                    return await self._end_with_error(out, failure)
            rest = rewriter.flush()
            if rest:
                await out({"type": "http.response.body", "body": rest, "more_body": True})
            return upstream.status
        except UpstreamError as exc:
            if call.client_gone:
                # A client may hang up right after [DONE], before the engine's last bytes: the
                # answer was whole all the same.
                return 200 if rewriter.is_done else ClientGone.status
            return await self._end_with_error(out, exc.message)

    async def _end_with_error(self, out: "TimedSend", message: str) -> int:
        body = self.end_with(message)
        await out({"type": "http.response.body", "body": body, "more_body": True})
        return 502


class TimedSend:
    """ASGI send, where a send that waits longer than `seconds` ends the `async with` block with
    TimeoutError (asyncio.timeout's, so a cancellation from outside stays one).

    One timer per response that wakes every `seconds` or so, rather than one per chunk: a send
    that does not wait costs two clock readings.
    """

    def __init__(self, send: Send, seconds: float) -> None:
        self.seconds = seconds
        self._send = send
        self._since: float | None = None  # when the send under way began
        self._deadline = asyncio.timeout(None)
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> "TimedSend":
        await self._deadline.__aenter__()
        self._timer = self._loop.call_later(self.seconds, self._check)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._timer is not None
        self._timer.cancel()
        await self._deadline.__aexit__(kind, exc, traceback)  # TimeoutError if it expired

    async def __call__(self, message: Message) -> None:
        self._since = self._loop.time()
        await self._send(message)
        self._since = None

    def _check(self) -> None:
        since, now = self._since, self._loop.time()
        if since is not None and now - since >= self.seconds:
            self._deadline.reschedule(now)  # cancels the task at its send
            return
        self._timer = self._loop.call_at(
            (now if since is None else since) + self.seconds, self._check
        )
