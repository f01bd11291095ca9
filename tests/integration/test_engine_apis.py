"""The engine APIs beyond chat (gateway/engine_api.py) through a real gateway process, whose
two vLLM replicas are the scripted fake engine (tests/fakes/engine.py): routing, stored
responses pinned to their replica, Anthropic's conventions, usage from typed events.

The fake engine answers in vLLM's shapes but generates nothing; tests/e2e/test_agent_apis.py
runs the same APIs against a real vLLM.
"""

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fakes.gateway_process import GatewayProcess
from fakes.metrics import sample_values

from .servers import Spawner, start_upstream, wait_upstream

FAKE_ENGINE = Path(__file__).resolve().parents[1] / "fakes" / "engine.py"
KEY = "sk-engine-apis-test"
TOKEN = "metrics-engine-apis"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """1. Two fake vLLM replicas of `fake`, and `chat-only`: an external server that has no
    /v1/messages (the scripted upstream); 2. the gateway in front; 3. wait for /ready."""
    tmp = tmp_path_factory.mktemp("engine-apis")
    spawner = Spawner(tmp / "logs")
    upstream = start_upstream(spawner, "chat-only", "--model", "chat-only", "--interval", "0")
    chat_only = {"name": "chat-only", "backend": "external", "url": upstream.url}
    model = {
        "name": "fake",
        "backend": "vllm",
        "model": "/models/none",
        "device": "cpu",
        "replicas": 2,
        "aliases": ["fake-alias"],
        "command": [sys.executable, str(FAKE_ENGINE)],
        "startup_timeout": 20,
    }
    gw = GatewayProcess(tmp, [model, chat_only], api_key=KEY, metrics_token=TOKEN, stop_grace=2)
    try:
        wait_upstream(spawner, upstream)
        gw.start()
        gw.wait_ready(timeout=60)  # one replica of each model: the pinning tests need both
        deadline = time.monotonic() + 60
        while ready_replicas(gw, "fake") < 2:
            assert time.monotonic() < deadline, f"one replica of fake not ready\n{gw.logs()}"
            time.sleep(0.2)
        yield gw
    finally:
        gw.stop()
        spawner.stop_all()


def ready_replicas(gw: GatewayProcess, model: str) -> float:
    page = gw.metrics_page()
    return sum(sample_values(page, "enginegate_worker_state", model=model, state="ready"))


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10, trust_env=False) as client:
        yield client


def events(raw: bytes) -> list[tuple[str, dict]]:
    """(name, data) of each typed SSE event."""
    out = []
    for block in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def tokens(http: httpx.Client, kind: str, model: str = "fake") -> float:
    page = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    return sum(sample_values(page, "enginegate_tokens_total", model=model, kind=kind))


def test_responses_are_fetched_cancelled_and_continued_on_the_replica_that_stored_them(
    http: httpx.Client,
) -> None:
    """1. Create four responses (least-outstanding alternates between the two replicas);
    2. GET, cancel and continue each: every one reaches the replica that stored it (a fake
    engine knows only its own), where unpinned routing would miss half of them."""
    made = []
    for _ in range(4):
        created = http.post("/v1/responses", json={"model": "fake", "input": "hi"}, headers=AUTH)
        assert created.status_code == 200, created.text
        made.append(created.json()["id"])
    assert len({rid.split("_")[1] for rid in made}) == 2, f"one replica made all of {made}"
    for rid in made:
        fetched = http.get(f"/v1/responses/{rid}", headers=AUTH)
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["id"] == rid
        cancelled = http.post(f"/v1/responses/{rid}/cancel", headers=AUTH)
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        body = {"model": "fake-alias", "input": "more", "previous_response_id": rid}
        continued = http.post("/v1/responses", json=body, headers=AUTH)
        assert continued.status_code == 200, continued.text
        assert continued.json()["model"] == "fake-alias"  # answered as the client named it
        assert continued.json()["id"].split("_")[1] == rid.split("_")[1]  # same engine pid


def test_a_streamed_response_is_relayed_intact_pinned_and_counted(http: httpx.Client) -> None:
    before = tokens(http, "completion")
    body = {"model": "fake", "input": "hi", "stream": True}
    streamed = http.post("/v1/responses", json=body, headers=AUTH)
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["content-type"].startswith("text/event-stream")
    got = events(streamed.content)
    assert [name for name, _ in got] == [
        "response.created",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.completed",
    ]
    assert b"stream_options" not in streamed.content and b"[DONE]" not in streamed.content
    rid = got[0][1]["response"]["id"]
    for _ in range(2):  # either replica would be chosen for an unpinned request
        assert http.get(f"/v1/responses/{rid}", headers=AUTH).status_code == 200
    assert tokens(http, "completion") == before + 2  # response.completed's output_tokens


def test_an_unknown_response_is_a_clear_404(http: httpx.Client) -> None:
    for answer in (
        http.get("/v1/responses/resp_nobody", headers=AUTH),
        http.post("/v1/responses/resp_nobody/cancel", headers=AUTH),
        http.post(
            "/v1/responses",
            json={"model": "fake", "input": "x", "previous_response_id": "resp_nobody"},
            headers=AUTH,
        ),
    ):
        assert answer.status_code == 404, answer.text
        error = answer.json()["error"]
        assert error["code"] == "response_not_found"
        assert "was not made through this gateway" in error["message"]
    assert http.get("/v1/responses/resp_nobody").status_code == 401  # the key comes first


def test_messages_take_x_api_key_and_pass_anthropic_headers(http: httpx.Client) -> None:
    body = {"model": "fake", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "b-1"}
    answer = http.post("/v1/messages", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["content"][0]["text"] == "version=2023-06-01 beta=b-1"
    counted = http.post("/v1/messages/count_tokens", json=body, headers=headers)
    assert counted.json() == {"input_tokens": 7}


@pytest.mark.parametrize(
    ("headers", "body", "status", "kind"),
    [
        ({}, {"model": "fake", "max_tokens": 8}, 401, "authentication_error"),
        ({"x-api-key": "wrong"}, {"model": "fake", "max_tokens": 8}, 401, "authentication_error"),
        ({"x-api-key": KEY}, {"model": "nope", "max_tokens": 8}, 404, "not_found_error"),
        ({"x-api-key": KEY}, {"max_tokens": 8}, 400, "invalid_request_error"),
        ({"x-api-key": KEY}, {"model": "fake"}, 400, "invalid_request_error"),  # the engine's
    ],
    ids=["no-key", "bad-key", "unknown-model", "no-model", "engine-400"],
)
def test_messages_errors_have_anthropics_shape(
    http: httpx.Client, headers: dict[str, str], body: dict, status: int, kind: str
) -> None:
    answer = http.post("/v1/messages", json=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["type"] == "error"
    assert set(answer.json()["error"]) == {"type", "message"}
    assert answer.json()["error"]["type"] == kind
    assert answer.json()["error"]["message"]


def test_messages_stream_is_relayed_intact_and_counted(http: httpx.Client) -> None:
    before = tokens(http, "prompt"), tokens(http, "completion")
    body = {"model": "fake", "max_tokens": 8, "stream": True, "messages": []}
    answer = http.post("/v1/messages", json=body, headers={"x-api-key": KEY})
    assert answer.status_code == 200, answer.text
    names = [name for name, _ in events(answer.content)]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names.count("content_block_delta") == 2
    assert (tokens(http, "prompt"), tokens(http, "completion")) == (before[0] + 4, before[1] + 6)


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/v1/rerank", "results"),
        ("/v1/score", "results"),
        ("/tokenize", "tokens"),  # at the engine's root: vLLM has no /v1/tokenize
        ("/detokenize", "prompt"),
    ],
)
def test_other_engine_apis_are_routed_by_model(http: httpx.Client, path: str, want: str) -> None:
    answer = http.post(path, json={"model": "fake", "query": "q"}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert want in answer.json()
    unknown = http.post(path, json={"model": "nope"}, headers=AUTH)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_a_response_whose_replica_restarted_is_gone(
    gateway: GatewayProcess, http: httpx.Client
) -> None:
    """1. Create a response; 2. kill -9 the engine that stored it; 3. wait for the worker to
    be ready again; 4. GET and continue it: 404 naming the restart, not the new engine's
    "not found"."""
    created = http.post("/v1/responses", json={"model": "fake", "input": "hi"}, headers=AUTH)
    rid = created.json()["id"]
    os.kill(int(rid.split("_")[1]), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while http.get("/ready").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.05)  # the supervisor notices the exit
    assert gateway.poll_ready(200, 30) is not None, gateway.logs()
    for answer in (
        http.get(f"/v1/responses/{rid}", headers=AUTH),
        http.post(
            "/v1/responses",
            json={"model": "fake", "input": "x", "previous_response_id": rid},
            headers=AUTH,
        ),
    ):
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["code"] == "response_not_found"
        assert "restarted since" in answer.json()["error"]["message"]


def test_messages_are_translated_for_an_engine_without_them(http: httpx.Client) -> None:
    """The scripted upstream answers /v1/messages 404 and chat with `tok0 tok1 ...`."""
    body = {"model": "chat-only", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    answer = http.post("/v1/messages", json=body, headers={"x-api-key": KEY})
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["type"] == "message" and got["model"] == "chat-only"
    assert got["content"] == [{"type": "text", "text": "tok0 tok1 tok2 "}]
    assert got["stop_reason"] == "max_tokens"
    assert got["usage"] == {"input_tokens": 1, "output_tokens": 3}


def test_a_translated_stream_has_anthropics_event_sequence(http: httpx.Client) -> None:
    before = tokens(http, "completion", "chat-only")
    body = {"model": "chat-only", "max_tokens": 2, "stream": True, "messages": []}
    answer = http.post("/v1/messages", json=body, headers={"x-api-key": KEY})
    assert answer.status_code == 200, answer.text
    got = events(answer.content)
    assert [name for name, _ in got] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert "".join(data["delta"]["text"] for name, data in got[2:4]) == "tok0 tok1 "
    assert got[-2][1]["usage"] == {"input_tokens": 1, "output_tokens": 2}
    assert tokens(http, "completion", "chat-only") == before + 2


def test_count_tokens_is_not_translated(http: httpx.Client) -> None:
    body = {"model": "chat-only", "messages": []}
    answer = http.post("/v1/messages/count_tokens", json=body, headers={"x-api-key": KEY})
    assert answer.status_code == 404
    assert answer.json()["type"] == "error"
    assert answer.json()["error"]["type"] == "not_found_error"
