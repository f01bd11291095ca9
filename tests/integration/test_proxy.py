"""The real gateway process in front of scripted upstream processes: proxy edge cases.

One gateway serves every test in this module; each model points at an upstream scripted for
one behaviour (see MODELS). Tests read the upstreams' /stats before and after, so they do not
depend on their order, except the last one, which kills its upstream.
"""

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fakes.metrics import sample_values

from backends.base import Slot
from backends.spec import ModelSpec
from backends.supervisor import Supervisor, Timings
from gateway.app import create_app
from gateway.config import Config, GatewayConfig

from .servers import Spawner, Upstream, free_port, start_gateway, start_upstream, wait_upstream

GATEWAY_KEY = "gw-test-key-7d2e"
UPSTREAM_KEY = "upstream-secret-41ab"
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}
MAX_BODY = 4096
READ_TIMEOUT = 2.0
INTERVAL = 0.2  # seconds between the `ok` upstream's SSE events

# upstream name -> flags; each serves a model of its own name
UPSTREAMS: dict[str, list[str]] = {
    "ok": ["--api-key", UPSTREAM_KEY, "--interval", str(INTERVAL)],
    "flat400": ["--fail-status", "400", "--error-style", "flat"],
    "bare500": ["--fail-status", "500", "--error-style", "bare"],
    "down503": ["--fail-status", "503", "--error-style", "nested"],
    "flaky": ["--fail-status", "503", "--fail-first", "1"],
    "dropper": ["--drop-after", "2", "--interval", "0.05"],
    "slow": ["--first-byte-delay", str(READ_TIMEOUT * 2)],
    "stall": ["--interval", str(READ_TIMEOUT * 2), "--chunks", "3"],  # idles after one event
    "doomed": [],
    "linger": ["--done-linger", "2", "--chunks", "2"],  # ends the response 2 s after [DONE]
    "badchoices": ["--malformed", "choices"],
    "badindex": ["--malformed", "index"],
    "endless": ["--malformed", "endless"],
}
# gateway model -> (upstream, extra model keys)
MODELS: dict[str, tuple[str, str]] = {
    **{name: (name, "") for name in UPSTREAMS},
    "ok": ("ok", f"api_key: {UPSTREAM_KEY}"),
    "alias": ("ok", f"api_key: {UPSTREAM_KEY}, upstream_model: ok"),
    "flaky": ("flaky", "replicas: 2"),
    "badindex": ("badindex", "reasoning: think_tags"),  # the gateway splits: it reads `index`
    "limited": ("ok", f"api_key: {UPSTREAM_KEY}, upstream_model: ok, max_in_flight: 2"),
}


@dataclass
class Fleet:
    base: str  # the gateway's root URL
    upstreams: dict[str, Upstream]
    spawner: Spawner


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """1. Start the upstreams; 2. write a config; 3. start the gateway; 4. wait for /ready."""
    tmp = tmp_path_factory.mktemp("proxy")
    spawner = Spawner(tmp / "logs")
    try:
        upstreams = {
            name: start_upstream(spawner, name, "--model", name, *flags)
            for name, flags in UPSTREAMS.items()
        }
        for upstream in upstreams.values():
            wait_upstream(spawner, upstream)
        port = free_port()
        config = tmp / "enginegate.yaml"
        config.write_text(gateway_config(port, tmp / "state", upstreams))
        start_gateway(spawner, config)
        base = f"http://127.0.0.1:{port}"
        spawner.wait_http("gateway", f"{base}/ready")
        yield Fleet(base, upstreams, spawner)
    finally:
        spawner.stop_all()


def gateway_config(port: int, state_dir: Path, upstreams: dict[str, Upstream]) -> str:
    models = "".join(
        f"  - {{name: {name}, backend: external, url: '{upstreams[upstream].url}'"
        + (f", {extra}" if extra else "")
        + "}\n"
        for name, (upstream, extra) in MODELS.items()
    )
    return f"""\
gateway:
  host: 127.0.0.1
  port: {port}
  api_keys: ["{GATEWAY_KEY}"]
  state_dir: {state_dir}
  max_body_bytes: {MAX_BODY}
  read_timeout: {READ_TIMEOUT}
  drain_timeout: 1
  stop_grace: 1
models:
{models}"""


def chat(model: str, **fields: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def read_events(response: httpx.Response, started: float) -> tuple[bytes, list[float]]:
    """The raw body, and when each SSE event was complete (seconds after `started`)."""
    raw, arrivals = b"", []
    for chunk in response.iter_raw():
        raw += chunk
        arrivals += [time.monotonic() - started] * (raw.count(b"\n\n") - len(arrivals))
    return raw, arrivals


def direct(fleet: Fleet, path: str, body: dict[str, object]) -> httpx.Response:
    """The same request straight to the `ok` upstream, past the gateway."""
    return httpx.post(
        f"{fleet.upstreams['ok'].url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
        timeout=10,
    )


def test_stream_arrives_event_by_event_and_byte_identical(fleet: Fleet) -> None:
    """1. Stream 5 events through the gateway, timing each; 2. fetch the same stream from the
    upstream directly; 3. the bytes match (the usage chunk the gateway asked for on its own
    behalf is gone again), and the events arrived spread out as they were sent."""
    count = 5
    body = chat("ok", stream=True, max_tokens=count)
    with httpx.Client(timeout=10) as client:
        started = time.monotonic()
        url = f"{fleet.base}/v1/chat/completions"
        with client.stream("POST", url, json=body, headers=AUTH) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            relayed, arrivals = read_events(response, started)
    assert relayed == direct(fleet, "/chat/completions", body).content
    assert relayed.endswith(b"data: [DONE]\n\n")
    assert len(arrivals) == count + 1
    # The upstream spends count * INTERVAL between its first and last event. A buffering proxy
    # would deliver them all at once; allow for scheduling jitter, not for buffering.
    assert arrivals[-1] - arrivals[0] >= count * INTERVAL * 0.6, arrivals
    assert arrivals[0] < arrivals[-1] - 2 * INTERVAL, arrivals


def test_stream_usage_reaches_a_client_that_asked_for_it(fleet: Fleet) -> None:
    body = chat("ok", stream=True, max_tokens=2, stream_options={"include_usage": True})
    relayed = httpx.post(f"{fleet.base}/v1/chat/completions", json=body, headers=AUTH, timeout=10)
    assert relayed.status_code == 200
    assert relayed.content == direct(fleet, "/chat/completions", body).content
    assert b'"usage": {"prompt_tokens": 1, "completion_tokens": 2' in relayed.content


def test_non_streaming_answer_is_relayed_unchanged(fleet: Fleet) -> None:
    body = {"model": "ok", "prompt": "hi", "max_tokens": 3}
    relayed = httpx.post(f"{fleet.base}/v1/completions", json=body, headers=AUTH, timeout=10)
    assert relayed.status_code == 200
    assert relayed.content == direct(fleet, "/completions", body).content
    assert relayed.json()["choices"][0]["text"] == "tok0 tok1 tok2 "


@pytest.mark.parametrize("is_stream", [False, True], ids=["whole", "stream"])
def test_upstream_model_name_is_sent_upstream_and_hidden_from_the_client(
    fleet: Fleet, is_stream: bool
) -> None:
    """`alias` is served by the `ok` upstream under the name `ok`, which 404s any other name."""
    body = chat("alias", stream=is_stream, max_tokens=2)
    relayed = httpx.post(f"{fleet.base}/v1/chat/completions", json=body, headers=AUTH, timeout=10)
    assert relayed.status_code == 200, relayed.text
    upstream = direct(fleet, "/chat/completions", {**body, "model": "ok"})
    if is_stream:
        got, want = sse_objects(relayed.content), sse_objects(upstream.content)
    else:
        got, want = [relayed.json()], [upstream.json()]
    assert [o["model"] for o in want] == ["ok"] * len(want)
    assert got == [{**o, "model": "alias"} for o in want]


def sse_objects(raw: bytes) -> list[dict]:
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_client_disconnect_mid_stream_closes_the_upstream_stream(fleet: Fleet) -> None:
    """1. Start a 100-event stream; 2. read two events and hang up; 3. the upstream sees its
    stream cut short well before it would have finished (100 * INTERVAL seconds); 4. the
    gateway's books are settled: nothing in flight, the request counted as 499."""
    upstream = fleet.upstreams["ok"]
    before = upstream.stats()
    with httpx.Client(timeout=10) as client:
        body = chat("ok", stream=True, max_tokens=100)
        with client.stream(
            "POST", f"{fleet.base}/v1/chat/completions", json=body, headers=AUTH
        ) as response:
            assert response.status_code == 200
            seen = b""
            for chunk in response.iter_raw():
                seen += chunk
                if seen.count(b"\n\n") >= 2:
                    break
    after = wait_for_stats(upstream, "cancelled", before["cancelled"] + 1, timeout=5)
    assert after["started"] == before["started"] + 1
    assert after["completed"] == before["completed"]
    assert gateway_metric(fleet, "enginegate_requests_in_flight", model="ok") == 0
    assert gateway_metric(fleet, "enginegate_requests_total", model="ok", status="499") >= 1


def test_client_leaving_right_after_done_counts_as_a_whole_answer(fleet: Fleet) -> None:
    """1. Stream from an upstream that ends its response 2 s after `data: [DONE]`; 2. hang up
    at [DONE], as SDKs do; 3. the gateway counts a 200, not a 499: the answer was whole."""
    before = gateway_metric(fleet, "enginegate_requests_total", model="linger", status="200")
    with httpx.Client(timeout=10) as client:
        body = chat("linger", stream=True)
        with client.stream(
            "POST", f"{fleet.base}/v1/chat/completions", json=body, headers=AUTH
        ) as response:
            seen = b""
            for chunk in response.iter_raw():
                seen += chunk
                if b"data: [DONE]" in seen:
                    break
    deadline = time.monotonic() + 5
    while gateway_metric(fleet, "enginegate_requests_in_flight", model="linger"):
        assert time.monotonic() < deadline, "the request is still in flight"
        time.sleep(0.05)
    after = gateway_metric(fleet, "enginegate_requests_total", model="linger", status="200")
    assert after == before + 1
    assert gateway_metric(fleet, "enginegate_requests_total", model="linger", status="499") == 0


@pytest.mark.parametrize("is_stream", [True, False], ids=["stream", "whole"])
def test_client_giving_up_before_the_first_byte_cancels_the_upstream_request(
    fleet: Fleet, is_stream: bool
) -> None:
    """1. Ask the slow upstream; 2. give up before its first byte; 3. it sees the hang-up
    before the gateway's own read timeout would have closed the request anyway."""
    upstream = fleet.upstreams["slow"]
    before = upstream.stats()
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{fleet.base}/v1/chat/completions",
            json=chat("slow", stream=is_stream),
            headers=AUTH,
            timeout=httpx.Timeout(10, read=0.3),
        )
    after = wait_for_stats(upstream, "cancelled", before["cancelled"] + 1, timeout=READ_TIMEOUT)
    assert time.monotonic() - started < READ_TIMEOUT * 0.9
    assert after["started"] == before["started"]
    assert gateway_metric(fleet, "enginegate_requests_in_flight", model="slow") == 0


def gateway_metric(fleet: Fleet, name: str, **labels: str) -> float:
    """A sample of the gateway's own /metrics (summed over the other labels)."""
    return sum(sample_values(httpx.get(f"{fleet.base}/metrics").text, name, **labels))


def wait_for_stats(upstream: Upstream, key: str, value: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while (stats := upstream.stats())[key] < value:
        assert time.monotonic() < deadline, f"{upstream.name}: {key} stayed below {value}: {stats}"
        time.sleep(0.05)
    return stats


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({}, "missing API key"),
        ({"Authorization": "Bearer not-the-key"}, "invalid API key"),
        ({"Authorization": GATEWAY_KEY}, "missing API key"),
    ],
)
def test_requests_without_the_right_key_get_401(
    fleet: Fleet, headers: dict[str, str], says: str
) -> None:
    before = fleet.upstreams["ok"].stats()
    response = httpx.post(f"{fleet.base}/v1/chat/completions", json=chat("ok"), headers=headers)
    error = assert_openai_error(response, 401)
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert says in str(error["message"])
    assert fleet.upstreams["ok"].stats()["requests"] == before["requests"]


def test_unknown_model_gets_404_naming_the_models(fleet: Fleet) -> None:
    response = httpx.post(f"{fleet.base}/v1/chat/completions", json=chat("nope"), headers=AUTH)
    error = assert_openai_error(response, 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "`nope`" in str(error["message"]) and "ok" in str(error["message"])


def test_unknown_model_named_by_a_lone_surrogate_gets_404(fleet: Fleet) -> None:
    """JSON can carry "\\ud800", which UTF-8 cannot encode; the error quoting it must not
    turn into a bare 500 (found by tests/integration/test_fuzz.py)."""
    content = b'{"model": "x\\ud800", "messages": []}'
    response = httpx.post(
        f"{fleet.base}/v1/chat/completions",
        content=content,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert assert_openai_error(response, 404)["code"] == "model_not_found"


@pytest.mark.parametrize(
    "content",
    [b'{"model": "ok", "messages": [', b"[1, 2]", b"", b"[" * 2000 + b"]" * 2000],
    ids=["truncated", "array", "empty", "nested-2000"],
)
def test_malformed_json_gets_400(fleet: Fleet, content: bytes) -> None:
    response = httpx.post(
        f"{fleet.base}/v1/chat/completions",
        content=content,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("is_chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_max_body_bytes_gets_413(fleet: Fleet, is_chunked: bool) -> None:
    before = fleet.upstreams["ok"].stats()
    raw = json.dumps(chat("ok", padding="x" * MAX_BODY)).encode()
    content: bytes | Iterator[bytes] = iter([raw[:100], raw[100:]]) if is_chunked else raw
    response = httpx.post(
        f"{fleet.base}/v1/chat/completions",
        content=content,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    error = assert_openai_error(response, 413)
    assert error["code"] == "request_too_large"
    assert fleet.upstreams["ok"].stats()["requests"] == before["requests"]


def test_chunked_body_over_the_limit_is_refused_before_it_ends(fleet: Fleet) -> None:
    """1. Send a chunked body past MAX_BODY and keep the connection open without ending it;
    2. the gateway answers 413 at once instead of waiting for (and buffering) the rest."""
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {GATEWAY_KEY}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"x" * (MAX_BODY + 1)
    port = int(fleet.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        reply = _read_reply(sock)  # no terminating 0-size chunk was sent
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert b'"code":"request_too_large"' in reply


def _read_reply(sock: socket.socket) -> bytes:
    """One response with a content-length, head and body: they may come in separate reads."""
    reply = b""
    while b"\r\n\r\n" not in reply and (data := sock.recv(65536)):
        reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
         if line.startswith(b"content-length:")), 0,
    )  # fmt: skip
    while len(body) < length and (data := sock.recv(65536)):
        body += data
    return head + b"\r\n\r\n" + body


def test_503_from_one_replica_is_retried_on_the_other(fleet: Fleet) -> None:
    """`flaky` has two replicas of one upstream that answers its first request with 503."""
    upstream = fleet.upstreams["flaky"]
    assert upstream.stats()["requests"] == 0, "`flaky` fails only its first request ever"
    response = httpx.post(f"{fleet.base}/v1/chat/completions", json=chat("flaky"), headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"
    after = upstream.stats()
    assert (after["requests"], after["failed"]) == (2, 1)


async def test_503_on_one_of_two_distinct_upstreams_is_retried(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Two replicas on two different upstream processes, one always answering 503.

    A config gives an external model one URL, so the two replicas are wired by hand here
    into the gateway's own app (served in-process through httpx's ASGI transport).
    1. Start a supervisor over both; 2. send 6 requests; 3. all succeed, and the failing
    upstream did get some of them first.
    """
    good, bad = fleet.upstreams["ok"], fleet.upstreams["down503"]
    good_spec = ModelSpec(
        name="pair",
        backend="external",
        url=good.url,
        api_key=UPSTREAM_KEY,
        upstream_model="ok",
    )
    bad_spec = ModelSpec(name="pair", backend="external", url=bad.url)
    slots = [Slot("pair-0", bad_spec, 0), Slot("pair-1", good_spec, 1)]
    gateway = GatewayConfig(api_keys=[GATEWAY_KEY], state_dir=tmp_path)
    config = Config(gateway=gateway, models=[good_spec])
    client = httpx.AsyncClient(timeout=10)
    supervisor = Supervisor(slots, tmp_path, client, timings=Timings(startup_poll=0.05))
    app = create_app(config, supervisor, client)
    before_bad, before_good = bad.stats(), good.stats()
    await supervisor.start()
    try:
        assert await supervisor.wait_ready(timeout=10)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as caller:
            sends = [
                caller.post("/v1/chat/completions", json=chat("pair"), headers=AUTH)
                for _ in range(6)
            ]
            responses = await asyncio.gather(*sends)
    finally:
        await supervisor.stop()
        await client.aclose()
    assert [r.status_code for r in responses] == [200] * 6
    bad_hits = bad.stats()["failed"] - before_bad["failed"]
    assert bad_hits >= 1, "the failing replica was never chosen: the test proved nothing"
    assert good.stats()["requests"] - before_good["requests"] == 6


@pytest.mark.parametrize(
    ("model", "status", "type"),
    [("flat400", 400, "ScriptedError"), ("down503", 503, "ScriptedError")],
)
def test_upstream_errors_come_back_in_openai_shape(
    fleet: Fleet, model: str, status: int, type: str
) -> None:
    """SGLang-style flat and vLLM-style nested bodies; a single replica's 503 is not retried."""
    response = httpx.post(f"{fleet.base}/v1/chat/completions", json=chat(model), headers=AUTH)
    error = assert_openai_error(response, status)
    assert error == {
        "message": f"scripted failure {status}",
        "type": type,
        "param": None,
        "code": status,
    }


def test_bare_upstream_error_gets_a_type(fleet: Fleet) -> None:
    response = httpx.post(f"{fleet.base}/v1/chat/completions", json=chat("bare500"), headers=AUTH)
    error = assert_openai_error(response, 500)
    assert error == {
        "message": "scripted failure 500",
        "type": "upstream_error",
        "param": None,
        "code": 500,
    }


def test_upstream_dropping_mid_stream_ends_with_an_error_event(fleet: Fleet) -> None:
    """The upstream cuts the connection after two events; the client gets those two, then
    an OpenAI-shaped error event and [DONE], never a silently truncated stream."""
    response = httpx.post(
        f"{fleet.base}/v1/chat/completions",
        json=chat("dropper", stream=True, max_tokens=5),
        headers=AUTH,
        timeout=10,
    )
    assert response.status_code == 200
    events = response.content.split(b"\n\n")
    assert events[-1] == b""
    assert [json.loads(e.removeprefix(b"data: "))["choices"][0]["delta"] for e in events[:2]] == [
        {"content": "tok0 "},
        {"content": "tok1 "},
    ]
    error = json.loads(events[2].removeprefix(b"data: "))["error"]
    assert error["type"] == "upstream_error" and "mid-stream" in error["message"]
    assert events[3:] == [b"data: [DONE]", b""]


def test_upstream_slower_than_read_timeout_gets_504(fleet: Fleet) -> None:
    started = time.monotonic()
    response = httpx.post(
        f"{fleet.base}/v1/chat/completions", json=chat("slow"), headers=AUTH, timeout=10
    )
    error = assert_openai_error(response, 504)
    assert error["code"] == "upstream_timeout"
    assert time.monotonic() - started < READ_TIMEOUT * 2


def test_upstream_idle_past_read_timeout_mid_stream_ends_with_an_error_event(
    fleet: Fleet,
) -> None:
    """`stall` sends one event, then nothing for twice the gateway's read timeout: the client
    gets that event, an error event and [DONE] once the read timeout has passed."""
    started = time.monotonic()
    response = httpx.post(
        f"{fleet.base}/v1/chat/completions",
        json=chat("stall", stream=True),
        headers=AUTH,
        timeout=10,
    )
    assert response.status_code == 200
    events = [e.removeprefix(b"data: ") for e in response.content.split(b"\n\n") if e]
    assert json.loads(events[0])["choices"][0]["delta"] == {"content": "tok0 "}
    error = json.loads(events[1])["error"]
    assert error["type"] == "upstream_error" and "read_timeout" in error["message"], error
    assert events[2:] == [b"[DONE]"]
    assert READ_TIMEOUT <= time.monotonic() - started < READ_TIMEOUT * 2


def test_killed_upstream_gives_an_openai_5xx_not_a_hang(fleet: Fleet) -> None:
    """1. SIGKILL the only upstream of `doomed`; 2. a request fails fast with 502 or 503."""
    fleet.spawner.stop("doomed", signum=signal.SIGKILL)
    started = time.monotonic()
    response = httpx.post(
        f"{fleet.base}/v1/chat/completions", json=chat("doomed"), headers=AUTH, timeout=10
    )
    error = assert_openai_error(response, response.status_code)
    assert response.status_code in (502, 503)
    assert error["type"] in ("upstream_error", "service_unavailable")
    assert time.monotonic() - started < 5


def post_raw(
    fleet: Fleet, content: bytes, content_type: str = "application/json"
) -> httpx.Response:
    headers = {**AUTH, "Content-Type": content_type}
    url = f"{fleet.base}/v1/chat/completions"
    return httpx.post(url, content=content, headers=headers, timeout=10)


def test_nested_body_never_leaks_an_admission_slot(fleet: Fleet) -> None:
    """Finding 1: streams nested about as deep as Python 3.11's JSON encoder can go (it gave
    up where the parser did not, after admission) are each refused or served, and the slots of
    the `max_in_flight: 2` model all come back: a plain request is still served, not a 429."""
    for depth in range(970, 1000):
        body = json.dumps(chat("limited", stream=True, max_tokens=1))[:-1]
        content = f'{body}, "x": {"[" * depth}{"]" * depth}}}'.encode()
        response = post_raw(fleet, content)
        assert response.status_code in (200, 400), (depth, response.text)
    assert gateway_metric(fleet, "enginegate_requests_in_flight", model="limited") == 0
    for _ in range(3):
        response = httpx.post(
            f"{fleet.base}/v1/chat/completions", json=chat("limited"), headers=AUTH, timeout=10
        )
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": "true"}, "stream"),
        ({"stream": 1}, "stream"),
        (
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
        ({"stream": True, "stream_options": "include_usage"}, "stream_options"),
    ],
    ids=["stream-str", "stream-int", "include-usage-str", "options-str"],
)
def test_stream_fields_that_are_not_bools_get_400(
    fleet: Fleet, fields: dict[str, object], param: str
) -> None:
    """Finding 6: an engine's lax parser would stream for `"stream": "true"` while the gateway
    relayed a whole answer (no usage counted, no alias, no disconnect passed on): refused."""
    before = fleet.upstreams["ok"].stats()["requests"]
    response = httpx.post(
        f"{fleet.base}/v1/chat/completions", json=chat("ok", **fields), headers=AUTH, timeout=10
    )
    error = assert_openai_error(response, 400)
    assert error["param"] == param
    assert fleet.upstreams["ok"].stats()["requests"] == before


def test_duplicate_keys_get_400(fleet: Fleet) -> None:
    """Finding 16: with `model` twice, a first-key-wins upstream could serve a model nobody
    exposed; the gateway keeps the last. Such a body is refused before it goes anywhere."""
    before = fleet.upstreams["ok"].stats()["requests"]
    response = post_raw(fleet, b'{"model": "secret", "model": "ok", "messages": []}')
    error = assert_openai_error(response, 400)
    assert error["param"] == "model" and "more than once" in str(error["message"])
    assert fleet.upstreams["ok"].stats()["requests"] == before


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("", 415),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
    ],
)
def test_a_body_not_sent_as_json_gets_415(fleet: Fleet, content_type: str, status: int) -> None:
    """Finding 18: a web page can POST `text/plain` to another site without asking (a "simple"
    request), so a proxied POST must say it is JSON."""
    response = post_raw(fleet, json.dumps(chat("ok")).encode(), content_type)
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        assert assert_openai_error(response, 415)["code"] == "unsupported_media_type"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_a_proxied_route_with_another_method_gets_405(fleet: Fleet, method: str, path: str) -> None:
    response = httpx.request(method, f"{fleet.base}{path}", headers=AUTH, timeout=10)
    assert assert_openai_error(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"


@pytest.mark.parametrize("model", ["badchoices", "badindex"])
def test_a_malformed_chunk_ends_the_stream_with_an_error_event(fleet: Fleet, model: str) -> None:
    """Finding 9: a good event, then in the same write a chunk the rewriter cannot read
    (`"choices": 5`; an `index` that is a list, where the gateway splits think tags). The
    client gets the good event, an error event and [DONE]; the request counts as a 502."""
    before = gateway_metric(fleet, "enginegate_requests_total", model=model, status="502")
    response = httpx.post(
        f"{fleet.base}/v1/chat/completions",
        json=chat(model, stream=True),
        headers=AUTH,
        timeout=10,
    )
    assert response.status_code == 200
    events = [e.removeprefix(b"data: ") for e in response.content.split(b"\n\n")]
    assert json.loads(events[0])["choices"][0]["index"] == 0
    error = json.loads(events[1])["error"]
    assert error["type"] == "upstream_error" and f"worker {model}-0" in error["message"], error
    assert events[2:] == [b"[DONE]", b""]
    after = gateway_metric(fleet, "enginegate_requests_total", model=model, status="502")
    assert after == before + 1


def test_an_event_that_never_ends_is_cut_at_the_cap(fleet: Fleet) -> None:
    """Finding 8: after one event the upstream sends 8 MiB without a blank line. The gateway
    does not buffer (and rescan) it all: past MAX_EVENT_BYTES the client gets an error event
    and [DONE], quickly, and the gateway's /health stays fast meanwhile."""
    started = time.monotonic()
    response = httpx.post(
        f"{fleet.base}/v1/chat/completions",
        json=chat("endless", stream=True),
        headers=AUTH,
        timeout=10,
    )
    assert time.monotonic() - started < 3
    events = [e.removeprefix(b"data: ") for e in response.content.split(b"\n\n")]
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "tok0 "
    error = json.loads(events[1])["error"]
    assert "over 4 MiB" in error["message"], error
    assert events[2:] == [b"[DONE]", b""]
    assert gateway_metric(fleet, "enginegate_requests_total", model="endless", status="502") == 1
