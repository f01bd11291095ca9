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

Only the standard library, so it starts in a few tens of milliseconds.
"""

import argparse
import json
import os
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
    args, _ = parser.parse_known_args()
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
            else:
                self._answer(404, b"{}")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if key and self.headers.get("Authorization") != f"Bearer {key}":
                self._answer(401, b'{"error": "bad key"}')
                return
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                self._answer(404, b"{}")
                return
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
