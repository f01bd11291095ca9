"""The few places the gateway looks inside a response: reasoning fields and the model name.

Engines disagree on where a reasoning model's thinking goes: vLLM ≥ 0.16 writes `reasoning`,
SGLang and LMDeploy write `reasoning_content`, DeepSeek's API documents `reasoning_content`,
and clients read one or the other (langchain-deepseek falls back to `reasoning`, most tools do
not). The gateway makes both present with the same text, in messages and in stream deltas, and
in the assistant messages a client sends back. For a model with `reasoning: think_tags` (an
engine without a parser) it first splits `<think>…</think>` out of the content (think.py).

Streams are rewritten event by event: bytes are split at the blank line that ends an SSE event,
an event is parsed only when it could need a change, and untouched events keep their bytes.
What an engine sends cannot stall the gateway: one event may hold at most MAX_EVENT_BYTES, the
bytes are scanned once, and a chunk the rewriter cannot read ends the stream with an error
event (security review findings 8 and 9) instead of an exception in the middle of a response.
"""

import json
import re
from typing import Any

from gateway.errors import error_body
from gateway.think import ThinkSplitter, split_think

REASONING_FIELDS = ("reasoning_content", "reasoning")
MAX_EVENT_BYTES = 4 * 1024 * 1024  # one SSE event; engines send a few hundred bytes each
_EVENT_END = re.compile(rb"\n\n|\r\n\r\n")  # the blank line that ends an event, LF or CRLF


def complete_reasoning(part: dict[str, Any]) -> bool:
    """Give a message or delta both reasoning fields when it has one. True if it changed."""
    text = next((part[f] for f in REASONING_FIELDS if part.get(f) is not None), None)
    if text is None:
        return False
    changed = False
    for field in REASONING_FIELDS:
        if part.get(field) is None:
            part[field] = text
            changed = True
    return changed


def complete_history(body: dict[str, Any]) -> bool:
    """Both reasoning fields on the request's messages that have one. True if it changed.

    vLLM reads `reasoning` and folds `reasoning_content` into it; SGLang reads only
    `reasoning_content`; LMDeploy hands both to the chat template (ENGINES.md §1.5, §2.5).
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        return False
    changed = False
    for message in messages:
        if isinstance(message, dict) and complete_reasoning(message):
            changed = True
    return changed


def split_message(message: dict[str, Any]) -> bool:
    """Move a message's `<think>…</think>` text into the reasoning fields. True if it changed."""
    text = message.get("content")
    if not isinstance(text, str) or any(message.get(f) for f in REASONING_FIELDS):
        return False  # nothing to split, or the engine has split it already
    reasoning, message["content"] = split_think(text)
    for field in REASONING_FIELDS:
        message[field] = reasoning
    return True


def rewrite_body(obj: dict[str, Any], model: str) -> bool:
    """Normalise one response object (a whole completion or one chunk). True if it changed."""
    changed = False
    if "model" in obj and obj["model"] != model:
        obj["model"] = model
        changed = True
    for choice in obj.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        for key in ("message", "delta"):
            part = choice.get(key)
            if isinstance(part, dict) and complete_reasoning(part):
                changed = True
    return changed


def rewrite_json(raw: bytes, model: str, split_tags: bool = False) -> tuple[bytes, Any]:
    """A non-streaming body, normalised, and its `usage` (parsed once for both); bytes that
    are not a JSON object pass unchanged."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw, None
    if not isinstance(obj, dict):
        return raw, None
    messages = [c.get("message") for c in obj.get("choices") or () if isinstance(c, dict)]
    split = [split_message(m) for m in messages if split_tags and isinstance(m, dict)]
    if rewrite_body(obj, model) or any(split):
        return _dumps(obj), obj.get("usage")
    return raw, obj.get("usage")


class EventRewriter:
    """Feed raw stream bytes, get back bytes with each complete SSE event normalised.

    It also keeps the stream's usage (the gateway always asks for it) and, with strip_usage,
    drops the usage-only chunk that the client did not ask for. With split_tags, each choice's
    content goes through its own ThinkSplitter; what it holds back is let go at the choice's
    finish_reason.

    `failure` says why the stream cannot go on: an event over MAX_EVENT_BYTES, or one the
    rewriter failed on (say `"choices": 5`). feed() then returns the events before it, and
    the caller ends the stream (error_event).
    """

    def __init__(self, model: str, strip_usage: bool = False, split_tags: bool = False) -> None:
        self.model = model
        self.strip_usage = strip_usage
        self.usage: dict[str, Any] | None = None
        self.is_done = False  # `data: [DONE]` went through: the answer is complete
        self.failure: str | None = None
        self.error: Exception | None = None  # what the rewriter raised, for the log
        self._model_bytes = f'"model":"{model}"'.encode()
        self._pending = bytearray()  # the start of an event whose end has not come yet
        self._scanned = 0  # bytes of _pending known to hold no event end
        self._splitters: dict[int, ThinkSplitter] | None = {} if split_tags else None

    def feed(self, data: bytes) -> bytes:
        end = data.find(b"\n\n")
        if not self._pending and 0 <= end == len(data) - 2 and b"\r\n\r\n" not in data:
            # The common case, one whole event per read: no buffering, no slicing.
            try:
                rewritten = self._rewrite_event(data[:-2])
            except Exception as exc:
                self._fail(exc)
                return b""
            return b"" if rewritten is None else rewritten + b"\n\n"
        return self._feed_buffered(data)

    def flush(self) -> bytes:
        """Whatever is left when the upstream ends (an event without its blank line)."""
        rest = bytes(self._pending)
        self._pending.clear()
        return rest

    def _feed_buffered(self, data: bytes) -> bytes:
        pending = self._pending
        pending += data
        out = []
        start = 0  # of the next event
        try:
            while found := _EVENT_END.search(pending, self._scanned):
                end, self._scanned = found.span()
                if end - start > MAX_EVENT_BYTES:
                    break
                rewritten = self._rewrite_event(bytes(pending[start:end]))
                start = self._scanned
                if rewritten is not None:
                    out.append(rewritten)
                    out.append(b"\n\n")
        except Exception as exc:
            self._fail(exc)
        if len(pending) - start > MAX_EVENT_BYTES and self.failure is None:
            self.failure = f"sent an SSE event over {MAX_EVENT_BYTES // 2**20} MiB"
        del pending[:start]  # cheap: bytearray drops its head without moving the rest
        self._scanned = max(0, len(pending) - 3)  # a separator may straddle two reads
        return b"".join(out)

    def _fail(self, exc: Exception) -> None:
        self.failure = f"sent a chunk the gateway could not read ({type(exc).__name__})"
        self.error = exc

    def _rewrite_event(self, event: bytes) -> bytes | None:
        """The event's new bytes; None drops it."""
        if not event.startswith(b"data: {"):
            self.is_done = self.is_done or event.startswith(b"data: [DONE]")
            return event
        has_usage = b'"usage":{' in event or b'"usage": {' in event
        if not (has_usage or self._may_change(event)):
            return event
        try:
            obj = json.loads(event[6:])
        except ValueError:
            return event
        if not isinstance(obj, dict):
            return event
        split = self._split_choices(obj)
        if has_usage and isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
            if self.strip_usage:
                if not obj.get("choices"):
                    return None  # the usage-only chunk the engine sends last
                obj["usage"] = None
                rewrite_body(obj, self.model)
                return b"data: " + _dumps(obj)
        if not rewrite_body(obj, self.model) and not split:
            return event
        return b"data: " + _dumps(obj)

    def _may_change(self, event: bytes) -> bool:
        # Cheap byte checks first: most chunks carry neither a reasoning field nor a foreign name.
        if self._splitters is not None:
            return True
        return b'"reasoning' in event or (b'"model"' in event and self._model_bytes not in event)

    def _split_choices(self, obj: dict[str, Any]) -> bool:
        if self._splitters is None:
            return False
        split = False
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("delta"), dict):
                index = choice.get("index", 0)
                splitter = self._splitters.setdefault(index, ThinkSplitter())
                split = _split_delta(splitter, choice) or split
        return split


def _split_delta(splitter: ThinkSplitter, choice: dict[str, Any]) -> bool:
    delta = choice["delta"]
    text = delta.get("content")
    if any(delta.get(f) for f in REASONING_FIELDS):
        return False  # the engine split it after all
    reasoning, content = splitter.feed(text) if isinstance(text, str) else ("", "")
    if choice.get("finish_reason") is not None:
        rest_reasoning, rest_content = splitter.flush()
        reasoning, content = reasoning + rest_reasoning, content + rest_content
    if not text and not reasoning and not content:
        return False
    if content:
        delta["content"] = content
    else:
        delta.pop("content", None)
    if reasoning:
        for field in REASONING_FIELDS:
            delta[field] = reasoning
    return True


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def error_event(message: str) -> bytes:
    """The end of a stream that failed after its first byte: an OpenAI-shaped error, [DONE]."""
    event = json.dumps(error_body(message, "upstream_error", None, 502))
    return f"data: {event}\n\ndata: [DONE]\n\n".encode()
