"""Reasoning-field and model-name normalisation over recorded engine outputs."""

import json
import time

import pytest

from gateway.sse import MAX_EVENT_BYTES, EventRewriter, error_event, rewrite_json

# Shapes recorded from each engine (ENGINES.md §1.5, §2.5, §3.5, §6.2).
VLLM_CHUNKS = [
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"r1","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"r1","choices":[{"index":0,'
    b'"delta":{"reasoning":"Let me think"},"finish_reason":null}]}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"r1","choices":[{"index":0,'
    b'"delta":{"content":"Hello"},"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
]
SGLANG_CHUNKS = [
    b'data: {"id":"s1","object":"chat.completion.chunk","model":"r1","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":null,"reasoning_content":"Hmm"}}]}\n\n',
    b'data: {"id":"s1","object":"chat.completion.chunk","model":"r1","choices":[{"index":0,'
    b'"delta":{"content":"Hi","reasoning_content":null}}]}\n\n',
    b"data: [DONE]\n\n",
]
LMDEPLOY_CHUNKS = [
    b'data: {"id":"1","object":"chat.completion.chunk","model":"r1","choices":[{"index":0,'
    b'"delta":{"role":"assistant","reasoning_content":"Think"},"finish_reason":null}],'
    b'"usage":null}\n\n',
    b"data: [DONE]\n\n",
]


def _events(data: bytes) -> list[dict]:
    return [json.loads(e[6:]) for e in data.split(b"\n\n") if e.startswith(b"data: {")]


def _reasoning(events: list[dict]) -> tuple[str, str]:
    deltas = [c["delta"] for e in events for c in e["choices"]]
    return (
        "".join(d.get("reasoning_content") or "" for d in deltas),
        "".join(d.get("reasoning") or "" for d in deltas),
    )


@pytest.mark.parametrize(
    "chunks, expected",
    [(VLLM_CHUNKS, "Let me think"), (SGLANG_CHUNKS, "Hmm"), (LMDEPLOY_CHUNKS, "Think")],
    ids=["vllm", "sglang", "lmdeploy"],
)
def test_stream_gets_both_reasoning_fields_from_every_engine(chunks, expected):
    rewriter = EventRewriter("r1")
    out = b"".join(rewriter.feed(c) for c in chunks) + rewriter.flush()
    assert _reasoning(_events(out)) == (expected, expected)
    assert out.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("chunks", [VLLM_CHUNKS, SGLANG_CHUNKS], ids=["vllm", "sglang"])
def test_stream_split_at_every_byte_position_gives_the_same_output(chunks):
    whole = b"".join(chunks)
    reference = EventRewriter("r1").feed(whole)
    for cut in range(1, len(whole)):
        rewriter = EventRewriter("r1")
        out = rewriter.feed(whole[:cut]) + rewriter.feed(whole[cut:]) + rewriter.flush()
        assert out == reference, f"differs when split at byte {cut}"


def test_events_without_reasoning_keep_their_bytes():
    rewriter = EventRewriter("r1")
    plain = VLLM_CHUNKS[0] + VLLM_CHUNKS[2] + VLLM_CHUNKS[3]
    assert rewriter.feed(plain) == plain


def test_model_name_is_the_one_the_client_asked_for():
    rewriter = EventRewriter("alias")
    out = rewriter.feed(VLLM_CHUNKS[2])
    assert _events(out)[0]["model"] == "alias"


def test_non_streaming_message_gets_both_fields():
    body = {
        "model": "r1",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi", "reasoning": "Hm"}}
        ],
    }
    out = json.loads(rewrite_json(json.dumps(body).encode(), "r1")[0])
    message = out["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "Hm"


def test_non_json_body_passes_unchanged():
    assert rewrite_json(b"not json", "r1") == (b"not json", None)


def test_crlf_separated_events_are_rewritten():
    rewriter = EventRewriter("r1")
    event = VLLM_CHUNKS[1].rstrip(b"\n") + b"\r\n\r\n"
    out = rewriter.feed(event)
    assert _reasoning(_events(out)) == ("Let me think", "Let me think")


USAGE_CHUNK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"r1","choices":[],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\n'
)


def test_usage_is_kept_and_its_chunk_dropped_when_the_client_did_not_ask():
    rewriter = EventRewriter("r1", strip_usage=True)
    out = rewriter.feed(VLLM_CHUNKS[2] + USAGE_CHUNK + VLLM_CHUNKS[3])
    assert rewriter.usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert b'"usage"' not in out
    assert out == VLLM_CHUNKS[2] + VLLM_CHUNKS[3]


def test_usage_chunk_passes_when_the_client_asked():
    rewriter = EventRewriter("r1", strip_usage=False)
    out = rewriter.feed(USAGE_CHUNK)
    assert out == USAGE_CHUNK
    assert rewriter.usage is not None and rewriter.usage["completion_tokens"] == 3


def test_lmdeploy_null_usage_on_every_chunk_is_not_mistaken_for_usage():
    rewriter = EventRewriter("r1", strip_usage=True)
    rewriter.feed(LMDEPLOY_CHUNKS[0])
    assert rewriter.usage is None


def test_an_event_that_never_ends_is_refused_at_the_cap_in_linear_time():
    """Finding 8: 1 KiB reads of one event without a blank line. The old buffer copied and
    rescanned everything on each read (quadratic: seconds here, 31 s for 64 MiB); now each
    byte is looked at once, and past MAX_EVENT_BYTES the rewriter gives up."""
    rewriter = EventRewriter("r1")
    assert rewriter.feed(VLLM_CHUNKS[0] + b"data: ") == VLLM_CHUNKS[0]
    piece = b"x" * 1024
    started = time.perf_counter()
    for _ in range(MAX_EVENT_BYTES // len(piece) - 1):  # with `data: `, just under the cap
        assert rewriter.feed(piece) == b""
        assert rewriter.failure is None
    assert time.perf_counter() - started < 1.0
    assert rewriter.feed(piece) == b""
    assert rewriter.failure == "sent an SSE event over 4 MiB"


def test_a_whole_event_over_the_cap_in_one_read_is_refused():
    """Finding 8: an event that comes whole, but larger than MAX_EVENT_BYTES."""
    rewriter = EventRewriter("r1")
    huge = b"data: " + b"x" * MAX_EVENT_BYTES + b"\n\n"
    assert rewriter.feed(VLLM_CHUNKS[0] + huge) == VLLM_CHUNKS[0]
    assert rewriter.failure == "sent an SSE event over 4 MiB"


def test_a_separator_cut_between_two_reads_is_found():
    """The scan resumes a few bytes back, so `\\r\\n` + `\\r\\n` still ends the event."""
    event = VLLM_CHUNKS[1].rstrip(b"\n")
    rewriter = EventRewriter("r1")
    assert rewriter.feed(event + b"\r\n\r") == b""
    out = rewriter.feed(b"\n" + VLLM_CHUNKS[3])
    assert _reasoning(_events(out)) == ("Let me think", "Let me think")
    assert out.endswith(b"\r\n\r\n" + VLLM_CHUNKS[3]) or out.endswith(b"\n\n" + VLLM_CHUNKS[3])


@pytest.mark.parametrize(
    ("bad", "split_tags"),
    [
        (b'data: {"id":"x","model":"other","choices":5}\n\n', False),
        (
            b'data: {"id":"x","model":"r1","choices":[{"index":[1],"delta":{"content":"a"}}]}\n\n',
            True,
        ),
    ],
    ids=["choices-not-a-list", "index-unhashable"],
)
def test_a_malformed_chunk_fails_the_stream_after_the_events_before_it(bad, split_tags):
    """Finding 9: the rewriter raised mid-stream and the events read with the bad one were
    lost. Now it returns them and says why it stopped (the relay sends the error event)."""
    rewriter = EventRewriter("r1", split_tags=split_tags)
    out = rewriter.feed(VLLM_CHUNKS[0] + bad + VLLM_CHUNKS[2])
    assert _events(out)[0]["id"] == "c1" and len(_events(out)) == 1
    assert rewriter.failure == "sent a chunk the gateway could not read (TypeError)"
    alone = EventRewriter("r1", split_tags=split_tags)
    assert alone.feed(bad) == b""  # one whole event per read: the fast path fails the same way
    assert alone.failure is not None


def test_error_event_is_openai_shaped_and_ends_the_stream():
    events = error_event("worker r1-0 failed").split(b"\n\n")
    assert json.loads(events[0].removeprefix(b"data: ")) == {
        "error": {
            "message": "worker r1-0 failed",
            "type": "upstream_error",
            "param": None,
            "code": 502,
        }
    }
    assert events[1:] == [b"data: [DONE]", b""]
