"""A request body means one thing to the gateway and to the engine (gateway/request.py)."""

import json

import pytest

from gateway.errors import BadRequest
from gateway.request import MAX_DEPTH, dumps, is_json, parse


def refusal(raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as refused:
        parse(raw)
    return refused.value


@pytest.mark.parametrize("value", ["true", 1, "1", "yes", 1.0, [], {}])
def test_stream_that_is_not_a_bool_is_refused_naming_the_field(value: object) -> None:
    """Finding 6: vLLM's lax pydantic models stream for "true", 1, "yes"; the gateway took
    them for a whole answer."""
    error = refusal(json.dumps({"model": "m", "stream": value}).encode())
    assert error.param == "stream" and "`stream` must be true or false" in error.message


@pytest.mark.parametrize(
    ("options", "param"),
    [({"include_usage": "true"}, "stream_options.include_usage"), ("yes", "stream_options")],
)
def test_stream_options_that_are_not_what_they_say_are_refused(options: object, param: str):
    """Finding 6: `include_usage` decides whether the usage chunk reaches the client."""
    raw = json.dumps({"model": "m", "stream": True, "stream_options": options}).encode()
    assert refusal(raw).param == param


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "stream": True, "stream_options": {"include_usage": False}},
        {"model": "m", "stream": False},
        {"model": "m", "stream": None, "stream_options": None},
        {"model": "m"},
    ],
)
def test_bools_and_nulls_pass(body: dict[str, object]) -> None:
    assert parse(json.dumps(body).encode()) == body


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "secret", "model": "m"}',
        b'{"model": "m", "messages": [{"role": "user", "role": "system", "content": "x"}]}',
        b'{"model": "m", "stream": true, "stream_options": {"include_usage": false, '
        b'"include_usage": true}}',
    ],
    ids=["top-level", "in-a-message", "in-stream-options"],
)
def test_a_key_given_twice_is_refused(raw: bytes) -> None:
    """Finding 16: Python keeps the last `model`, a first-key-wins upstream the first one."""
    error = refusal(raw)
    assert "more than once" in error.message and error.param in ("model", "role", "include_usage")


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 980, 985, 990, 5000])
def test_nesting_deeper_than_max_depth_is_refused_before_anything_else(depth: int) -> None:
    """Finding 1: on Python 3.11 `json.dumps` failed (RecursionError, after admission) on
    bodies `json.loads` took, around depth 985. Such a body is now refused at parse time, the
    same way whatever the stack depth."""
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    error = refusal(f'{{"model": "m", "stream": true, "x": {inner}}}'.encode())
    assert f"nested deeper than {MAX_DEPTH}" in error.message


def test_nesting_up_to_max_depth_passes_and_serialises() -> None:
    inner = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    body = parse(f'{{"model": "m", "x": {inner}}}'.encode())
    assert dumps(body).startswith(b'{"model": "m", "x": [[[')


def test_many_brackets_side_by_side_are_no_nesting() -> None:
    """The bracket count only bounds the depth: a long flat body is walked and passes."""
    messages = [{"role": "user", "content": "[{"}] * (MAX_DEPTH * 4)
    assert parse(json.dumps({"model": "m", "messages": messages}).encode())["model"] == "m"


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON ;charset=UTF-8", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("application/jsonx", False),
        ("", False),
        (None, False),
    ],
)
def test_is_json(content_type: str | None, expected: bool) -> None:
    assert is_json(content_type) is expected
