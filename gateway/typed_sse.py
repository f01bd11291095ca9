"""Streams of typed events (`event: NAME` then `data: {...}`): the Responses and Messages APIs.

Their bytes go to the client as they come, unchanged. On the way the reader looks at the few
events that say something the gateway needs:

    response.created                          the stored response's id (pins.py)
    response.completed|incomplete|failed      `response.usage`: input and output tokens
    message_start                             `message.usage.input_tokens`
    message_delta                             `usage.output_tokens` (a running total)
    message_stop, and the three response.*    the answer is whole

Usage is kept in chat completions' names (prompt_tokens, completion_tokens), which is what the
metrics count. The reader has EventRewriter's interface (sse.py), so relay.py takes either.
"""

import json
import re
from collections.abc import Callable
from typing import Any, Protocol

from gateway.sse import MAX_EVENT_BYTES

EVENT_END = re.compile(rb"\n\n|\r\n\r\n")  # the blank line that ends an event, LF or CRLF
RESPONSE_ENDS = (b"response.completed", b"response.incomplete", b"response.failed")
READ = (b"response.created", *RESPONSE_ENDS, b"message_start", b"message_delta")
ENDS = (*RESPONSE_ENDS, b"message_stop")


class StreamReader(Protocol):
    """What relay.py feeds a stream through: sse.EventRewriter, TypedEventReader and
    anthropic_chat.MessagesStream."""

    is_done: bool  # the answer is whole
    failure: str | None  # why the stream cannot go on
    error: Exception | None  # what was raised, for the log

    @property
    def usage(self) -> dict[str, Any] | None: ...

    def feed(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


def chat_usage(usage: Any) -> dict[str, Any] | None:
    """Responses' and Messages' usage (`input_tokens`, `output_tokens`) in chat's names; chat
    usage unchanged."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" not in usage and "output_tokens" not in usage:
        return usage
    return {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
    }


class TypedEventReader:
    def __init__(
        self, on_response_id: Callable[[str], None] | None = None, counts_usage: bool = True
    ) -> None:
        """`counts_usage` False: a stored response replayed, whose tokens were counted when it
        was made."""
        self.on_response_id = on_response_id
        self.counts_usage = counts_usage
        self._usage: dict[str, Any] = {}  # input_tokens, output_tokens as the events give them
        self.is_done = False
        self.failure: str | None = None
        self.error: Exception | None = None
        self._pending = bytearray()  # the start of an event whose end has not come yet
        self._scanned = 0  # bytes of _pending known to hold no event end

    def feed(self, data: bytes) -> bytes:
        """`data` itself, once the events it completes have been looked at."""
        pending = self._pending
        pending += data
        start = 0  # of the next event
        try:
            while found := EVENT_END.search(pending, self._scanned):
                self._look(bytes(pending[start : found.start()]))
                start = self._scanned = found.end()
        except Exception as exc:
            self.failure = f"sent an event the gateway could not read ({type(exc).__name__})"
            self.error = exc
        del pending[:start]
        self._scanned = max(0, len(pending) - 3)  # a separator may straddle two reads
        if len(pending) > MAX_EVENT_BYTES and self.failure is None:
            self.failure = f"sent an SSE event over {MAX_EVENT_BYTES // 2**20} MiB"
        return data

    @property
    def usage(self) -> dict[str, Any] | None:
        return chat_usage(self._usage) if self._usage and self.counts_usage else None

    def flush(self) -> bytes:
        self._pending.clear()
        return b""  # feed() passed every byte on already

    def _look(self, event: bytes) -> None:
        name, data = _fields(event)
        if name in ENDS:
            self.is_done = True
        if name not in READ or data is None:
            return
        obj = json.loads(data)
        if name == b"message_start":
            self._usage.update(obj["message"].get("usage") or {})
        elif name == b"message_delta":
            self._usage.update(obj.get("usage") or {})
        elif name == b"response.created":
            response_id = obj["response"].get("id")
            if isinstance(response_id, str) and self.on_response_id is not None:
                self.on_response_id(response_id)
        else:
            self._usage.update(obj["response"].get("usage") or {})


def _fields(event: bytes) -> tuple[bytes | None, bytes | None]:
    """The event's name and its data (one `data:` line, as every engine sends)."""
    name = data = None
    for line in event.splitlines():
        if line.startswith(b"event:"):
            name = line[6:].strip()
        elif line.startswith(b"data:"):
            data = line[5:].strip()
    return name, data
