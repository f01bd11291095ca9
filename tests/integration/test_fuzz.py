"""Malformed requests, thousands of them, against the real gateway process.

Hypothesis builds request bodies: JSON of any shape, OpenAI-like objects whose fields hold the
wrong types, lone surrogates, nesting deeper than Python's recursion limit, and raw bytes. A
scripted upstream answers whatever reaches it. The gateway must never answer 5xx (the upstream
here never does), must keep running, and every error must have OpenAI's shape.
"""

import json
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .servers import Spawner, free_port, start_gateway, start_upstream, wait_upstream

KEY = "gw-fuzz-key-90ad"
MAX_BODY = 8192
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MODELS = ("plain", "affine", "nope")  # least outstanding, prefix affinity (2 replicas), unknown

TEXT = st.text(max_size=24) | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool"]) | JSON,
        "content": TEXT | JSON,
    },
    optional={"reasoning": TEXT | JSON, "reasoning_content": TEXT | JSON},
)
OPENAI_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(MODELS) | JSON,
        "messages": st.lists(MESSAGE | JSON, max_size=4) | JSON,
        "prompt": TEXT | JSON,
        "input": TEXT | JSON,
        "stream": st.booleans() | JSON,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": JSON}) | JSON,
        "user": TEXT | JSON,
        "max_tokens": st.integers(-2, 6) | JSON,
    },
)
NESTED = st.builds(
    lambda depth, opener: opener * depth + (b"]" if opener == b"[" else b"}") * depth,
    st.integers(900, 4000),
    st.sampled_from([b"[", b'{"a":']),
)
RAW = st.binary(max_size=200) | NESTED | st.integers(MAX_BODY - 10, 3 * MAX_BODY).map(b"x".__mul__)
FUZZ = settings(
    max_examples=2000,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """1. Start a fast scripted upstream; 2. start the gateway with one plain model and one
    with prefix affinity over two replicas; 3. wait for /ready; 4. after the module, check that
    the gateway is still up and logged no traceback."""
    tmp = tmp_path_factory.mktemp("fuzz")
    spawner = Spawner(tmp / "logs")
    try:
        upstream = start_upstream(spawner, "upstream", "--interval", "0", "--chunks", "2")
        wait_upstream(spawner, upstream)
        port = free_port()
        config = tmp / "enginegate.yaml"
        model = f"backend: external, url: '{upstream.url}', upstream_model: fake-model"
        config.write_text(f"""\
gateway:
  host: 127.0.0.1
  port: {port}
  api_keys: ["{KEY}"]
  state_dir: {tmp / "state"}
  max_body_bytes: {MAX_BODY}
  drain_timeout: 1
  stop_grace: 1
models:
  - {{name: plain, {model}}}
  - {{name: affine, {model}, replicas: 2, routing: prefix_affinity, prefix_chars: 64}}
""")
        start_gateway(spawner, config)
        base = f"http://127.0.0.1:{port}"
        spawner.wait_http("gateway", f"{base}/ready")
        with httpx.Client(base_url=base, timeout=10) as client:
            yield client
            assert client.get("/health").status_code == 200, spawner.log("gateway")
        assert spawner.procs["gateway"].poll() is None, spawner.log("gateway")
        log = spawner.log("gateway")
        assert "Traceback" not in log and "Exception in ASGI" not in log, log
    finally:
        spawner.stop_all()


def check(response: httpx.Response) -> None:
    """No 5xx; any error is `{"error": {"message", "type", "param", "code"}}`."""
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert isinstance(body["error"]["type"], str), body


def as_json(body: object) -> bytes:
    return json.dumps(body).encode()


# (method, path, body, content-type, API key): one request, malformed in one way or another
REQUESTS = st.one_of(
    st.tuples(
        st.just("POST"), st.sampled_from(PATHS), OPENAI_LIKE.map(as_json),
        st.just("application/json"), st.just(KEY),
    ),
    st.tuples(
        st.just("POST"), st.sampled_from(PATHS), JSON.map(as_json),
        st.just("application/json"), st.just(KEY),
    ),
    st.tuples(
        st.just("POST"), st.sampled_from(PATHS), RAW,
        st.sampled_from(["application/json", "text/plain", "", "application/x-www-form"]),
        st.just(KEY),
    ),
    st.tuples(
        st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]),
        st.sampled_from([*PATHS, "/v1/models", "/v1", "/v1/chat", "/metrics", "/admin/workers"]),
        st.just(b"{}"), st.just("application/json"), st.sampled_from([KEY, "", "wrong", f"{KEY}x"]),
    ),
)  # fmt: skip


def test_malformed_requests_get_openai_errors_never_a_5xx(gateway: httpx.Client) -> None:
    """1. Send 2,000 generated requests, one at a time; 2. each is answered below 500, errors
    in OpenAI's shape; 3. the mix reached the upstream (200s) as well as every error path;
    4. (fixture) the gateway is still up and logged no traceback."""
    seen: Counter[int] = Counter()

    @FUZZ
    @given(REQUESTS)
    def send(request: tuple[str, str, bytes, str, str]) -> None:
        method, path, content, content_type, key = request
        headers = {"content-type": content_type} if content_type else {}
        if key:
            headers["authorization"] = f"Bearer {key}"
        response = gateway.request(method, path, content=content, headers=headers)
        seen[response.status_code] += 1
        check(response)

    send()
    assert sum(seen.values()) >= 2000, seen
    assert min(seen[status] for status in (200, 400, 401, 404, 413)) >= 10, seen
