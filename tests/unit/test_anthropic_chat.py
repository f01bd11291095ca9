"""Messages ↔ Chat Completions (gateway/anthropic_chat.py), for engines without /v1/messages.
tests/e2e/test_agent_apis.py compares the translation with vLLM's native /v1/messages."""

import json
from typing import Any

from gateway.anthropic_chat import MessagesStream, chat_request, message

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def test_a_conversation_with_tools_images_and_thinking_becomes_chat() -> None:
    body = {
        "model": "m",
        "max_tokens": 64,
        "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "metadata": {"user_id": "u-1"},
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAA"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Use the tool.", "signature": "s"},
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "X"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "Sunny"},
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
    }
    chat = chat_request(body)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "X"}'},
                }
            ],
            "reasoning_content": "Use the tool.",
            "reasoning": "Use the tool.",
        },
        {"role": "tool", "tool_call_id": "t1", "content": "Sunny"},
        {"role": "user", "content": "Thanks"},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER["input_schema"],
                "description": "The weather in a city.",
            },
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["max_tokens"] == 64 and chat["stop"] == ["END"] and chat["temperature"] == 0.5
    assert chat["user"] == "u-1"
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


def test_tool_choice_kinds() -> None:
    for theirs, ours in (("auto", "auto"), ("any", "required"), ("none", "none")):
        body = {"model": "m", "messages": [], "tool_choice": {"type": theirs}}
        assert chat_request(body)["tool_choice"] == ours


def completion(finish: str, **reply: Any) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", **reply}, "finish_reason": finish}
    usage = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    return {"id": "chatcmpl-1", "choices": [choice], "usage": usage}


def test_a_completion_with_reasoning_text_and_a_tool_call_becomes_a_message() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    chat = completion("tool_calls", content="Let me check.", reasoning="hmm", tool_calls=[call])
    assert message(chat, "alias") == {
        "id": "msg_chatcmpl-1",
        "type": "message",
        "role": "assistant",
        "model": "alias",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": ""},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 5},
    }


def test_stop_reasons() -> None:
    assert message(completion("length", content="a"), "m")["stop_reason"] == "max_tokens"
    assert message(completion("stop", content="a"), "m")["stop_reason"] == "end_turn"
    call = {"id": "c", "function": {"name": "f", "arguments": "{}"}}
    named = completion("stop", content=None, tool_calls=[call])  # a named tool_choice's finish
    assert message(named, "m")["stop_reason"] == "tool_use"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return b"data: " + json.dumps({"id": "c-1", "choices": choices, **extra}).encode() + b"\n\n"


def parse(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            assert name.startswith("event: ")
            payload = json.loads(data.removeprefix("data: "))
            assert payload["type"] == name.removeprefix("event: ")
            out.append(payload)
    return out


def test_a_chat_stream_becomes_the_messages_event_sequence() -> None:
    call_start = {"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}
    chunks = [
        chunk({"role": "assistant", "reasoning_content": "th", "reasoning": "th"}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({"tool_calls": [call_start]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}, "tool_calls"),
        b'data: {"id":"c-1","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":4}}\n\n',
        b"data: [DONE]\n\n",
    ]
    stream = MessagesStream("alias")
    whole = b"".join(chunks)
    raw = b"".join(stream.feed(whole[i : i + 5]) for i in range(0, len(whole), 5))
    events = parse(raw + stream.flush())
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[0]["message"]["model"] == "alias"
    assert [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"] == [
        "thinking",
        "text",
        "tool_use",
    ]
    json_parts = [e["delta"].get("partial_json") for e in events[9:11]]
    assert "".join(json_parts) == '{"a": 1}'
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"] == {"input_tokens": 7, "output_tokens": 4}
    assert stream.usage == {"prompt_tokens": 7, "completion_tokens": 4}
    assert stream.is_done and stream.failure is None


def test_a_broken_chunk_fails_the_translated_stream() -> None:
    stream = MessagesStream("m")
    stream.feed(b"data: {broken\n\n")
    assert stream.failure is not None and "could not translate" in stream.failure
