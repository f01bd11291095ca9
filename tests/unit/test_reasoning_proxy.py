"""Aliases, `reasoning: think_tags` and reasoning sent back, through the real app.

The app runs in-process (httpx.ASGITransport) in front of `backend: external` workers whose
upstream is a scripted server on a loopback port that answers like vLLM without a reasoning
parser: the thinking and `</think>` arrive as plain content. It keeps every request it got.
"""

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.loopback import from_httpx, serve

from backends.supervisor import Supervisor, Timings
from gateway.app import create_app
from gateway.config import Config, plan_workers

KEY = "sk-user-5555"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = Timings(startup_poll=0.01, health_interval=0.05, health_timeout=1, stop_grace=1)
PIECES = ["Hmm, 2 + 2", " is 4.</th", "ink>\n\nIt is", " 4."]
REASONING, CONTENT = "Hmm, 2 + 2 is 4.", "\n\nIt is 4."


class Upstream:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "r1"}]})
        body = json.loads(request.content)
        self.requests.append(body)
        head = {"id": "c1", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(PIECES), "reasoning": None}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return httpx.Response(
                200, json={**head, "object": "chat.completion", "choices": [choice]}
            )
        events = []
        for number, piece in enumerate(PIECES):
            finish = "stop" if number == len(PIECES) - 1 else None
            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": finish}
            chunk = {**head, "object": "chat.completion.chunk", "choices": [choice]}
            events.append(f"data: {json.dumps(chunk)}\n\n")
        events.append("data: [DONE]\n\n")
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, content="".join(events).encode(), headers=headers)


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
async def gateway(tmp_path: Path, upstream: Upstream) -> AsyncIterator[httpx.AsyncClient]:
    """The app with `r1` (think_tags, aliases `deepseek-r1` and `r1-latest`) and `plain`."""
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(serve(from_httpx(upstream)))
        config = Config.model_validate(
            {
                "gateway": {"state_dir": str(tmp_path), "api_keys": [KEY]},
                "models": [
                    {
                        "name": "r1",
                        "aliases": ["deepseek-r1", "r1-latest"],
                        "backend": "external",
                        "url": f"{url}/v1",
                        "reasoning": "think_tags",
                    },
                    {"name": "plain", "backend": "external", "url": f"{url}/v1"},
                ],
            }
        )
        probes = await stack.enter_async_context(httpx.AsyncClient())
        slots = plan_workers(config, "test.yaml", gpu_count=0, cpu_cores=[0])
        supervisor = Supervisor(slots, tmp_path, probes, timings=FAST)
        app = create_app(config, supervisor, probes)
        await stack.enter_async_context(app.router.lifespan_context(app))
        assert await supervisor.wait_ready(timeout=5)
        transport = httpx.ASGITransport(app=app)
        yield await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://gw")
        )


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "2 + 2?"}], **fields}


async def test_an_alias_is_served_by_its_model_and_answered_as_itself(gateway, upstream):
    reply = await gateway.post("/v1/chat/completions", json=chat("deepseek-r1"), headers=AUTH)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "deepseek-r1"
    assert upstream.requests[-1]["model"] == "r1"  # the engine hears its own served name


async def test_models_lists_aliases_pointing_at_their_model(gateway):
    listed = (await gateway.get("/v1/models", headers=AUTH)).json()["data"]
    assert [(m["id"], m.get("alias_of")) for m in listed] == [
        ("r1", None),
        ("deepseek-r1", "r1"),
        ("r1-latest", "r1"),
        ("plain", None),
    ]
    assert all(m["ready"] for m in listed)


async def test_unknown_model_error_names_aliases_too(gateway):
    reply = await gateway.post("/v1/chat/completions", json=chat("nope"), headers=AUTH)
    assert reply.status_code == 404
    assert "deepseek-r1, plain, r1, r1-latest" in reply.json()["error"]["message"]


async def test_think_tags_are_split_in_a_whole_answer(gateway):
    reply = await gateway.post("/v1/chat/completions", json=chat("r1"), headers=AUTH)
    message = reply.json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["reasoning"]) == (REASONING, REASONING)
    assert message["content"] == CONTENT


async def test_think_tags_are_split_in_a_stream(gateway):
    body = chat("r1-latest", stream=True)
    reply = await gateway.post("/v1/chat/completions", json=body, headers=AUTH)
    assert reply.content.endswith(b"data: [DONE]\n\n")
    events = [json.loads(e[6:]) for e in reply.content.split(b"\n\n") if e.startswith(b"data: {")]
    assert {e["model"] for e in events} == {"r1-latest"}
    deltas = [c["delta"] for e in events for c in e["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == REASONING
    assert "".join(d.get("reasoning") or "" for d in deltas) == REASONING
    assert "".join(d.get("content") or "" for d in deltas) == CONTENT


async def test_a_model_without_think_tags_keeps_its_text(gateway):
    reply = await gateway.post("/v1/chat/completions", json=chat("plain"), headers=AUTH)
    assert reply.json()["choices"][0]["message"]["content"] == "".join(PIECES)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_sent_back_reaches_the_engine_in_both_fields(gateway, upstream, field):
    history = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4", field: "Hmm, 4."},
        {"role": "user", "content": "Sure?"},
    ]
    body = {"model": "plain", "messages": history, "unknown_extra": {"kept": True}}
    reply = await gateway.post("/v1/chat/completions", json=body, headers=AUTH)
    assert reply.status_code == 200, reply.text
    sent = upstream.requests[-1]
    assert sent["messages"][1]["reasoning"] == sent["messages"][1]["reasoning_content"] == "Hmm, 4."
    assert sent["unknown_extra"] == {"kept": True}
