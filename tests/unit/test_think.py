"""`<think>…</think>` splitting for engines without a reasoning parser (`reasoning: think_tags`).

The streams here are what vLLM sends for an R1-style model started without
`--reasoning-parser`: the thinking and its closing tag arrive as plain `content`.
"""

import json

import pytest

from gateway.sse import EventRewriter, complete_history, rewrite_json
from gateway.think import ThinkSplitter, split_think

RAW = "Let me think: 1 < 2.\n</think>\n\nThe answer is 42 </th> <think>."
REASONING = "Let me think: 1 < 2.\n"
CONTENT = "\n\nThe answer is 42 </th> <think>."


def _chunk(delta: dict, finish: str | None = None, index: int = 0) -> bytes:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "r1", "choices": [choice]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


# Recorded shape (vLLM 0.32 CPU, no parser): a role chunk, content pieces in tokens, the
# closing tag a token of its own, finish_reason on the last piece, then [DONE].
VLLM_NO_PARSER = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Let me"}),
    _chunk({"content": " think: 1 < 2.\n"}),
    _chunk({"content": "</think>"}),
    _chunk({"content": "\n\nThe answer"}),
    _chunk({"content": " is 42 </th> <think>."}, finish="stop"),
    b"data: [DONE]\n\n",
]


def _fed(splitter: ThinkSplitter, pieces: list[str]) -> tuple[str, str]:
    parts = [splitter.feed(piece) for piece in pieces] + [splitter.flush()]
    return "".join(r for r, _ in parts), "".join(c for _, c in parts)


def _deltas(data: bytes) -> list[dict]:
    events = [json.loads(e[6:]) for e in data.split(b"\n\n") if e.startswith(b"data: {")]
    return [c["delta"] for e in events for c in e["choices"]]


def _summed(data: bytes) -> tuple[str, str, str]:
    deltas = _deltas(data)
    return (
        "".join(d.get("reasoning_content") or "" for d in deltas),
        "".join(d.get("reasoning") or "" for d in deltas),
        "".join(d.get("content") or "" for d in deltas),
    )


@pytest.mark.parametrize("text", [RAW, "<think>" + RAW, " \n<think>" + RAW])
def test_text_cut_at_every_pair_of_positions_splits_the_same(text):
    """1. Cut the raw text into three pieces at every pair of positions.
    2. Feed them one by one: the summed reasoning and content never change."""
    for first in range(len(text) + 1):
        for second in range(first, len(text) + 1):
            pieces = [text[:first], text[first:second], text[second:]]
            assert _fed(ThinkSplitter(), pieces) == (REASONING, CONTENT), pieces


def test_one_character_at_a_time():
    assert _fed(ThinkSplitter(), list("<think>" + RAW)) == (REASONING, CONTENT)


def test_no_closing_tag_means_everything_is_reasoning():
    assert _fed(ThinkSplitter(), ["Hmm </thi", "nk"]) == ("Hmm </think", "")
    assert split_think("Hmm, still thinking") == ("Hmm, still thinking", None)


def test_a_cut_off_opening_tag_at_the_end_is_reasoning_text():
    assert _fed(ThinkSplitter(), ["  <thi"]) == ("  <thi", "")


@pytest.mark.parametrize(
    "text, expected",
    [
        (RAW, (REASONING, CONTENT)),
        ("<think>Hm</think>", ("Hm", None)),
        ("</think>Hi", (None, "Hi")),
        ("<think>", (None, None)),
        ("", (None, None)),
    ],
)
def test_whole_text(text, expected):
    assert split_think(text) == expected


def test_recorded_stream_split_at_every_byte_position():
    """1. Join the recorded stream and cut it in two at every byte.
    2. Each run gives the same bytes, and the summed deltas are the split text, with both
       reasoning fields equal."""
    whole = b"".join(VLLM_NO_PARSER)
    reference = EventRewriter("r1", split_tags=True).feed(whole)
    assert _summed(reference) == (REASONING, REASONING, CONTENT)
    assert reference.endswith(b"data: [DONE]\n\n")
    for cut in range(1, len(whole)):
        rewriter = EventRewriter("r1", split_tags=True)
        out = rewriter.feed(whole[:cut]) + rewriter.feed(whole[cut:]) + rewriter.flush()
        assert out == reference, f"differs when split at byte {cut}"


def test_raw_text_split_into_chunks_at_every_position():
    """The closing tag cut across two SSE chunks at every character still splits right."""
    text = "<think>" + RAW
    for cut in range(len(text) + 1):
        rewriter = EventRewriter("r1", split_tags=True)
        out = rewriter.feed(
            _chunk({"role": "assistant", "content": ""})
            + _chunk({"content": text[:cut]})
            + _chunk({"content": text[cut:]}, finish="length")
        )
        assert _summed(out) == (REASONING, REASONING, CONTENT), cut


def test_held_back_text_is_let_go_at_finish_reason():
    rewriter = EventRewriter("r1", split_tags=True)
    out = rewriter.feed(_chunk({"content": "a </th"}))
    assert _deltas(out) == [{"reasoning_content": "a ", "reasoning": "a "}]
    out = rewriter.feed(_chunk({"content": None}, finish="length"))
    assert _deltas(out) == [{"reasoning_content": "</th", "reasoning": "</th"}]


def test_each_choice_is_split_on_its_own():
    rewriter = EventRewriter("r1", split_tags=True)
    out = rewriter.feed(
        _chunk({"content": "x</thi"}, index=0)
        + _chunk({"content": "y</think>b"}, index=1)
        + _chunk({"content": "nk>a"}, index=0, finish="stop")
        + _chunk({"content": ""}, index=1, finish="stop")
    )
    events = [json.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]
    by_index: dict[int, list[dict]] = {0: [], 1: []}
    for event in events:
        for choice in event["choices"]:
            by_index[choice["index"]].append(choice["delta"])
    for index, (reasoning, content) in {0: ("x", "a"), 1: ("y", "b")}.items():
        deltas = by_index[index]
        assert "".join(d.get("reasoning") or "" for d in deltas) == reasoning
        assert "".join(d.get("content") or "" for d in deltas) == content


def test_tool_call_deltas_pass_untouched():
    tool = {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}
    chunk = _chunk(tool)
    assert EventRewriter("r1", split_tags=True).feed(chunk) == chunk


def test_an_engine_that_split_already_is_left_alone():
    chunk = _chunk({"reasoning": "Hm", "content": None})
    out = EventRewriter("r1", split_tags=True).feed(chunk)
    assert _deltas(out) == [{"reasoning": "Hm", "content": None, "reasoning_content": "Hm"}]


def test_non_streaming_message_is_split():
    body = {
        "model": "r1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": RAW}}],
    }
    out = json.loads(rewrite_json(json.dumps(body).encode(), "r1", split_tags=True)[0])
    message = out["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == REASONING
    assert message["content"] == CONTENT


def test_non_streaming_without_split_keeps_the_tags():
    body = {"model": "r1", "choices": [{"index": 0, "message": {"content": RAW}}]}
    raw = json.dumps(body).encode()
    assert rewrite_json(raw, "r1")[0] == raw


def test_history_messages_get_both_reasoning_fields():
    body = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
            {"role": "assistant", "content": "Again", "reasoning": "again"},
            {"role": "user", "content": "Bye"},
        ]
    }
    assert complete_history(body)
    assistant = body["messages"][1:3]
    assert [(m["reasoning"], m["reasoning_content"]) for m in assistant] == [
        ("greet", "greet"),
        ("again", "again"),
    ]
    assert not complete_history(body)  # already complete: the request keeps its bytes
