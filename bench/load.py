"""The streaming load generator: closed-loop HTTP/1.1 clients on raw asyncio, one JSON line out.

`concurrency` connections each send a request, wait for the whole answer, and send the next,
until `duration` seconds have passed. Figures count only what happened inside the window
[warmup, duration), so ramp-up and the tail of the last answers do not dilute them.

Measured per request: latency (send → last byte) and, for streams, time to first token (send →
the first SSE `data: {` event) and the chunks delivered (events with a `"delta"`/`"text"`).
A Protocol with a hand-written response parser costs a fraction of what httpx or aiohttp do
per chunk, so the generator is not what limits a run (the benchmark checks that against the
direct run anyway). `--hold` opens that many streams and keeps them open for the memory phase.

    python -m bench.load --url http://127.0.0.1:8000/v1/chat/completions --stream \
        --concurrency 64 --duration 8 --key KEY
"""

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

EVENT = b"data: {"
CHUNK_MARKS = (b'"delta"', b'"text"')


@dataclass
class Tally:
    start: float
    window_start: float
    window_end: float
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    completed: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    chunks: int = 0  # delivered inside the window
    first_chunks: int = 0  # streams that have seen their first chunk (for --hold)

    def in_window(self, t: float) -> bool:
        return self.window_start <= t < self.window_end

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])


class Client(asyncio.Protocol):
    """One keep-alive connection that sends the same request again as soon as it is answered."""

    def __init__(self, request: bytes, tally: Tally, is_stream: bool, done: asyncio.Future) -> None:
        self.request = request
        self.tally = tally
        self.is_stream = is_stream
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.should_stop = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == "eof":
            self._finish(ok=True)
        elif not self.done.done():
            if not self.should_stop:
                self.tally.error(f"connection lost: {exc}")
            self.done.set_result(None)

    def _send(self) -> None:
        assert self.transport is not None
        self._state = "head"
        self._buffer = b""
        self._body = b""  # kept only for error answers and a non-streaming status check
        self._status = 0
        self._server_closes = False
        self._remaining = 0
        self._tail = b""
        self._saw_event = False
        self._saw_done = False
        self._sent = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer and self._state != "done":
            if not self._step():
                break
        if self._state == "done":
            self._finish(ok=200 <= self._status < 300)

    def _step(self) -> bool:
        """Consume what can be consumed from the buffer; False when more bytes are needed."""
        if self._state == "head":
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            self._parse_head(self._buffer[:end])
            self._buffer = self._buffer[end + 4 :]
            return True
        if self._state == "length":
            take = self._buffer[: self._remaining]
            self._buffer = self._buffer[len(take) :]
            self._payload(take)
            self._remaining -= len(take)
            if self._remaining == 0:
                self._state = "done"
            return True
        if self._state == "eof":
            self._payload(self._buffer)
            self._buffer = b""
            return False
        # chunked: size line, data, CRLF
        eol = self._buffer.find(b"\r\n")
        if eol < 0:
            return False
        size = int(self._buffer[:eol].split(b";")[0], 16)
        if size == 0:
            if self._buffer.find(b"\r\n\r\n", eol) < 0:
                return False  # the end of the trailers has not arrived yet
            self._buffer = b""
            self._state = "done"
            return True
        if len(self._buffer) < eol + 2 + size + 2:
            return False
        self._payload(self._buffer[eol + 2 : eol + 2 + size])
        self._buffer = self._buffer[eol + 2 + size + 2 :]
        return True

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self._status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        self._server_closes = headers.get(b"connection") == b"close"
        if headers.get(b"transfer-encoding") == b"chunked":
            self._state = "chunked"
        elif b"content-length" in headers:
            self._remaining = int(headers[b"content-length"])
            self._state = "length" if self._remaining else "done"
        else:
            self._state = "eof"

    def _payload(self, data: bytes) -> None:
        if not self.is_stream or self._status != 200:
            self._body += data
            return
        # Count events across read boundaries: keep the last few bytes for the next read.
        seen = self._tail + data
        now = time.perf_counter()
        if not self._saw_event and EVENT in seen:
            self._saw_event = True
            self.tally.first_chunks += 1
            if self.tally.in_window(self._sent):
                self.tally.ttfts.append(now - self._sent)
        if b"[DONE]" in seen:
            self._saw_done = True
        if self.tally.in_window(now):
            # A mark wholly inside the kept tail was counted with the previous read.
            new = sum(seen.count(mark) - self._tail.count(mark) for mark in CHUNK_MARKS)
            self.tally.chunks += new
        self._tail = seen[-8:]

    def _finish(self, ok: bool) -> None:
        now = time.perf_counter()
        tally = self.tally
        if ok and self.is_stream and not self._saw_done:
            ok = False
            self._body = b"stream ended without data: [DONE]"
        if not ok:
            tally.error(f"HTTP {self._status}: {self._body[:200]!r}")
        elif tally.in_window(self._sent):
            tally.latencies.append(now - self._sent)
        if ok and tally.in_window(now):
            tally.completed += 1
        if self.should_stop or now >= tally.window_end or self.transport is None:
            if self.transport is not None:
                self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        if self._state == "eof" or self._server_closes or self.transport.is_closing():
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)  # the loop opens a fresh connection
            return
        self._send()


def build_request(url: str, body: bytes, key: str | None) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = [
        f"POST {parts.path} HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        "accept: */*",
        f"content-length: {len(body)}",
    ]
    if key:
        head.append(f"authorization: Bearer {key}")
    return host, port, ("\r\n".join(head) + "\r\n\r\n").encode() + body


def request_body(model: str, is_stream: bool, max_tokens: int, prompt: str = "Hello!") -> bytes:
    body: dict = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    body["max_tokens"] = max_tokens
    if is_stream:
        body["stream"] = True
    return json.dumps(body).encode()


async def _connection_loop(
    host: str, port: int, request: bytes, tally: Tally, is_stream: bool
) -> None:
    """Keep one client slot busy until the window ends (reconnecting when a server closes)."""
    loop = asyncio.get_running_loop()
    while time.perf_counter() < tally.window_end:
        done: asyncio.Future = loop.create_future()
        try:
            await loop.create_connection(
                lambda d=done: Client(request, tally, is_stream, d), host, port
            )
        except OSError as exc:
            tally.error(f"connect: {exc}")
            await asyncio.sleep(0.05)
            continue
        await done


async def run(args: argparse.Namespace) -> dict:
    body = request_body(args.model, args.stream, args.max_tokens)
    host, port, request = build_request(args.url, body, args.key)
    start = time.perf_counter()
    tally = Tally(start, start + args.warmup, start + args.duration)
    loops = [
        asyncio.create_task(_connection_loop(host, port, request, tally, args.stream))
        for _ in range(args.concurrency)
    ]
    await asyncio.wait(loops, timeout=args.duration + args.grace)
    for task in loops:
        task.cancel()
    window = tally.window_end - tally.window_start
    return summary(tally, window, args)


async def hold(args: argparse.Namespace) -> dict:
    """Open `--hold` streams, report when all are flowing, keep them until stdin closes."""
    body = request_body(args.model, True, args.max_tokens)
    host, port, request = build_request(args.url, body, args.key)
    start = time.perf_counter()
    tally = Tally(start, start, start + 10**9)
    loop = asyncio.get_running_loop()
    clients: list[Client] = []
    for _ in range(args.hold):
        done: asyncio.Future = loop.create_future()
        try:
            _, client = await loop.create_connection(
                lambda d=done: Client(request, tally, True, d), host, port
            )
        except OSError as exc:
            tally.error(f"connect: {exc}")
            continue
        clients.append(client)  # type: ignore[arg-type]
    deadline = time.perf_counter() + args.duration
    while tally.first_chunks < args.hold and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    opened = {"open": tally.first_chunks, "errors": tally.errors, "samples": tally.error_samples}
    print(json.dumps(opened), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # the controller closes stdin when done
    for client in clients:
        client.should_stop = True
        if client.transport is not None:
            client.transport.close()
    return opened


def summary(tally: Tally, window: float, args: argparse.Namespace) -> dict:
    return {
        "concurrency": args.concurrency,
        "stream": args.stream,
        "window_s": round(window, 3),
        "completed": tally.completed,
        "rps": tally.completed / window,
        "errors": tally.errors,
        "error_samples": tally.error_samples,
        "latency": percentiles(tally.latencies),
        "ttft": percentiles(tally.ttfts) if args.stream else None,
        "chunks_per_s": tally.chunks / window if args.stream else None,
    }


def percentiles(samples: list[float]) -> dict[str, float | int] | None:
    """p50/p90/p99 and the mean, in milliseconds."""
    if not samples:
        return None
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    mean = sum(ordered) / len(ordered) * 1000
    return {"n": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": mean}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the full chat/completions URL")
    parser.add_argument("--key", help="Bearer token")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=25)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=8, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=1, help="seconds not counted")
    parser.add_argument("--grace", type=float, default=30, help="seconds for the last answers")
    parser.add_argument("--hold", type=int, default=0, help="open this many streams and wait")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(hold(args) if args.hold else run(args))
    if not args.hold:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
