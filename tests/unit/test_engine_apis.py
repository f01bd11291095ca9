"""The engine API table, typed-event streams, Anthropic's conventions and response pins."""

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from backends.adapters import ADAPTERS
from backends.base import ENGINE_APIS
from gateway import anthropic
from gateway.config import GatewayConfig
from gateway.engine_api import ROUTES, check_served, stored_route
from gateway.errors import ApiNotServed, NoReadyReplica, ResponseNotFound, Unauthorized
from gateway.pins import ResponsePins
from gateway.store import Store
from gateway.tenancy import Tenancy, config_keys
from gateway.typed_sse import TypedEventReader, chat_usage

RESPONSE_STREAM = (
    b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1"}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"}\n\n'
    b"event: response.completed\r\n"
    b'data: {"type":"response.completed","response":{"id":"resp_1",'
    b'"usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}}\r\n\r\n'
)
MESSAGE_STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"m",'
    b'"usage":{"input_tokens":4,"output_tokens":1}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":9}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
@pytest.mark.parametrize(
    ("stream", "usage"),
    [(RESPONSE_STREAM, (5, 7)), (MESSAGE_STREAM, (4, 9))],
    ids=["responses", "messages"],
)
def test_typed_events_pass_unchanged_and_yield_usage(
    stream: bytes, usage: tuple[int, int], size: int
) -> None:
    """Fed in pieces of `size` bytes (events split anywhere), every byte comes out at once."""
    ids: list[str] = []
    reader = TypedEventReader(ids.append)
    out = b"".join(reader.feed(stream[i : i + size]) for i in range(0, len(stream), size))
    assert out + reader.flush() == stream
    assert reader.failure is None
    assert reader.usage == {"prompt_tokens": usage[0], "completion_tokens": usage[1]}
    assert reader.is_done
    assert ids == (["resp_1"] if stream is RESPONSE_STREAM else [])


def test_a_replayed_stream_counts_no_tokens() -> None:
    reader = TypedEventReader(counts_usage=False)
    reader.feed(RESPONSE_STREAM)
    assert reader.usage is None and reader.is_done


def test_an_unreadable_typed_event_fails_the_stream() -> None:
    reader = TypedEventReader()
    reader.feed(b"event: message_start\ndata: {not json\n\n")
    assert reader.failure is not None and "could not read" in reader.failure


def test_chat_usage_names() -> None:
    assert chat_usage({"input_tokens": 1, "output_tokens": 2}) == {
        "prompt_tokens": 1,
        "completion_tokens": 2,
    }
    assert chat_usage({"prompt_tokens": 3}) == {"prompt_tokens": 3}
    assert chat_usage(None) is None


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/v1/responses/resp_1", ("GET", "/responses/resp_1", "resp_1")),
        ("/v1/responses/resp_1/cancel", ("POST", "/responses/resp_1/cancel", "resp_1")),
        ("/v1/responses/a%2Fb", ("GET", "/responses/a%252Fb", "a%2Fb")),  # quoted again
        ("/v1/responses/", None),
        ("/v1/responses/resp_1/input_items", None),
        ("/v1/other/resp_1", None),
    ],
)
def test_stored_routes(path: str, want: tuple[str, str, str] | None) -> None:
    found = stored_route(path)
    got = None if found is None else (found[0].method, found[0].path, found[1])
    assert got == want


def test_tokenize_is_at_the_engine_root_and_the_rest_under_v1() -> None:
    base = "http://localhost/v1"
    assert ROUTES["/tokenize"].url(base) == "http://localhost/tokenize"
    assert ROUTES["/v1/messages"].url(base) == "http://localhost/v1/messages"
    assert ROUTES["/v1/rerank"].url(base) == "http://localhost/v1/rerank"


def test_every_adapter_declares_known_apis() -> None:
    for name, adapter in ADAPTERS.items():
        assert adapter.apis <= ENGINE_APIS, name
    assert {r.api for r in ROUTES.values()} - {None} <= ENGINE_APIS


@pytest.mark.parametrize("api", ["rerank", "score", "tokenize", "stored_responses"])
def test_lmdeploy_is_refused_what_it_lacks_by_name(api: str) -> None:
    with pytest.raises(ApiNotServed, match="model `m` runs on lmdeploy, which does not serve"):
        check_served(api, "m", "lmdeploy")


@pytest.mark.parametrize("backend", ["vllm", "sglang", "lmdeploy", "external"])
def test_chat_messages_and_responses_go_to_every_engine(backend: str) -> None:
    for api in (None, "messages", "responses"):
        check_served(api, "m", backend)


def request(headers: dict[str, str]) -> Request:
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "headers": raw, "method": "POST", "path": "/"})


@pytest.mark.parametrize(
    ("headers", "want"),
    [
        ({"x-api-key": "k2"}, "key-1"),
        ({"authorization": "Bearer k1"}, "key-0"),
        ({"authorization": "Bearer k1", "x-api-key": "wrong"}, "key-0"),  # Bearer wins
        ({"x-api-key": "wrong"}, Unauthorized),
        ({}, Unauthorized),
    ],
)
def test_anthropic_auth_takes_x_api_key(headers: dict[str, str], want: Any, tmp_path: Path) -> None:
    config = GatewayConfig.model_validate({"api_keys": ["k1", "k2"]})
    keys = Tenancy(config_keys(config), Store("sqlite", tmp_path), allow_open=False)
    if want is Unauthorized:
        with pytest.raises(Unauthorized):
            anthropic.authenticate(keys, request(headers))
    else:
        assert anthropic.authenticate(keys, request(headers)).name == want


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error")]
    + [(429, "rate_limit_error"), (502, "api_error"), (503, "overloaded_error")]
    + [(504, "timeout_error"), (415, "invalid_request_error")],
)
def test_anthropic_error_types_follow_the_status(status: int, kind: str) -> None:
    body = anthropic.error_body(status, "why")
    assert body == {"type": "error", "error": {"type": kind, "message": "why"}}


def fake_worker(worker_id: str, started_at: float, ready: bool = True) -> Any:
    state = SimpleNamespace(value="ready" if ready else "unhealthy")
    return SimpleNamespace(id=worker_id, started_at=started_at, is_ready=ready, state=state)


def test_pins_name_the_replica_and_tell_a_restart_apart() -> None:
    workers = {"m-0": fake_worker("m-0", 1.0), "m-1": fake_worker("m-1", 1.0)}
    supervisor: Any = SimpleNamespace(get=workers.get)
    pins = ResponsePins(limit=2)
    pins.remember("r0", workers["m-0"])
    pins.remember("r1", workers["m-1"])
    assert pins.replica("r1", supervisor) is workers["m-1"]
    workers["m-0"] = fake_worker("m-0", 2.0)  # restarted: a new life, an empty store
    with pytest.raises(ResponseNotFound, match="restarted since"):
        pins.replica("r0", supervisor)
    workers["m-1"] = fake_worker("m-1", 1.0, ready=False)
    with pytest.raises(NoReadyReplica, match="unhealthy"):
        pins.replica("r1", supervisor)
    pins.remember("r2", workers["m-0"])  # over the limit: the oldest pin goes
    with pytest.raises(ResponseNotFound, match="not made through this gateway"):
        pins.replica("r0", supervisor)
