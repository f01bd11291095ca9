"""A scripted OpenAI-compatible upstream: a load and edge-case instrument for proxy tests.

It is never an engine stand-in. It generates nothing, knows no tokenizer and says nothing about
how vLLM, SGLang or LMDeploy behave beyond the error shapes copied below; tests that need an
engine's behaviour belong in tests/e2e with a real engine.

    python -m tests.fakes.upstream --port P [--chunks N] [--interval S] [--fail-status 503]
        [--error-style nested|flat|bare|text] [--fail-first K] [--first-byte-delay S]
        [--drop-after N] [--done-linger S] [--api-key KEY] [--model ID] [--pad BYTES]
        [--malformed choices|index|endless]

- POST /v1/chat/completions and /v1/completions: a fixed JSON answer, or with `"stream": true`
  N SSE events (`max_tokens` from the body when it is 1..1000, else --chunks) one --interval
  apart, a usage-only event when `stream_options.include_usage` asks for it, then
  `data: [DONE]`. Every byte is deterministic, so tests can compare them. A model other than
  --model gets a 404.
- --pad adds that many bytes of text to each streamed token, to fill a client's socket fast.
- --malformed sends, right after the first event and in the same write, what an engine must
  not: `choices` that is not a list, a choice `index` that is a list, or an event that never
  ends (MALFORMED_BYTES without a blank line, then the stream ends).
- GET /v1/models lists --model; GET /health answers 200; neither is affected by the failure
  flags, so a failing upstream still looks ready to the gateway.
- GET /stats: requests, failed, streams started, completed, cancelled (the client hung up
  before the first byte or mid-stream) and dropped (cut by --drop-after), so a test can see
  what the gateway did upstream.
"""

import argparse
import asyncio
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

CREATED = 1_700_000_000  # a fixed timestamp keeps every answer byte-identical across runs
MAX_CHUNKS = 1000  # a larger or non-integer `max_tokens` gets --chunks
MALFORMED_BYTES = 8 * 1024 * 1024  # --malformed endless: one event's bytes, never ended


@dataclass(frozen=True)
class Script:
    """What this upstream does; one per process, from the command line."""

    model: str = "fake-model"
    chunks: int = 5
    interval: float = 0.05
    fail_status: int = 0  # 0: answer normally
    fail_first: int = 0  # with fail_status: fail only the first K requests (0: all of them)
    error_style: str = "nested"
    first_byte_delay: float = 0.0
    drop_after: int = 0  # 0: never; N: cut the connection after N events
    done_linger: float = 0.0  # seconds between `data: [DONE]` and the end of the response
    api_key: str | None = None
    pad: int = 0  # bytes added to each streamed token's text
    malformed: str = ""  # "", "choices", "index" or "endless"


@dataclass
class Stats:
    requests: int = 0
    failed: int = 0
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    dropped: int = 0


class EventStream:
    """SSE events one interval apart; notices a client that hangs up between two events.

    Uvicorn drops writes to a closed connection silently (ASGI spec 2.3), so the stream watches
    `receive()` for `http.disconnect` instead of waiting for `send()` to fail. A plain ASGI
    callable, not a Starlette Response, which would announce `content-length: 0`.
    """

    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

    def __init__(self, events: list[bytes], upstream: "Upstream", done: bool = True) -> None:
        self.events = [*events, b"data: [DONE]\n\n"] if done else events
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats, script = self.upstream.stats, self.upstream.script
        stats.started += 1
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            for index, event in enumerate(self.events):
                if index:
                    await asyncio.wait([gone], timeout=script.interval)
                if gone.done():
                    stats.cancelled += 1
                    return
                if script.drop_after and index == script.drop_after:
                    stats.dropped += 1
                    # An exception after the response started makes uvicorn close the socket
                    # without the final empty chunk: the client sees a truncated body.
                    raise ConnectionAbortedError("--drop-after: cutting the connection")
                await send({"type": "http.response.body", "body": event, "more_body": True})
            if script.done_linger:
                await asyncio.wait([gone], timeout=script.done_linger)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            stats.completed += 1
        finally:
            gone.cancel()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass
class Upstream:
    script: Script
    stats: Stats = field(default_factory=Stats)

    async def chat(self, request: Request) -> Response | EventStream:
        return await self._answer(request, chat=True)

    async def completions(self, request: Request) -> Response | EventStream:
        return await self._answer(request, chat=False)

    async def _answer(self, request: Request, chat: bool) -> Response | EventStream:
        self.stats.requests += 1
        refusal = self._refusal(request)
        if refusal is not None:
            self.stats.failed += 1
            return refusal
        body = json.loads(await request.body())
        if body.get("model") != self.script.model:
            self.stats.failed += 1
            message = f"The model `{body.get('model')}` does not exist."
            error = {"message": message, "type": "NotFoundError", "param": "model", "code": 404}
            return JSONResponse({"error": error}, 404)
        count = body.get("max_tokens")
        if type(count) is not int or not 0 < count <= MAX_CHUNKS:
            count = self.script.chunks  # a fuzzed body must not break the instrument
        if self.script.first_byte_delay:
            gone = asyncio.ensure_future(_disconnect(request.receive))
            await asyncio.wait([gone], timeout=self.script.first_byte_delay)
            is_gone = gone.done()
            gone.cancel()
            if is_gone:
                self.stats.cancelled += 1  # the client gave up before the first byte
                return Response(status_code=499)
        if body.get("stream") is True:
            model, pad = self.script.model, self.script.pad
            events = [_event(model, i, count, chat, pad) for i in range(count)]
            options = body.get("stream_options")
            options = options if isinstance(options, dict) else {}
            if options.get("include_usage") is True:
                events.append(_usage_event(self.script.model, count, chat))
            if self.script.malformed:
                bad = MALFORMED[self.script.malformed]
                return EventStream([events[0] + bad], self, done=bad.endswith(b"\n\n"))
            return EventStream(events, self)
        return JSONResponse(_completion(self.script.model, count, chat))

    def _refusal(self, request: Request) -> Response | None:
        if self.script.api_key is not None:
            if request.headers.get("authorization") != f"Bearer {self.script.api_key}":
                return JSONResponse({"error": "Unauthorized"}, 401)  # vLLM's bare 401
        s = self.script
        if s.fail_status and (not s.fail_first or self.stats.requests <= s.fail_first):
            return error_response(s.fail_status, s.error_style)
        return None

    async def models(self, request: Request) -> Response:
        model = {"id": self.script.model, "object": "model", "created": CREATED, "owned_by": "fake"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def show_stats(self, request: Request) -> Response:
        return JSONResponse(asdict(self.stats))


def error_response(status: int, style: str) -> Response:
    """An error in the shape one engine family sends it."""
    message = f"scripted failure {status}"
    if style == "text":
        return PlainTextResponse(message, status)
    if style == "bare":
        return JSONResponse({"error": message}, status)
    if style == "flat":  # SGLang, LMDeploy, older vLLM
        flat = {"object": "error", "message": message, "type": "ScriptedError", "param": None}
        return JSONResponse({**flat, "code": status}, status)
    nested = {"message": message, "type": "ScriptedError", "param": None, "code": status}
    return JSONResponse({"error": nested}, status)  # vLLM >= 0.9


def _head(chat: bool, is_chunk: bool) -> dict[str, Any]:
    if not chat:
        return {"id": "cmpl-fake", "object": "text_completion", "created": CREATED}
    kind = "chat.completion.chunk" if is_chunk else "chat.completion"
    return {"id": "chatcmpl-fake", "object": kind, "created": CREATED}


def _usage(count: int) -> dict[str, int]:
    return {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1}


def _event(model: str, index: int, count: int, chat: bool, pad: int = 0) -> bytes:
    text = f"tok{index} " + "x" * pad
    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    choice["finish_reason"] = "length" if index == count - 1 else None
    chunk = {**_head(chat, is_chunk=True), "model": model, "choices": [choice]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


MALFORMED = {
    "choices": b'data: {"id":"bad","model":"other","choices":5}\n\n',
    "index": b'data: {"id":"bad","choices":[{"index":[1],"delta":{"content":"a"}}]}\n\n',
    "endless": b"data: " + b"x" * MALFORMED_BYTES,
}


def _usage_event(model: str, count: int, chat: bool) -> bytes:
    """The last chunk OpenAI's API sends with `stream_options.include_usage`: no choices."""
    chunk = {**_head(chat, is_chunk=True), "model": model, "choices": [], "usage": _usage(count)}
    return f"data: {json.dumps(chunk)}\n\n".encode()


def _completion(model: str, count: int, chat: bool) -> dict[str, Any]:
    text = "".join(f"tok{i} " for i in range(count))
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message} if chat else {"index": 0, "text": text}
    choice["finish_reason"] = "length"
    head = _head(chat, is_chunk=False)
    return {**head, "model": model, "choices": [choice], "usage": _usage(count)}


def create_app(script: Script) -> Starlette:
    upstream = Upstream(script)
    return Starlette(
        routes=[
            Route("/v1/chat/completions", upstream.chat, methods=["POST"]),
            Route("/v1/completions", upstream.completions, methods=["POST"]),
            Route("/v1/models", upstream.models),
            Route("/health", upstream.health),
            Route("/stats", upstream.show_stats),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=Script.model)
    parser.add_argument("--chunks", type=int, default=Script.chunks)
    parser.add_argument("--interval", type=float, default=Script.interval)
    parser.add_argument("--fail-status", type=int, default=0)
    parser.add_argument("--fail-first", type=int, default=0)
    styles = ["nested", "flat", "bare", "text"]
    parser.add_argument("--error-style", choices=styles, default="nested")
    parser.add_argument("--first-byte-delay", type=float, default=0.0)
    parser.add_argument("--drop-after", type=int, default=0)
    parser.add_argument("--done-linger", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--pad", type=int, default=0)
    parser.add_argument("--malformed", choices=sorted(MALFORMED), default="")
    args = vars(parser.parse_args())
    port = args.pop("port")
    app = create_app(Script(**args))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
