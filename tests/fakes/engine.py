"""A scripted stand-in for an engine process, for supervision tests: never an engine.

    python tests/fakes/engine.py --uds PATH --served-model-name NAME [other vLLM flags, ignored]
    python tests/fakes/engine.py --port N --api-key KEY --served-model-name NAME [SGLang's]

It serves GET /health, /ready, /metrics and /v1/models on the Unix socket PATH (as vLLM does,
given --uds) or on 127.0.0.1:N (as SGLang does; --host HOST for another address); /v1/* needs
`Authorization: Bearer KEY` when $VLLM_API_KEY or --api-key sets one. Switches, from its
environment (a model's `env:` sets them):

    FAKE_ENGINE_BIND_DELAY=S      sleep S seconds before binding (an engine loading a model)
    FAKE_ENGINE_MODELS=JSON       answer /v1/models with this body instead of the served name
    FAKE_ENGINE_ENV_DUMP=PATH     write its environment to PATH (JSON) before binding
    FAKE_ENGINE_FAIL_UNLESS=PATH  exit 3 at once unless PATH exists (a crash loop until fixed)
    FAKE_ENGINE_HEALTH=STATUS     answer /health and /ready with STATUS (503: still starting;
                                  401: SGLang 0.5.17's answer to /ready behind its key)
    FAKE_ENGINE_REPLY_DELAY=S     wait S seconds before answering POST /v1/chat/completions
                                  or /v1/completions (a canned, non-streamed answer that names
                                  this process's pid in `system_fingerprint`)

The engine APIs besides chat (gateway/engine_api.py), scripted in vLLM 0.32's shapes and
places, so the gateway's routing of them can be tested without an engine (e2e tests run them
against a real vLLM): POST /v1/responses (stored in this process; ids name its pid; streams of
typed events), GET /v1/responses/ID and POST /v1/responses/ID/cancel (404 for another
process's ids), POST /v1/messages (its text echoes the anthropic-version and anthropic-beta
headers; `max_tokens` missing is Anthropic's 400) and /v1/messages/count_tokens, /v1/rerank,
/v1/score, and /tokenize and /detokenize at the root (as vLLM: not under /v1).

With `--headless` (vLLM's follower rank of a multi-node engine) it serves nothing and waits
to be ended.

Only the standard library, so it starts in a few tens of milliseconds.
"""

import argparse
import itertools
import json
import os
import socketserver
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STORED: dict[str, dict[str, Any]] = {}  # this process's responses, by id
NEXT_ID = itertools.count(1)
USAGE = {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}


def make_response(body: dict[str, Any]) -> dict[str, Any]:
    response_id = f"resp_{os.getpid()}_{next(NEXT_ID)}"
    text = f"after {body.get('previous_response_id')}"
    message = {"type": "message", "role": "assistant", "status": "completed"}
    message["content"] = [{"type": "output_text", "text": text, "annotations": []}]
    response = {"id": response_id, "object": "response", "created_at": 1_700_000_000}
    response |= {"model": body.get("model"), "status": "completed", "output": [message]}
    STORED[response_id] = response = {**response, "usage": USAGE}
    return response


def response_events(response: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    created = {**response, "status": "in_progress", "output": [], "usage": None}
    yield "response.created", {"response": created}
    for piece in ("hel", "lo"):
        yield "response.output_text.delta", {"item_id": "msg_1", "delta": piece}
    yield "response.completed", {"response": response}


def make_message(body: dict[str, Any], headers: Any) -> dict[str, Any]:
    version, beta = headers.get("anthropic-version"), headers.get("anthropic-beta")
    text = f"version={version} beta={beta}"
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 4, "output_tokens": 6},
    }


def message_events(message: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    start = {**message, "content": [], "stop_reason": None}
    yield "message_start", {"message": {**start, "usage": {"input_tokens": 4, "output_tokens": 1}}}
    yield "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
    for piece in ("hel", "lo"):
        delta = {"type": "text_delta", "text": piece}
        yield "content_block_delta", {"index": 0, "delta": delta}
    yield "content_block_stop", {"index": 0}
    delta = {"stop_reason": "end_turn", "stop_sequence": None}
    yield "message_delta", {"delta": delta, "usage": {"output_tokens": 6}}
    yield "message_stop", {}


def not_found(what: str) -> dict[str, Any]:
    error = {"message": f"{what} not found", "type": "invalid_request_error", "code": 404}
    return {"error": {**error, "param": None}}


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--uds")
    where.add_argument("--port", type=int)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--headless", action="store_true", help="a follower rank: no HTTP")
    args, _ = parser.parse_known_args()
    if args.headless:  # vLLM's --headless rank of a multi-node engine serves nothing
        print(f"fake engine {args.served_model_name}: a headless rank", flush=True)
        while True:
            time.sleep(3600)
    env = os.environ
    if "FAKE_ENGINE_FAIL_UNLESS" in env and not os.path.exists(env["FAKE_ENGINE_FAIL_UNLESS"]):
        sys.exit(f"fake engine: {env['FAKE_ENGINE_FAIL_UNLESS']} missing; failing on purpose")
    if "FAKE_ENGINE_ENV_DUMP" in env:
        with open(env["FAKE_ENGINE_ENV_DUMP"], "w") as f:
            json.dump(dict(env), f)
    time.sleep(float(env.get("FAKE_ENGINE_BIND_DELAY", "0")))
    listed = {"object": "list", "data": [{"id": args.served_model_name, "object": "model"}]}
    models = env.get("FAKE_ENGINE_MODELS", json.dumps(listed)).encode()
    key = env.get("VLLM_API_KEY") or args.api_key
    health = int(env.get("FAKE_ENGINE_HEALTH", "200"))
    delay = float(env.get("FAKE_ENGINE_REPLY_DELAY", "0"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path in ("/health", "/ready"):
                self._answer(health, b"{}")
            elif self.path == "/metrics":
                self._answer(200, b"fake_engine_up 1\n", "text/plain; version=0.0.4")
            elif key and self.headers.get("Authorization") != f"Bearer {key}":
                self._answer(401, b'{"error": "bad key"}')
            elif self.path == "/v1/models":
                self._answer(200, models)
            elif self.path.startswith("/v1/responses/") and self.path[14:] in STORED:
                self._json(200, STORED[self.path[14:]])
            elif self.path.startswith("/v1/responses/"):
                self._json(404, not_found(f"Response with id '{self.path[14:]}'"))
            else:
                self._answer(404, b"{}")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if key and self.headers.get("Authorization") != f"Bearer {key}":
                self._answer(401, b'{"error": "bad key"}')
            elif self.path in ("/v1/chat/completions", "/v1/completions"):
                self._chat()
            elif self.path == "/v1/responses":
                self._responses(body)
            elif self.path.startswith("/v1/responses/") and self.path.endswith("/cancel"):
                response_id = self.path[14:-7]
                if response_id in STORED:
                    self._json(200, {**STORED[response_id], "status": "cancelled"})
                else:
                    self._json(404, not_found(f"Response with id '{response_id}'"))
            elif self.path == "/v1/messages":
                self._messages(body)
            elif self.path == "/v1/messages/count_tokens":
                self._json(200, {"input_tokens": 7})
            elif self.path in ("/v1/rerank", "/v1/score"):
                usage = {"prompt_tokens": 9, "total_tokens": 9}
                self._json(200, {"id": "rerank-fake", "results": [], "usage": usage})
            elif self.path == "/tokenize":
                self._json(200, {"count": 2, "max_model_len": 512, "tokens": [1, 2]})
            elif self.path == "/detokenize":
                self._json(200, {"prompt": "hello"})
            else:
                self._answer(404, b"{}")

        def _chat(self) -> None:
            time.sleep(delay)
            message = {"role": "assistant", "content": "fake"}
            answer = {
                "id": "fake-1",
                "object": "chat.completion",
                "model": args.served_model_name,
                "system_fingerprint": f"pid-{os.getpid()}",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            self._answer(200, json.dumps(answer).encode())

        def _responses(self, body: dict[str, Any]) -> None:
            previous = body.get("previous_response_id")
            if previous is not None and previous not in STORED:
                self._json(404, not_found(f"Response with id '{previous}'"))
            elif body.get("stream"):
                self._events(response_events(make_response(body)))
            else:
                self._json(200, make_response(body))

        def _messages(self, body: dict[str, Any]) -> None:
            if "max_tokens" not in body:
                error = {"type": "invalid_request_error", "message": "max_tokens: Field required"}
                self._json(400, {"type": "error", "error": error})
            elif body.get("stream"):
                self._events(message_events(make_message(body, self.headers)))
            else:
                self._json(200, make_message(body, self.headers))

        def _events(self, events: Iterator[tuple[str, dict[str, Any]]]) -> None:
            """Typed SSE events, one write each, the connection closed at the end (HTTP/1.0)."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for name, data in events:
                self.wfile.write(
                    f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()
                )
                self.wfile.flush()

        def _json(self, status: int, obj: dict[str, Any]) -> None:
            self._answer(status, json.dumps(obj).encode())

        def _answer(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server: socketserver.BaseServer
    if args.uds:
        server = UnixHTTPServer(args.uds, Handler)
        where = args.uds
    else:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
        where = f"{args.host}:{args.port}"
    print(f"fake engine {args.served_model_name} on {where}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
