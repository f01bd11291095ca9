"""A fast OpenAI-compatible upstream on loopback for the overhead benchmark.

This is a load instrument, not an engine stand-in: it generates nothing, it answers at once.
It must be much faster than any contender, so it is one asyncio Protocol on uvloop that parses
HTTP/1.1 by hand (keep-alive, Content-Length or chunked request bodies) and writes prebuilt
bytes. Nothing that claims an engine works may be tested against it.

    POST /v1/chat/completions, /v1/completions
        non-streaming: the whole answer at once (`chunks` tokens of usage)
        "stream": true: the first chunk at once, then one chunk per tick (every `interval_ms`,
        one shared ticker for all streams, as an engine's decode step emits a token for every
        running sequence), a finish chunk, the usage chunk when stream_options.include_usage,
        then `data: [DONE]`
    GET  /v1/models, /health            what readiness probes of the contenders ask for
    POST /bench/config {"chunks", "interval_ms"}   change the pace between benchmark phases
    GET  /bench/stats                   streams open, requests served

The chunk count is the server's setting, not the request's `max_tokens` (routers rename or add
that field), so every contender sees the same stream.
"""

import argparse
import asyncio
import contextlib
import json
import time
from typing import Any

READ_LIMIT = 64 * 1024 * 1024  # a request head or body beyond this closes the connection


class Pace:
    """What a stream looks like; shared by every connection, changed through /bench/config."""

    def __init__(self, chunks: int, interval_ms: float, model: str) -> None:
        self.chunks = chunks
        self.interval = interval_ms / 1000
        self.model = model
        self.requests = 0


class Ticker:
    """One timer for every open stream: each tick sends the next chunk of every stream."""

    def __init__(self, pace: Pace) -> None:
        self.pace = pace
        self.streams: set[Stream] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, stream: "Stream") -> None:
        self.streams.add(stream)
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_at(loop.time() + self.pace.interval, self._tick)

    def _tick(self) -> None:
        for stream in list(self.streams):
            if not stream.send_next():
                self.streams.discard(stream)
        if self.streams:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_at(loop.time() + self.pace.interval, self._tick)
        else:
            self._handle = None


class Stream:
    """One streamed answer on one connection."""

    def __init__(self, conn: "Connection", body: dict[str, Any], chat: bool) -> None:
        self.conn = conn
        self.left = conn.pace.chunks
        self.chat = chat
        self.model = body.get("model") or conn.pace.model
        options = body.get("stream_options")
        self.wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.created = int(time.time())
        token = {"delta": {"content": "tok"}} if chat else {"text": "tok"}
        first = {"delta": {"role": "assistant", "content": "tok"}} if chat else token
        self._first = _chunk(self._event(first, None))
        self._token = _chunk(self._event(token, None))

    def _event(self, choice: dict[str, Any], finish: str | None) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        obj = {
            "id": "cmpl-bench",
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + _dumps(obj) + b"\n\n"

    def start(self) -> bool:
        """Headers and the first chunk; False when the stream is already complete."""
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        head += b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        self.conn.write(head + self._first)
        self.left -= 1
        return self.send_next() if self.left <= 0 else True

    def send_next(self) -> bool:
        """The next chunk, or the end of the stream; False once the stream is over."""
        if self.conn.is_closed:
            return False
        if self.left > 0:
            self.left -= 1
            self.conn.write(self._token)
            return True
        empty = {"delta": {}} if self.chat else {"text": ""}
        tail = _chunk(self._event(empty, "length"))
        if self.wants_usage:
            usage = _usage(self.conn.pace.chunks)
            obj = {"id": "cmpl-bench", "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model, "choices": [], "usage": usage}  # fmt: skip
            tail += _chunk(b"data: " + _dumps(obj) + b"\n\n")
        tail += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self.conn.write(tail)
        self.conn.finish_response()
        return False


class Connection(asyncio.Protocol):
    """One HTTP/1.1 client connection; requests are answered one at a time, in order."""

    def __init__(self, pace: Pace, ticker: Ticker) -> None:
        self.pace = pace
        self.ticker = ticker
        self.transport: asyncio.Transport | None = None
        self.is_closed = False
        self._buffer = b""
        self._busy = False  # a stream is being written; later requests wait in the buffer
        self._keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > READ_LIMIT:
            self._close()
            return
        while not self._busy and not self.is_closed:
            request = _parse_request(self._buffer)
            if request is None:
                return
            consumed, method, path, headers, body = request
            self._buffer = self._buffer[consumed:]
            self._keep_alive = headers.get(b"connection", b"").lower() != b"close"
            self.pace.requests += 1
            self._handle(method, path, body)

    def write(self, data: bytes) -> None:
        if not self.is_closed and self.transport is not None:
            self.transport.write(data)

    def finish_response(self) -> None:
        self._busy = False
        if not self._keep_alive:
            self._close()
        elif self._buffer:
            self.data_received(b"")

    def _close(self) -> None:
        self.is_closed = True
        if self.transport is not None:
            self.transport.close()

    def _handle(self, method: bytes, path: bytes, raw: bytes) -> None:
        path = path.split(b"?", 1)[0]
        if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            try:
                body = json.loads(raw)
            except ValueError:
                return self._json(400, {"error": {"message": "bad JSON", "type": "bad_request"}})
            self._complete(body, chat=path.endswith(b"chat/completions"))
        elif method == b"GET" and path in (b"/v1/models", b"/models"):
            model = {"id": self.pace.model, "object": "model", "owned_by": "bench"}
            self._json(200, {"object": "list", "data": [model]})
        elif method == b"GET" and path in (b"/health", b"/health_generate", b"/ping"):
            self._json(200, {"status": "ok"})
        elif method == b"POST" and path == b"/bench/config":
            config = json.loads(raw or b"{}")
            self.pace.chunks = int(config.get("chunks", self.pace.chunks))
            self.pace.interval = float(config.get("interval_ms", self.pace.interval * 1000)) / 1000
            self._json(200, {"chunks": self.pace.chunks, "interval_ms": self.pace.interval * 1000})
        elif method == b"GET" and path == b"/bench/stats":
            stats = {"streams": len(self.ticker.streams), "requests": self.pace.requests}
            self._json(200, stats)
        else:
            self._json(404, {"error": {"message": "not found", "type": "not_found"}})

    def _complete(self, body: dict[str, Any], chat: bool) -> None:
        if body.get("stream") is True:
            stream = Stream(self, body, chat)
            self._busy = True
            if stream.start():
                self.ticker.add(stream)
            return
        text = "tok" * self.pace.chunks
        choice: dict[str, Any] = (
            {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        )
        obj = {
            "id": "cmpl-bench",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model") or self.pace.model,
            "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": "length"}],
            "usage": _usage(self.pace.chunks),
        }
        self._json(200, obj)

    def _json(self, status: int, obj: dict[str, Any]) -> None:
        payload = _dumps(obj)
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"X")
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        self.write(head % (status, reason, len(payload)) + payload)
        if not self._keep_alive:
            self._close()


def _parse_request(buffer: bytes) -> tuple[int, bytes, bytes, dict[bytes, bytes], bytes] | None:
    """(bytes consumed, method, path, headers, body) of the first whole request, or None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buffer[:end].split(b"\r\n")
    method, path, _ = lines[0].split(b" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    start = end + 4
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        return _dechunk(buffer, start, method, path, headers)
    length = int(headers.get(b"content-length", b"0"))
    if len(buffer) < start + length:
        return None
    return start + length, method, path, headers, buffer[start : start + length]


def _dechunk(
    buffer: bytes, pos: int, method: bytes, path: bytes, headers: dict[bytes, bytes]
) -> tuple[int, bytes, bytes, dict[bytes, bytes], bytes] | None:
    parts = []
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buffer[pos:eol].split(b";")[0], 16)
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", eol)
            if buffer[eol : eol + 4] == b"\r\n\r\n":
                return eol + 4, method, path, headers, b"".join(parts)
            if trailer_end < 0:
                return None
            return trailer_end + 4, method, path, headers, b"".join(parts)
        if len(buffer) < eol + 2 + size + 2:
            return None
        parts.append(buffer[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": 16, "completion_tokens": tokens, "total_tokens": 16 + tokens}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


async def serve(host: str, port: int, pace: Pace) -> None:
    loop = asyncio.get_running_loop()
    ticker = Ticker(pace)
    server = await loop.create_server(
        lambda: Connection(pace, ticker), host, port, backlog=4096, reuse_address=True
    )
    print(f"bench upstream on http://{host}:{port}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--chunks", type=int, default=25, help="tokens per answer")
    parser.add_argument("--interval-ms", type=float, default=20, help="time between chunks")
    parser.add_argument("--model", default="tiny", help="the name /v1/models lists")
    args = parser.parse_args(argv)
    pace = Pace(args.chunks, args.interval_ms, args.model)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port, pace))


if __name__ == "__main__":
    main()
