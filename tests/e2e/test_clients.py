"""Every client of the mission against one gateway serving a DeepSeek-R1 style model.

One gateway for the module serves `tiny-r1` (random weights, a chat template that opens
`<think>` like DeepSeek-R1's, vLLM's `deepseek_r1` reasoning parser, hermes tool calls; alias
`deepseek-reasoner`) and `tiny-embed` (a random BERT served by vLLM as an embedding model).

Random weights say nothing that can be asserted, and almost never close their `<think>`: all
output is reasoning. The tests assert structure, counts and that fields agree, never wording.
Where a test needs the model to finish thinking (tools, json_schema), `logit_bias` pushes it to
write `</think>` first, as a real R1 does before answering; vLLM's guided decoding then makes
the rest valid. Two engine settings keep that output short: vLLM's strict (structural-tag)
tool calling is off, so a named tool choice goes through the JSON-schema grammar, and that
grammar allows no whitespace, which a random model would otherwise produce without end.
"""

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_deepseek import ChatDeepSeek
from langchain_openai import ChatOpenAI

from .conftest import READY_TIMEOUT, Engine, GatewayProcess, record_timing

MODEL = "tiny-r1"
ALIAS = "deepseek-reasoner"
EMBED = "tiny-embed"
FULL = {"ignore_eos": True}  # vLLM: do not stop at EOS, so counts are exact
HELLO = [{"role": "user", "content": "Hello! How are you today?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CITIES = {"Paris", "Oslo"}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "mood": {"enum": ["good", "bad"]}},
    "required": ["ok", "mood"],
    "additionalProperties": False,
}

pytestmark = pytest.mark.e2e


def r1_worker(engine: Engine) -> dict:
    return {
        "name": MODEL,
        "aliases": [ALIAS],
        "backend": "vllm",
        "model": engine.r1_model,
        "device": "cpu",
        "reasoning": "deepseek_r1",
        "command": [engine.python, "-m", "vllm.entrypoints.openai.api_server"],
        "engine_args": {
            "max-model-len": 512,
            "enforce-eager": True,
            "enable-auto-tool-choice": True,
            "tool-call-parser": "hermes",
            "structured-outputs-config": '{"backend": "xgrammar", "disable_any_whitespace": true}',
        },
        "env": {"VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"},
        "startup_timeout": READY_TIMEOUT,
    }


def embed_worker(engine: Engine) -> dict:
    return {
        "name": EMBED,
        "backend": "vllm",
        "model": engine.embed_model,
        "device": "cpu",
        "command": [engine.python, "-m", "vllm.entrypoints.openai.api_server"],
        "engine_args": {"max-model-len": 512, "enforce-eager": True},
        "startup_timeout": READY_TIMEOUT,
    }


@pytest.fixture(scope="module")
def gw(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    if not engine.r1_model or not engine.embed_model:
        pytest.fail("deploy/setup-cpu-engine.sh printed no TINY_R1_MODEL / TINY_EMBED_MODEL")
    gateway = GatewayProcess(
        tmp_path_factory.mktemp("clients"), [r1_worker(engine), embed_worker(engine)]
    )
    gateway.start()
    try:
        record_timing("clients gateway start -> ready (tiny-r1 + tiny-embed)", gateway.wait_ready())
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def sdk(gw: GatewayProcess) -> Iterator[openai.OpenAI]:
    with gw.client() as client:
        yield client


@pytest.fixture(scope="module")
def end_thinking(engine: Engine) -> dict[str, int]:
    """logit_bias that makes the model write `</think>` at once (and never again in JSON)."""
    tokenizer = json.loads((Path(engine.r1_model) / "tokenizer.json").read_text())
    ids = [t["id"] for t in tokenizer["added_tokens"] if t["content"] == "</think>"]
    assert ids, "the tiny-r1 tokenizer has no </think> token"
    return {str(ids[0]): 100}


def reasoning_of(part: object) -> tuple[str | None, str | None]:
    """(reasoning_content, reasoning) of an SDK message or delta: extras to the SDK's models."""
    extra = getattr(part, "model_extra", None) or {}
    return extra.get("reasoning_content"), extra.get("reasoning")


def summed(chunks: list) -> dict[str, str]:
    """Each delta field of choice 0 summed over a stream."""
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    fields = {"content": [], "reasoning_content": [], "reasoning": []}
    for delta in deltas:
        fields["content"].append(delta.content or "")
        rc, r = reasoning_of(delta)
        fields["reasoning_content"].append(rc or "")
        fields["reasoning"].append(r or "")
    return {name: "".join(parts) for name, parts in fields.items()}


# --- OpenAI SDK ---------------------------------------------------------------------------


def test_sdk_message_has_both_reasoning_fields(sdk):
    reply = sdk.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, temperature=1, seed=3, extra_body=FULL
    )

    assert reply.model == MODEL
    message = reply.choices[0].message
    reasoning_content, reasoning = reasoning_of(message)
    assert reasoning_content == reasoning
    assert isinstance(reasoning, str) and reasoning, message
    assert message.content is None  # no `</think>`: everything was reasoning
    assert reply.usage.completion_tokens == 8


def test_sdk_stream_deltas_sum_to_the_same_reasoning_as_the_message(sdk):
    """1. Ask once whole and once streamed with the same seed; 2. both reasoning fields of the
    summed deltas equal the message's reasoning."""
    ask = {"model": MODEL, "messages": HELLO, "max_tokens": 12, "temperature": 1, "seed": 5}
    whole = sdk.chat.completions.create(**ask, extra_body=FULL)
    with sdk.chat.completions.create(**ask, stream=True, extra_body=FULL) as stream:
        chunks = list(stream)

    expected = reasoning_of(whole.choices[0].message)[1]
    assert expected
    got = summed(chunks)
    assert got["reasoning_content"] == got["reasoning"] == expected
    assert got["content"] == ""
    assert {c.model for c in chunks} == {MODEL}
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # the gateway's own usage request is hidden


def test_sdk_with_raw_response_has_headers_and_parses(sdk):
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=4, extra_body=FULL
    )

    assert raw.http_response.status_code == 200
    assert raw.headers["content-type"].startswith("application/json")
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.usage.completion_tokens == 4


async def test_async_sdk_whole_and_streamed(gw):
    async with openai.AsyncOpenAI(
        base_url=f"{gw.url}/v1", api_key=gw.api_key, max_retries=0, timeout=120
    ) as client:
        ask = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "temperature": 1, "seed": 9}
        whole = await client.chat.completions.create(**ask, extra_body=FULL)
        stream = await client.chat.completions.create(
            **ask, stream=True, stream_options={"include_usage": True}, extra_body=FULL
        )
        chunks = [chunk async for chunk in stream]

    assert whole.usage.completion_tokens == 6
    assert summed(chunks)["reasoning"] == reasoning_of(whole.choices[0].message)[1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_alias_is_served_and_answered_under_its_own_name(sdk):
    reply = sdk.chat.completions.create(model=ALIAS, messages=HELLO, max_tokens=2)
    assert reply.model == ALIAS
    listed = {m.id: m.model_extra.get("alias_of") for m in sdk.models.list()}
    assert listed == {MODEL: None, ALIAS: MODEL, EMBED: None}


def test_tool_call_round_trip(sdk, end_thinking):
    """1. Force a call of get_weather; 2. its arguments are valid JSON for the schema;
    3. send the assistant message (reasoning fields included) and the tool result back;
    4. the model answers again."""
    messages: list = [{"role": "user", "content": "Weather in Paris?"}]
    first = sdk.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        logit_bias=end_thinking,
    )

    message = first.choices[0].message
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in CITIES
    assert reasoning_of(message) == ("", "")  # thinking ended at once: empty, but both present

    messages += [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
    ]
    second = sdk.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], max_tokens=4, extra_body=FULL
    )
    assert second.choices[0].finish_reason == "length"
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_streamed_tool_call_deltas_add_up_to_valid_arguments(sdk, end_thinking):
    with sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        logit_bias=end_thinking,
        stream=True,
    ) as stream:
        calls = [call for c in stream if c.choices for call in c.choices[0].delta.tool_calls or ()]

    assert calls[0].function.name == "get_weather" and calls[0].id
    arguments = "".join(call.function.arguments or "" for call in calls)
    assert json.loads(arguments)["city"] in CITIES


def test_json_schema_output_parses_and_matches(sdk, end_thinking):
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=40,
        logit_bias=end_thinking,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True},
        },
    )

    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"ok", "mood"}
    assert isinstance(answer["ok"], bool) and answer["mood"] in ("good", "bad")


def test_n_2_gives_two_choices(sdk):
    reply = sdk.chat.completions.create(
        model=MODEL, messages=HELLO, n=2, max_tokens=5, temperature=1, extra_body=FULL
    )

    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        reasoning_content, reasoning = reasoning_of(choice.message)
        assert reasoning_content == reasoning and reasoning
    assert reply.usage.completion_tokens == 10


def test_logprobs_cover_every_token(sdk):
    reply = sdk.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=5, logprobs=True, top_logprobs=2, extra_body=FULL
    )

    tokens = reply.choices[0].logprobs.content
    assert len(tokens) == reply.usage.completion_tokens == 5
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)


def test_max_completion_tokens_caps_the_answer(sdk):
    reply = sdk.chat.completions.create(
        model=MODEL, messages=HELLO, max_completion_tokens=3, extra_body=FULL
    )
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"


def test_seed_makes_sampling_repeatable(sdk):
    def sample(seed: int) -> str | None:
        reply = sdk.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=16, temperature=1, seed=seed, extra_body=FULL
        )
        return reasoning_of(reply.choices[0].message)[1]

    first = sample(11)
    assert first == sample(11)
    assert first != sample(12)


def test_stop_ends_the_answer_before_the_stop_string(sdk):
    """1. Sample 24 tokens with a seed; 2. pick a word of that text as the stop string;
    3. the same request with it stops right before the word's first occurrence."""
    ask = {"model": MODEL, "messages": HELLO, "max_tokens": 24, "temperature": 1, "seed": 7}
    reference = reasoning_of(sdk.chat.completions.create(**ask, extra_body=FULL).choices[0].message)
    text = reference[1] or ""
    words = re.findall(r"[A-Za-z]{2,}", text)
    assert words, f"no word to stop at in {text!r}"

    stopped = sdk.chat.completions.create(**ask, stop=[words[0]], extra_body=FULL).choices[0]

    assert stopped.finish_reason == "stop"
    assert reasoning_of(stopped.message)[1] == text[: text.index(words[0])]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_sent_back_in_either_field_is_accepted(sdk, field):
    messages = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there.", field: "The user greets me."},
        {"role": "user", "content": "How are you?"},
    ]
    reply = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert reply.choices[0].message.role == "assistant"


def test_embeddings(sdk):
    """The SDK asks for base64 by default and decodes it; plain floats work too."""
    reply = sdk.embeddings.create(model=EMBED, input=["Hello there", "The quick brown fox"])
    floats = sdk.embeddings.create(model=EMBED, input="Hello there", encoding_format="float")

    assert reply.model == EMBED
    assert [d.index for d in reply.data] == [0, 1]
    assert len(reply.data[0].embedding) == len(reply.data[1].embedding) == 128
    assert reply.data[0].embedding != reply.data[1].embedding
    assert floats.data[0].embedding == pytest.approx(reply.data[0].embedding, abs=1e-6)
    assert reply.usage.prompt_tokens > 0


def test_engine_rejections_come_back_as_openai_errors(sdk):
    """Parameters the engine refuses: the gateway relays its 400 in OpenAI's shape."""
    with pytest.raises(openai.BadRequestError) as too_many:
        sdk.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2, logprobs=True, top_logprobs=30
        )
    with pytest.raises(openai.BadRequestError) as options:
        sdk.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2, stream_options={"include_usage": True}
        )

    assert too_many.value.body["param"] == "logprobs"
    assert "max allowed: 20" in too_many.value.body["message"]
    assert options.value.body["param"] == "stream_options"


# --- curl ---------------------------------------------------------------------------------


def curl(gw: GatewayProcess, body: dict, tmp_path: Path) -> tuple[int, bytes, str]:
    """POST body with curl -N; (exit code, raw response body, response headers lowercased)."""
    headers = tmp_path / "headers.txt"
    done = subprocess.run(
        ["curl", "-sS", "-N", "--fail-with-body", "--max-time", "120"]
        + ["--dump-header", str(headers), f"{gw.url}/v1/chat/completions"]
        + ["-H", f"Authorization: Bearer {gw.api_key}", "-H", "Content-Type: application/json"]
        + ["-d", json.dumps(body)],
        capture_output=True,
        timeout=150,
    )
    return done.returncode, done.stdout, headers.read_text().lower()


def test_curl_whole_answer_bytes(gw, tmp_path):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, **FULL}
    code, raw, headers = curl(gw, body, tmp_path)

    assert code == 0, raw
    assert "content-type: application/json" in headers
    message = json.loads(raw)["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] != ""
    assert b'"model":"tiny-r1"' in raw


def test_curl_stream_is_sse_ending_in_done(gw, tmp_path):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "stream": True, **FULL}
    code, raw, headers = curl(gw, body, tmp_path)

    assert code == 0, raw
    assert "content-type: text/event-stream" in headers
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events[:-1]), events
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    with_reasoning = [d for d in deltas if d.get("reasoning")]
    assert with_reasoning
    assert all(d["reasoning_content"] == d["reasoning"] for d in with_reasoning)
    assert all("usage" not in c or c["usage"] is None for c in chunks)


def test_curl_error_bytes(gw, tmp_path):
    body = {"model": MODEL, "messages": HELLO, "logprobs": True, "top_logprobs": 30}
    code, raw, headers = curl(gw, body, tmp_path)

    assert code == 22  # --fail-with-body: HTTP >= 400, body still printed
    assert headers.startswith("http/1.1 400")
    assert "content-type: application/json" in headers
    error = json.loads(raw)
    assert list(error) == ["error"]
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["param"] == "logprobs"


# --- LangChain ----------------------------------------------------------------------------


def chat_openai(gw: GatewayProcess, **options: object) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL,
        base_url=f"{gw.url}/v1",
        api_key=gw.api_key,
        max_retries=0,
        timeout=120,
        **options,
    )


def test_langchain_chat_openai_invoke_and_stream(gw):
    llm = chat_openai(gw, max_tokens=5, stream_usage=True, extra_body=FULL)

    message = llm.invoke("Hello!")
    chunks = list(llm.stream("Hello!"))

    assert message.response_metadata["model_name"] == MODEL
    assert message.usage_metadata["output_tokens"] == 5
    streamed = sum(chunks[1:], chunks[0])
    assert isinstance(streamed, AIMessageChunk)
    assert streamed.usage_metadata["output_tokens"] == 5
    # ChatOpenAI drops reasoning by design (ENGINES.md §4): only the answer text comes through
    assert isinstance(message.content, str) and isinstance(streamed.content, str)


def test_langchain_chat_openai_bind_tools_round_trip(gw, end_thinking):
    llm = chat_openai(gw, max_tokens=40, logit_bias=end_thinking)
    with_tools = llm.bind_tools([WEATHER], tool_choice="get_weather")

    question = HumanMessage("Weather in Paris?")
    called = with_tools.invoke([question])

    (call,) = called.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in CITIES
    answer = chat_openai(gw, max_tokens=3, extra_body=FULL).invoke(
        [question, called, ToolMessage('{"sky": "sunny"}', tool_call_id=call["id"])]
    )
    assert answer.usage_metadata["output_tokens"] == 3


def test_langchain_chat_deepseek_reads_the_reasoning(gw):
    """1. invoke and stream with the same seed; 2. the reasoning is in
    additional_kwargs["reasoning_content"] both times, and the same text."""
    llm = ChatDeepSeek(
        model=MODEL,
        api_base=f"{gw.url}/v1",
        api_key=gw.api_key,  # required even with api_base (ENGINES.md §6.1)
        max_tokens=10,
        temperature=1,
        seed=13,
        max_retries=0,
        extra_body=FULL,
    )

    message = llm.invoke("Hello!")
    chunks = list(llm.stream("Hello!"))

    reasoning = message.additional_kwargs["reasoning_content"]
    assert isinstance(reasoning, str) and reasoning
    streamed = sum(chunks[1:], chunks[0])
    assert streamed.additional_kwargs["reasoning_content"] == reasoning
