"""Anthropic's Messages API over an engine that speaks only Chat Completions.

vLLM, SGLang and LMDeploy serve /v1/messages themselves; an `external` server may not. When
one answers /v1/messages with 404 or 405 before anything was sent, the proxy asks the same
replica's /v1/chat/completions with the request translated here, and translates the answer
back, mapping the request as vLLM's own converter does (entrypoints/anthropic/serving.py):

    system (text or blocks)           → a system message first
    text / image blocks               → text / image_url parts (base64 → data: URL)
    assistant thinking blocks         → the message's reasoning (both field names, sse.py)
    tool_use / user tool_result       → tool_calls / `tool` messages, in order
    tools, tool_choice                → functions; auto, any → required, tool → named, none
    max_tokens, stop_sequences, temperature, top_p, top_k, metadata.user_id

and the answer: reasoning → a thinking block, content → a text block, tool calls → tool_use
blocks, finish_reason length → max_tokens, tool calls → tool_use, stop → end_turn, usage →
input/output tokens. A stream becomes message_start, content_block_start / delta / stop per
block, message_delta (stop reason, usage) and message_stop (MessagesStream).
"""

import json
from typing import Any

from starlette.responses import Response

from gateway.sse import MAX_EVENT_BYTES, REASONING_FIELDS
from gateway.typed_sse import EVENT_END

FINISH = {"length": "max_tokens", "tool_calls": "tool_use", "stop": "end_turn"}
CHOICES = {"auto": "auto", "any": "required", "none": "none"}
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k"}


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request as a Chat Completions request."""
    messages = _system(body.get("system"))
    for message in body.get("messages") or ():
        messages += _messages(message)
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if "max_tokens" in body:
        chat["max_tokens"] = body["max_tokens"]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    chat |= {ours: body[theirs] for theirs, ours in SAMPLING.items() if theirs in body}
    user = (body.get("metadata") or {}).get("user_id")
    if isinstance(user, str):
        chat["user"] = user
    if body.get("tools"):
        chat["tools"] = [_function(tool) for tool in body["tools"]]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        named = {"type": "function", "function": {"name": choice.get("name")}}
        chat["tool_choice"] = named if kind == "tool" else CHOICES.get(str(kind), "auto")
    if body.get("stream") is True:
        chat |= {"stream": True, "stream_options": {"include_usage": True}}
    return chat


def _system(system: Any) -> list[dict[str, Any]]:
    if isinstance(system, list):
        system = "".join(b.get("text", "") for b in system if b.get("type") == "text")
    return [{"role": "system", "content": system}] if system else []


def _messages(message: dict[str, Any]) -> list[dict[str, Any]]:
    """One Messages turn as chat messages: tool results first, as `tool` messages."""
    role, content = message.get("role"), message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] = []
    reasoning = ""
    for block in content or ():
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block)}})
        elif kind == "thinking":
            reasoning += block.get("thinking") or ""
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {})
            function = {"name": block.get("name", ""), "arguments": arguments}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
        elif kind == "tool_result":
            tools.append(_tool_message(block))
    out: dict[str, Any] = {"role": role}
    if parts:
        only_text = len(parts) == 1 and parts[0]["type"] == "text"
        out["content"] = parts[0]["text"] if only_text else parts
    elif calls or reasoning:
        out["content"] = None
    if calls:
        out["tool_calls"] = calls
    if reasoning:
        out |= {field: reasoning for field in REASONING_FIELDS}
    return tools + ([out] if "content" in out else [])


def _image_url(block: dict[str, Any]) -> str:
    source = block.get("source") or {}
    if source.get("type") == "url":
        return str(source.get("url", ""))
    return f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"


def _tool_message(block: dict[str, Any]) -> dict[str, Any]:
    content = block.get("content")
    if isinstance(content, list):
        content = "".join(c.get("text", "") for c in content if c.get("type") == "text")
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": content or ""}


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": tool.get("name"), "parameters": tool.get("input_schema") or {}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def message(chat: dict[str, Any], model: str) -> dict[str, Any]:
    """A whole chat completion as a Messages response."""
    choice = (chat.get("choices") or [{}])[0]
    reply = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    reasoning = next((reply[f] for f in REASONING_FIELDS if reply.get(f)), None)
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if reply.get("content"):
        content.append({"type": "text", "text": reply["content"]})
    for call in reply.get("tool_calls") or ():
        function = call.get("function") or {}
        tool_use = {"type": "tool_use", "id": call.get("id"), "name": function.get("name")}
        content.append({**tool_use, "input": _arguments(function.get("arguments"))})
    has_tools = any(block["type"] == "tool_use" for block in content)
    return {
        "id": f"msg_{chat.get('id', '')}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason"), has_tools),
        "stop_sequence": None,
        "usage": usage(chat.get("usage")),
    }


def message_response(answer: Response, model: str) -> Response:
    """A whole chat completion answer as a Messages answer."""
    body = json.dumps(message(json.loads(bytes(answer.body)), model), ensure_ascii=False)
    return Response(body.encode(), answer.status_code, media_type="application/json")


def stop_reason(finish_reason: Any, has_tools: bool) -> str | None:
    if finish_reason is None:
        return None
    if has_tools and finish_reason != "length":
        return "tool_use"  # a named tool call finishes with `stop`
    return FINISH.get(finish_reason, "end_turn")


def usage(chat_usage: Any) -> dict[str, int]:
    chat_usage = chat_usage if isinstance(chat_usage, dict) else {}
    return {
        "input_tokens": chat_usage.get("prompt_tokens") or 0,
        "output_tokens": chat_usage.get("completion_tokens") or 0,
    }


def _arguments(arguments: Any) -> Any:
    try:
        return json.loads(arguments) if isinstance(arguments, str) else (arguments or {})
    except ValueError:
        return {}


class MessagesStream:
    """Chat completion chunks in, Messages events out; typed_sse.TypedEventReader's interface
    (usage in chat's names), for relay.py."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.is_done = False
        self.failure: str | None = None
        self.error: Exception | None = None
        self._usage: dict[str, Any] | None = None
        self._pending = bytearray()
        self._scanned = 0
        self._started = False
        self._block: tuple[str, int] | None = None  # the open block: its kind and key
        self._index = -1  # of the open block
        self._finish: Any = None
        self._has_tools = False

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._usage

    def feed(self, data: bytes) -> bytes:
        pending = self._pending
        pending += data
        out: list[bytes] = []
        start = 0  # of the next chunk
        try:
            while found := EVENT_END.search(pending, self._scanned):
                out += self._chunk(bytes(pending[start : found.start()]))
                start = self._scanned = found.end()
        except Exception as exc:
            self.failure = f"sent a chunk the gateway could not translate ({type(exc).__name__})"
            self.error = exc
        del pending[:start]
        self._scanned = max(0, len(pending) - 3)  # a separator may straddle two reads
        if len(pending) > MAX_EVENT_BYTES and self.failure is None:
            self.failure = f"sent an SSE event over {MAX_EVENT_BYTES // 2**20} MiB"
        return b"".join(out)

    def flush(self) -> bytes:
        self._pending.clear()
        return b""

    def _chunk(self, event: bytes) -> list[bytes]:
        if not event.startswith(b"data:"):
            return []
        data = event[5:].strip()
        if data == b"[DONE]":
            return self._end()
        chunk = json.loads(data)
        out = [] if self._started else [self._start(chunk)]
        self._started = True
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            out += self._delta(choice.get("delta") or {})
            if choice.get("finish_reason") is not None:
                self._finish = choice["finish_reason"]
        return out

    def _start(self, chunk: dict[str, Any]) -> bytes:
        start: dict[str, Any] = {
            "id": f"msg_{chunk.get('id', '')}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},  # known only at the end
        }
        return event("message_start", {"message": start})

    def _delta(self, delta: dict[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        reasoning = next((delta[f] for f in REASONING_FIELDS if delta.get(f)), None)
        if reasoning:
            out += self._open(("thinking", 0), {"type": "thinking", "thinking": ""})
            out.append(self._block_delta({"type": "thinking_delta", "thinking": reasoning}))
        if delta.get("content"):
            out += self._open(("text", 0), {"type": "text", "text": ""})
            out.append(self._block_delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            key = ("tool_use", call.get("index", 0))
            if self._block != key:
                self._has_tools = True
                name = function.get("name")
                block = {"type": "tool_use", "id": call.get("id"), "name": name, "input": {}}
                out += self._open(key, block)
            if function.get("arguments"):
                json_delta = {"type": "input_json_delta", "partial_json": function["arguments"]}
                out.append(self._block_delta(json_delta))
        return out

    def _open(self, key: tuple[str, int], block: dict[str, Any]) -> list[bytes]:
        if self._block == key:
            return []
        out = self._close()
        self._block, self._index = key, self._index + 1
        out.append(event("content_block_start", {"index": self._index, "content_block": block}))
        return out

    def _close(self) -> list[bytes]:
        if self._block is None:
            return []
        self._block = None
        return [event("content_block_stop", {"index": self._index})]

    def _block_delta(self, delta: dict[str, Any]) -> bytes:
        return event("content_block_delta", {"index": self._index, "delta": delta})

    def _end(self) -> list[bytes]:
        self.is_done = True
        reason = stop_reason(self._finish or "stop", self._has_tools)
        delta = {"stop_reason": reason, "stop_sequence": None}
        return [
            *self._close(),
            event("message_delta", {"delta": delta, "usage": usage(self._usage)}),
            event("message_stop", {}),
        ]


def event(name: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps({"type": name, **data}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()
