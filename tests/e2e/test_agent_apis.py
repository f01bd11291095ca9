"""The APIs agents speak, through the gateway to a real vLLM CPU worker, driven by the real
clients: Anthropic's SDK on /v1/messages (create, stream, count tokens, a tool-use round trip,
errors) and OpenAI's SDK on /v1/responses (whole and streamed, stored, retrieved, continued
with `previous_response_id`).

One gateway and one worker (the tiny random model) serve the module; the worker stores
responses (VLLM_ENABLE_RESPONSES_API_STORE=1, vLLM's switch for it). The model's words are
random: the tests check the protocol (shapes, event order, usage, ids), not the text.
"""

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fakes.metrics import sample_values

from gateway.anthropic_chat import MessagesStream, chat_request, message

from .conftest import API_KEY, METRICS_TOKEN, Engine, GatewayProcess, cpu_worker, record_timing

MODEL = "agent"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def gateway(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    agent = cpu_worker(engine, MODEL)
    agent["env"] = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    agent["engine_args"] = {
        **agent["engine_args"],
        "max-model-len": 2048,
        # A named tool_choice needs a tool parser in vLLM; `pythonic` needs no special tokens.
        "enable-auto-tool-choice": True,
        "tool-call-parser": "pythonic",
        # Random weights would fill a constrained tool call with whitespace.
        "structured-outputs-config": '{"backend": "xgrammar", "disable_any_whitespace": true}',
    }
    gw = GatewayProcess(tmp_path_factory.mktemp("agent-apis"), [agent])
    gw.start()
    try:
        record_timing("agent APIs gateway start -> ready", gw.wait_ready())
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def claude(gateway: GatewayProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gateway.url, api_key=API_KEY, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def sdk(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with gateway.client() as client:
        yield client


def tokens(gateway: GatewayProcess, kind: str) -> float:
    auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    page = httpx.get(f"{gateway.url}/metrics", headers=auth, timeout=10).text
    return sum(sample_values(page, "enginegate_tokens_total", model=MODEL, kind=kind))


def test_anthropic_sdk_creates_a_message(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=MODEL,
        max_tokens=8,
        system="You are brief.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.model == MODEL
    assert [block.type for block in message.content] == ["text"]
    assert message.stop_reason in ("max_tokens", "end_turn")
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 8


def test_anthropic_sdk_streams_a_message_and_its_tokens_are_counted(
    claude: anthropic.Anthropic, gateway: GatewayProcess
) -> None:
    before = tokens(gateway, "completion")
    with claude.messages.stream(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Count to five"}]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds and "message_delta" in kinds
    assert final.content[0].type == "text" and final.content[0].text
    assert tokens(gateway, "completion") == before + final.usage.output_tokens


def test_anthropic_sdk_tool_use_round_trip(claude: anthropic.Anthropic) -> None:
    """1. Ask with a tool the model must call (tool_choice names it; vLLM constrains the
    arguments to its schema); 2. send the tool's result back; 3. the model answers."""
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = claude.messages.create(
        model=MODEL,
        max_tokens=32,
        messages=asked,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    uses = [block for block in called.content if block.type == "tool_use"]
    assert len(uses) == 1, called.content
    assert uses[0].name == "get_weather" and uses[0].input["city"] in ("Paris", "Rome")
    assert called.stop_reason == "tool_use"
    result = {"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny, 21 C"}
    answered = claude.messages.create(
        model=MODEL,
        max_tokens=8,
        tools=[WEATHER],
        messages=[
            *asked,
            {"role": "assistant", "content": called.content},
            {"role": "user", "content": [result]},
        ],
    )
    assert answered.content and answered.content[0].type == "text"
    assert answered.usage.input_tokens > called.usage.input_tokens  # the turns were sent


def test_anthropic_sdk_counts_tokens(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}]
    )
    assert counted.input_tokens > 0


def test_anthropic_sdk_reads_the_gateways_errors(
    claude: anthropic.Anthropic, gateway: GatewayProcess
) -> None:
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.messages.create(model="nope", max_tokens=4, messages=[])
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with (
        anthropic.Anthropic(base_url=gateway.url, api_key="wrong", max_retries=0) as stranger,
        pytest.raises(anthropic.AuthenticationError),
    ):
        stranger.messages.create(model=MODEL, max_tokens=4, messages=[])


def test_openai_sdk_responses_are_stored_retrieved_and_continued(sdk: openai.OpenAI) -> None:
    first = sdk.responses.create(model=MODEL, input="Hello", max_output_tokens=8)
    assert first.status in ("completed", "incomplete") and first.model == MODEL
    assert first.usage is not None and first.usage.output_tokens > 0
    assert sdk.responses.retrieve(first.id).id == first.id
    second = sdk.responses.create(
        model=MODEL, input="And then?", previous_response_id=first.id, max_output_tokens=8
    )
    assert second.id != first.id
    assert second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # the first turn came along


def test_openai_sdk_streams_a_response_and_continues_it(sdk: openai.OpenAI) -> None:
    stream = sdk.responses.create(model=MODEL, input="Hello", max_output_tokens=8, stream=True)
    kinds, last = [], None
    for event in stream:
        kinds.append(event.type)
        last = event
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert "response.output_text.delta" in kinds
    assert last is not None and last.type == "response.completed"
    streamed_id = last.response.id
    assert sdk.responses.retrieve(streamed_id).id == streamed_id
    follow = sdk.responses.create(
        model=MODEL, input="More", previous_response_id=streamed_id, max_output_tokens=4
    )
    assert follow.status in ("completed", "incomplete")


def test_openai_sdk_unknown_response_is_a_clear_not_found(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="not made through this gateway"):
        sdk.responses.retrieve("resp_never_made")


def test_tokenize_and_detokenize_round_trip(gateway: GatewayProcess) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=gateway.url, headers=auth, timeout=30) as http:
        tokenized = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello there"})
        assert tokenized.status_code == 200, tokenized.text
        ids = tokenized.json()["tokens"]
        assert ids and tokenized.json()["count"] == len(ids)
        back = http.post("/detokenize", json={"model": MODEL, "tokens": ids})
        assert back.status_code == 200, back.text
        assert back.json()["prompt"] == "Hello there"


def native_and_translated(http: httpx.Client, body: dict[str, Any]) -> tuple[Any, Any]:
    """The same Messages request answered by vLLM's /v1/messages and by its chat completions
    through the gateway's translation (the path an engine without /v1/messages takes)."""
    native = http.post("/v1/messages", json=body)
    assert native.status_code == 200, native.text
    chat = http.post("/v1/chat/completions", json=chat_request(body))
    assert chat.status_code == 200, chat.text
    if not body.get("stream"):
        return native.json(), message(chat.json(), MODEL)
    stream = MessagesStream(MODEL)
    translated = stream.feed(chat.content) + stream.flush()
    return sse_events(native.content), sse_events(translated)


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:])
        for line in raw.decode().splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


def runs(kinds: list[str]) -> list[str]:
    """Each run of equal event types once: [a, b, b, c] -> [a, b, c]."""
    return [kind for i, kind in enumerate(kinds) if i == 0 or kind != kinds[i - 1]]


@pytest.mark.parametrize("is_stream", [False, True], ids=["whole", "stream"])
def test_translation_matches_vllms_native_messages(
    gateway: GatewayProcess, is_stream: bool
) -> None:
    """1. A conversation with a system prompt, a tool call and its result; 2. asked of vLLM's
    own /v1/messages and, translated, of its chat completions; 3. greedy sampling makes both
    generate the same tokens from the same prompt: the same blocks, stop reason and token
    counts (input_tokens equal means both rendered the same prompt), the same event types."""
    call = {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Rome"}}
    body = {
        "model": MODEL,
        "max_tokens": 6,
        "temperature": 0,
        "system": [{"type": "text", "text": "You answer about weather."}],
        "tools": [WEATHER],
        "stream": is_stream,
        "messages": [
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, call]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "Rainy"}],
            },
        ],
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}  # both routes take it
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as http:
        native, translated = native_and_translated(http, body)
    if not is_stream:
        # Anthropic sends `stop_sequence: null`; vLLM leaves out what is None.
        assert set(translated) - {"stop_sequence"} == set(native) - {"container"}
        assert [b["type"] for b in translated["content"]] == [b["type"] for b in native["content"]]
        assert translated["content"] == native["content"]
        assert translated["stop_reason"] == native["stop_reason"]
        assert translated["usage"]["input_tokens"] == native["usage"]["input_tokens"]
        assert translated["usage"]["output_tokens"] == native["usage"]["output_tokens"]
        return
    # The engine may pack several tokens into one chunk, so deltas are compared as runs.
    kinds = runs([e["type"] for e in native])
    assert runs([e["type"] for e in translated]) == kinds
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    text = "".join(e["delta"].get("text", "") for e in native if e["type"] == "content_block_delta")
    assert text == "".join(
        e["delta"].get("text", "") for e in translated if e["type"] == "content_block_delta"
    )
    assert translated[-2]["delta"] == native[-2]["delta"]  # stop reason
    assert translated[-2]["usage"]["output_tokens"] == native[-2]["usage"]["output_tokens"]
