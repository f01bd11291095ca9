"""A request body the gateway and the engine read the same way: read with a cap, parsed strictly.

The gateway forwards the client's bytes, so whatever it decides from the parsed body must be
what the engine will decide from those bytes (security review findings 1, 6 and 16):

- a key given twice in one object is refused: parsers disagree on which one wins (Python's
  keeps the last, others the first), so the gateway could check one `model` and the engine
  serve another;
- `stream` and `stream_options.include_usage` must be true, false or null: an engine's lax
  parser turns `"true"` or `1` into a stream that the gateway would relay as a whole answer;
- nesting deeper than MAX_DEPTH is refused: on Python 3.11 `json.dumps` runs out of recursion a
  little before `json.loads` does, so a body the parser took could fail when re-serialised.
"""

import json
from typing import Any

from starlette.requests import Request

from gateway.errors import BadRequest, TooLarge

MAX_DEPTH = 128  # arrays and objects inside one another; OpenAI bodies need a dozen or so


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with TooLarge as soon as it passes `max_bytes`."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise TooLarge(f"request body over {max_bytes} bytes")
    # A running count, not request.body(): a chunked body announces no length, and
    # buffering all of it before refusing would let one client fill the gateway's memory.
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"request body over {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object whose fields mean one thing; BadRequest otherwise."""
    try:
        body = json.loads(raw, object_pairs_hook=_unique_keys)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # `[[[[...` deeper than the interpreter's recursion limit
        body = None
    # Counting brackets is a bound on the depth that costs next to nothing; only a body with
    # many of them is walked.
    if body is None or (raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(body)):
        raise BadRequest(f"request body is not valid JSON: nested deeper than {MAX_DEPTH}")
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    _check_bool(body, "stream", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("`stream_options` must be an object or null", "stream_options")
        _check_bool(options, "include_usage", "stream_options.include_usage")
    return body


def dumps(body: dict[str, Any]) -> bytes:
    """A parsed body as bytes again (to send it changed)."""
    return json.dumps(body).encode()


def is_json(content_type: str | None) -> bool:
    """`application/json`, with or without parameters (`; charset=utf-8`)."""
    if content_type is None:
        return False
    return content_type.partition(";")[0].strip().lower() == "application/json"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadRequest(f"request body has the key `{key}` more than once", key)
            seen.add(key)
    return obj


def _too_deep(body: object) -> bool:
    """Whether arrays and objects nest deeper than MAX_DEPTH (level by level, no recursion)."""
    level = [body] if isinstance(body, dict | list) else []
    for _ in range(MAX_DEPTH):
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def _check_bool(obj: dict[str, Any], key: str, param: str) -> None:
    value = obj.get(key)
    if value is not None and not isinstance(value, bool):
        given = json.dumps(value)
        given = given if len(given) <= 40 else given[:37] + "..."
        raise BadRequest(f"`{param}` must be true or false, not {given}", param)
