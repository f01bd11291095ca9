"""One engine on one GPU through enginegate: vLLM, SGLang or LMDeploy (PyTorch backend), the one
whose wheel set this run installed (`ENGINE=sglang bash deploy/gpu/run-gpu-tests.sh`; the script
sets ENGINEGATE_GPU_ENGINE). Two gateways, one after the other, on GPU 0:

1. the tiny Qwen2: chat and a stream with usage, `enginegate plan` beside what the engine took,
   latency through the gateway and straight to the engine, `kill -9` of the engine -> restarted,
   SIGKILL of the gateway -> no process and no GPU memory left;
2. the tiny DeepSeek-V3 (MLA + MoE, deploy/tiny_model.py --deepseek) with `reasoning:
   deepseek_r1`: chat and a stream through the OpenAI SDK with the reasoning in both fields,
   then SIGTERM of the gateway -> the GPU freed.

Every figure goes to results.json; docs/gpu-validation.md reports them.
"""

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from fakes.gateway_process import is_alive, wait_gone
from gpu_kit import (
    ENGINE_ENV,
    GPU_MEMORY_UTILIZATION,
    READY_TIMEOUT,
    RIG,
    Gateway,
    Results,
    Rig,
    build_tiny_model,
    chat,
    direct_client,
    gib,
    gpu_views,
    gpus_of,
    medians,
    memory_of,
    reasoning_of,
    skip_unless,
    timed_stream,
    wait_gpus_free_of,
)

ENGINE = os.environ.get("ENGINEGATE_GPU_ENGINE", "vllm")
ON_CPU = not isinstance(RIG, str) and RIG.on_cpu
pytestmark = [
    pytest.mark.gpu,
    skip_unless(gpus=1, engine=ENGINE),
    pytest.mark.skipif(ON_CPU, reason="measures GPU memory: no CPU rehearsal"),
]

TINY, DEEPSEEK = f"tiny-{ENGINE}", f"ds-{ENGINE}"
# The review's DeepSeek geometry (shared/reviews/gpu-deepseek-sglang-2026-12.md): 4 heads,
# hidden 512, 4 layers, 8 experts; per-head sizes are always DeepSeek's own.
DEEPSEEK_FLAGS = ["--deepseek", "--heads", "4", "--layers", "4", "--experts", "8"]
RESTART_TIMEOUT = 400.0
CLEANUP_SECONDS = 20.0
LMDEPLOY_CACHE_SHARE = 0.1  # of the memory free after the weights: the KV cache


def worker(rig: Rig, model: Path, name: str, reasoning: str | None = None) -> dict[str, Any]:
    """A `models:` entry for `model` on ENGINE, tp=1, eager, a context of 1024 tokens, about
    0.3 of the GPU (LMDeploy: 0.1 of what is free after the weights)."""
    if ENGINE == "vllm":
        entry = rig.worker(model, name)
    else:
        entry = {
            "name": name,
            "backend": ENGINE,
            "model": str(model),
            "tp": 1,
            "env": dict(ENGINE_ENV),
            "startup_timeout": READY_TIMEOUT,
        }
    if ENGINE == "sglang":
        entry["command"] = [rig.python, "-m", "sglang.launch_server"]
        entry["engine_args"] = {
            "mem-fraction-static": GPU_MEMORY_UTILIZATION,
            "context-length": 1024,
            "disable-cuda-graph": True,
        }
    if ENGINE == "lmdeploy":
        entry["command"] = [rig.python, "-m", "lmdeploy", "serve", "api_server"]
        entry["lmdeploy_backend"] = "pytorch"
        entry["engine_args"] = {
            "session-len": 1024,
            "cache-max-entry-count": LMDEPLOY_CACHE_SHARE,
            "eager-mode": True,
        }
    if reasoning:
        entry["reasoning"] = reasoning
    return entry


def engine_share() -> float | None:
    """The engine's budget as a share of the GPU's total, where it has one."""
    return None if ENGINE == "lmdeploy" else GPU_MEMORY_UTILIZATION


def start(gw: Gateway, label: str, results: Results) -> Gateway:
    gw.plan = gw.cli("plan", "--json")  # before the start: the GPU is still free
    gw.start()
    ready = gw.wait_ready()
    results.record(f"{label}: gateway start -> ready (s)", round(ready, 1))
    results.snapshot(f"{label} ready")
    return gw


@pytest.fixture(scope="module")
def tiny(rig, tiny_model, workdir, gateways, results: Results) -> Gateway:
    gw = Gateway(workdir / f"{ENGINE}-tiny", [worker(rig, tiny_model, TINY)])
    gateways.append(gw)
    return start(gw, f"{ENGINE} tiny", results)


@pytest.fixture(scope="module")
def deepseek_model(rig: Rig, workdir: Path, results: Results) -> Path:
    path = workdir / "tiny-deepseek"
    return build_tiny_model(rig, path, DEEPSEEK_FLAGS, results, "deepseek model")


@pytest.fixture(scope="module")
def deepseek(rig, deepseek_model, workdir, gateways, results: Results) -> Gateway:
    entry = worker(rig, deepseek_model, DEEPSEEK, reasoning="deepseek_r1")
    gw = Gateway(workdir / f"{ENGINE}-deepseek", [entry])
    gateways.append(gw)
    return start(gw, f"{ENGINE} deepseek", results)


def plan_beside_nvml(gw: Gateway, name: str) -> dict[str, Any]:
    """`enginegate plan --json`'s figures for the worker beside what NVML says it holds."""
    assert gw.plan is not None and gw.plan.returncode == 0, gw.plan and gw.plan.stderr
    planned = json.loads(gw.plan.stdout)["workers"][0]
    return {
        "plan": {
            "weights_gib": gib(planned.get("weights_bytes")),
            "needed_gib": gib(planned.get("needed_bytes")),
            "budget_rule": planned.get("budget_rule"),
            "kv_room_gib": gib(planned.get("kv_room_bytes")),
            "kv_tokens": planned.get("kv_tokens"),
            "fits": planned.get("fits"),
        },
        "nvml": memory_of(gw, name, gpu_views(), share=engine_share()),
    }


# --------------------------------------------------------------------- the tiny Qwen2 model


def test_serves_chat_and_a_stream_with_usage(tiny: Gateway, results: Results) -> None:
    with tiny.client() as sdk:
        reply = chat(sdk, TINY, 16)
        streamed = timed_stream(sdk, TINY, 16)
    assert reply.model == TINY
    assert 0 < reply.usage.completion_tokens <= 16
    assert isinstance(reply.choices[0].message.content, str)
    assert 0 < streamed["completion_tokens"] <= 16

    figures = plan_beside_nvml(tiny, TINY)
    results.record(f"{ENGINE} tiny: plan vs actual", figures)
    assert list(figures["nvml"]) == [0], figures
    share = engine_share()
    if share is not None:  # the engine keeps to its budget; the CUDA context comes on top
        held = figures["nvml"][0]["held_by_engine_gib"]
        assert held < figures["nvml"][0]["budget_gib"] + 4, figures


def test_latency_through_the_gateway_and_direct(tiny: Gateway, results: Results) -> None:
    runs: dict[str, list[dict[str, float]]] = {"gateway": [], "direct": []}
    with tiny.client() as through, direct_client(tiny, TINY) as direct:
        for sdk in (through, direct):  # warm-up, not counted
            timed_stream(sdk, TINY, 8)
        for _ in range(5):
            runs["gateway"].append(timed_stream(through, TINY, 128))
            runs["direct"].append(timed_stream(direct, TINY, 128))
    results.record(
        f"{ENGINE} tiny: streamed, 128 tokens max, median of 5",
        {path: medians(found) for path, found in runs.items()},
    )
    for found in runs.values():
        assert all(0 < r["completion_tokens"] <= 128 for r in found)


def test_engine_killed_is_restarted(tiny: Gateway, results: Results) -> None:
    guard = tiny.guard_of(TINY)
    engine = tiny.engine_of(TINY)
    old_tree = [engine, *engine.children(recursive=True)]
    old_pids = {p.pid for p in old_tree}
    assert list(gpus_of(old_pids, gpu_views())) == [0]

    killed = time.monotonic()
    os.kill(engine.pid, signal.SIGKILL)
    went_down = tiny.poll_ready(503, timeout=60)
    assert went_down is not None, f"/ready stayed 200 after kill -9 of the engine\n{tiny.logs()}"
    freed = wait_gpus_free_of(old_pids, timeout=60)
    came_back = tiny.poll_ready(200, timeout=RESTART_TIMEOUT)
    assert came_back is not None, f"not ready {RESTART_TIMEOUT:.0f} s after kill -9\n{tiny.logs()}"
    results.record(
        f"{ENGINE} tiny: kill -9 of the engine",
        {
            "to_ready_503_s": round(went_down, 1),
            "old_processes_off_the_gpu_s": None if freed is None else round(freed, 1),
            "to_ready_again_s": round(time.monotonic() - killed, 1),
            "worker_start_s": tiny.metric(
                "enginegate_worker_last_start_seconds", worker=f"{TINY}-0"
            ),
        },
    )
    with tiny.client() as sdk:
        reply = chat(sdk, TINY, 8)
    assert 0 < reply.usage.completion_tokens <= 8
    assert tiny.guard_of(TINY).pid != guard.pid
    assert [p for p in old_tree if is_alive(p)] == [], "the old engine's processes outlived it"
    assert freed is not None, "the killed engine's processes still hold GPU memory"
    assert list(gpus_of(tiny.tree_of(TINY), gpu_views())) == [0]


def test_gateway_sigkill_leaves_nothing_on_the_gpu(tiny: Gateway, results: Results) -> None:
    members = tiny.snapshot()
    pids = {m.pid for m in members}
    assert gpus_of(pids, gpu_views())

    killed = time.monotonic()
    tiny.proc.send_signal(signal.SIGKILL)
    tiny.proc.wait(10)
    left = wait_gone(members, CLEANUP_SECONDS)
    gone = time.monotonic() - killed
    freed = wait_gpus_free_of(pids, CLEANUP_SECONDS)
    views = gpu_views()
    results.record(
        f"{ENGINE} tiny: gateway SIGKILL",
        {
            "every_engine_process_gone_s": round(gone, 1),
            "gpu_free_of_them_s": None if freed is None else round(time.monotonic() - killed, 1),
            "gpu_used_after_gib": {v.index: gib(v.used) for v in views},
            "processes_on_gpus_after": {v.index: sorted(v.processes) for v in views},
        },
    )
    results.snapshot(f"{ENGINE} after gateway SIGKILL")
    assert left == [], "alive after the gateway's kill -9:\n" + "\n".join(
        f"  {m.pid} {m.cmdline}" for m in left
    )
    assert freed is not None, f"processes of the tree still on the GPU: {views}"


# ------------------------------------------------------- the DeepSeek architecture, R1 reasoning


def test_deepseek_reasoning_in_both_fields(deepseek: Gateway, results: Results) -> None:
    ask: dict[str, Any] = {
        "model": DEEPSEEK,
        "messages": [{"role": "user", "content": "Hello!"}],
        "temperature": 0,
        "max_tokens": 16,
        "extra_body": {"ignore_eos": True},
    }
    with deepseek.client() as sdk:
        reply = sdk.chat.completions.create(**ask)
        with sdk.chat.completions.create(**ask, stream=True) as stream:
            deltas = [c.choices[0].delta for c in stream if c.choices]
        timed = timed_stream(sdk, DEEPSEEK, 64)

    message = reply.choices[0].message
    reasoning_content, reasoning = reasoning_of(message)
    results.record(
        f"{ENGINE} deepseek: reply",
        {
            "content": message.content,
            "reasoning": reasoning,
            "usage": reply.usage.model_dump(),
            "stream_64_tokens": timed,
        },
    )
    results.record(f"{ENGINE} deepseek: plan vs actual", plan_beside_nvml(deepseek, DEEPSEEK))
    # Random weights never close <think>: the whole answer is reasoning, in both spellings.
    assert isinstance(reasoning, str) and reasoning, message
    assert reasoning_content == reasoning
    assert not message.content, message
    assert reply.usage.completion_tokens == 16
    pairs = [reasoning_of(d) for d in deltas]
    assert any(r for _, r in pairs), deltas
    assert all(rc == r for rc, r in pairs), pairs
    assert "".join(r or "" for _, r in pairs)


def test_deepseek_sigterm_frees_the_gpu(deepseek: Gateway, results: Results) -> None:
    pids = {m.pid for m in deepseek.snapshot()}
    assert gpus_of(pids, gpu_views())
    started = time.monotonic()
    took = deepseek.stop()
    freed = wait_gpus_free_of(pids, 30)
    results.record(
        f"{ENGINE} deepseek: SIGTERM of the gateway",
        {
            "gateway_exit_s": None if took is None else round(took, 1),
            "gpu_free_after_s": None if freed is None else round(time.monotonic() - started, 1),
        },
    )
    assert deepseek.left_behind() == []
    assert freed is not None
