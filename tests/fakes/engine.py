"""A scripted stand-in for an engine process, for supervision tests: never an engine.

    python tests/fakes/engine.py --port N --served-model-name NAME [other vLLM flags, ignored]

It serves GET /health and GET /v1/models on 127.0.0.1:N; /v1/* needs
`Authorization: Bearer $VLLM_API_KEY` when that is set, as vLLM does. Switches, from its
environment (a model's `env:` sets them):

    FAKE_ENGINE_BIND_DELAY=S      sleep S seconds before binding (an engine loading a model)
    FAKE_ENGINE_MODELS=JSON       answer /v1/models with this body instead of the served name
    FAKE_ENGINE_ENV_DUMP=PATH     write its environment to PATH (JSON) before binding
    FAKE_ENGINE_FAIL_UNLESS=PATH  exit 3 at once unless PATH exists (a crash loop until fixed)

Only the standard library, so it starts in a few tens of milliseconds.
"""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
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
    key = env.get("VLLM_API_KEY")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self._answer(200, b"{}")
            elif key and self.headers.get("Authorization") != f"Bearer {key}":
                self._answer(401, b'{"error": "bad key"}')
            elif self.path == "/v1/models":
                self._answer(200, models)
            else:
                self._answer(404, b"{}")

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"fake engine {args.served_model_name} on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
