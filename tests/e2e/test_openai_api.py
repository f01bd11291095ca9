"""The OpenAI API through the shared gateway, as the OpenAI SDK and curl see it.

The tiny model has random weights: `ignore_eos` makes every answer exactly `max_tokens` long,
so token counts can be asserted exactly.
"""

import json
import subprocess
import time

import httpx
import openai
import pytest

MODELS = ["tiny", "tiny-tp2"]
MAX_TOKENS = 8
# vLLM sampling extension: do not stop at EOS, so a random model always hits max_tokens.
ALWAYS_FULL = {"ignore_eos": True}

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("model", MODELS)
def test_chat_completion_answers_with_the_requested_model(client, model):
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hello! How are you today?"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body=ALWAYS_FULL,
    )

    assert reply.object == "chat.completion"
    assert reply.model == model
    assert len(reply.choices) == 1
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens == MAX_TOKENS
    assert reply.usage.prompt_tokens > 0


@pytest.mark.parametrize("model", MODELS)
def test_chat_stream_ends_with_a_usage_chunk(client, model):
    max_tokens = 12
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count: 1 2 3"}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=ALWAYS_FULL,
    )
    with stream:
        chunks = list(stream)

    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk.model == model for chunk in chunks)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta]
    assert len([text for text in content if text]) >= 2, chunks
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == max_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_legacy_completion(client):
    reply = client.completions.create(
        model="tiny",
        prompt="The quick brown fox",
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body=ALWAYS_FULL,
    )

    assert reply.object == "text_completion"
    assert reply.model == "tiny"
    assert isinstance(reply.choices[0].text, str)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == MAX_TOKENS


def _curl(gw, body: dict, tmp_path) -> tuple[bytes, str]:
    """POST body to /v1/chat/completions with curl; (raw response body, response headers)."""
    headers = tmp_path / "headers.txt"
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            "--fail-with-body",
            "--max-time",
            "120",
            "--dump-header",
            str(headers),
            f"{gw.url}/v1/chat/completions",
            "-H",
            f"Authorization: Bearer {gw.api_key}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    return done.stdout, headers.read_text().lower()


def test_curl_non_streaming_gets_json(running_gateway, tmp_path):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": MAX_TOKENS,
        **ALWAYS_FULL,
    }

    raw, headers = _curl(running_gateway, body, tmp_path)

    assert "content-type: application/json" in headers
    reply = json.loads(raw)
    assert reply["object"] == "chat.completion"
    assert reply["model"] == "tiny"
    assert reply["usage"]["completion_tokens"] == MAX_TOKENS


def test_curl_stream_is_server_sent_events_ending_in_done(running_gateway, tmp_path):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
        **ALWAYS_FULL,
    }

    raw, headers = _curl(running_gateway, body, tmp_path)

    assert "content-type: text/event-stream" in headers
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    events = raw.split(b"\n\n")
    assert events[-1] == b""  # every event, the last included, ends with a blank line
    events = events[:-1]
    assert all(event.startswith(b"data: ") for event in events), events
    assert b"\n" not in b"".join(events)  # one data line per event
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert len(chunks) >= 2
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_wrong_api_key_is_refused_in_openai_shape(running_gateway):
    with running_gateway.client(api_key="sk-not-the-key") as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
            )

    assert caught.value.status_code == 401
    error = caught.value.response.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert "sk-not-the-key" not in error["message"]


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )

    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    error = caught.value.response.json()["error"]
    assert error["param"] == "model"
    assert "tiny" in error["message"]  # names the models that do exist


def test_models_lists_both_ready(client, running_gateway):
    assert sorted(model.id for model in client.models.list()) == sorted(MODELS)

    resp = httpx.get(
        f"{running_gateway.url}/v1/models",
        headers={"Authorization": f"Bearer {running_gateway.api_key}"},
        trust_env=False,
    )
    assert resp.status_code == 200
    listed = {model["id"]: model for model in resp.json()["data"]}
    assert {name: listed[name]["ready"] for name in MODELS} == {name: True for name in MODELS}
    assert listed["tiny-tp2"]["replicas_ready"] == 1


def test_metrics_count_answered_requests(client, running_gateway):
    series = {"model": "tiny", "status": "200"}
    before = running_gateway.metric("enginegate_requests_total", **series) or 0.0
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )

    # Counted when the last byte is sent, which may be a moment after the client has it.
    deadline = time.monotonic() + 5
    after = before
    while after == before and time.monotonic() < deadline:
        after = running_gateway.metric("enginegate_requests_total", **series) or 0.0
        time.sleep(0.1)
    assert after == before + 1
    assert after > 0

    ready = {"state": "ready", "model": "tiny-tp2", "worker": "tiny-tp2-0"}
    assert running_gateway.metric("enginegate_worker_state", **ready) == 1.0
