"""LMDeploy's PyTorch backend on a real GPU through enginegate, tp=1.

Runs with LMDeploy's wheel set on PYTHONPATH instead of vLLM's (`ENGINE=lmdeploy bash
deploy/gpu/run-gpu-tests.sh`); without it every test here is skipped.
"""

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fakes.gateway_process import flag
from gpu_kit import (
    ENGINE_ENV,
    READY_TIMEOUT,
    Gateway,
    Results,
    Rig,
    chat,
    gib,
    gpu_views,
    gpus_of,
    medians,
    memory_of,
    skip_unless,
    timed_stream,
    wait_gpus_free_of,
)

pytestmark = [pytest.mark.gpu, skip_unless(gpus=1, engine="lmdeploy")]

NAME = "tiny-lmdeploy"
CACHE_SHARE = 0.1  # of the memory free after the weights: the KV cache


def lmdeploy_worker(rig: Rig, model: Path, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "lmdeploy",
        "model": str(model),
        "tp": 1,
        "lmdeploy_backend": "pytorch",
        "command": [rig.python, "-m", "lmdeploy", "serve", "api_server"],
        "engine_args": {
            "session-len": 1024,
            "cache-max-entry-count": CACHE_SHARE,
            "eager-mode": True,
        },
        "env": dict(ENGINE_ENV),
        "startup_timeout": READY_TIMEOUT,
    }


@pytest.fixture(scope="module")
def gateway(rig, tiny_model, workdir, gateways, results: Results) -> Gateway:
    gw = Gateway(workdir / "lmdeploy", [lmdeploy_worker(rig, tiny_model, NAME)])
    gw.plan = gw.cli("plan", "--json")
    gateways.append(gw)
    gw.start()
    ready = gw.wait_ready()
    results.record("lmdeploy tp1: gateway start -> ready (s)", round(ready, 1))
    results.snapshot("lmdeploy ready")
    return gw


def test_lmdeploy_serves_chat_streaming_and_not(gateway: Gateway, results: Results) -> None:
    with gateway.client() as sdk:
        reply = chat(sdk, NAME, 16)
        streamed = timed_stream(sdk, NAME, 16)
    assert reply.model == NAME
    assert 0 < reply.usage.completion_tokens <= 16
    assert isinstance(reply.choices[0].message.content, str)
    assert 0 < streamed["completion_tokens"] <= 16

    memory = memory_of(gateway, NAME, gpu_views(), share=None)
    plan = gateway.plan
    assert plan is not None and plan.returncode == 0, plan and plan.stderr
    worker = json.loads(plan.stdout)["workers"][0]
    results.record(
        "lmdeploy tp1: plan vs actual",
        {
            "plan": {
                "weights_gib": gib(worker.get("weights_bytes")),
                "needed_gib": gib(worker.get("needed_bytes")),
                "budget_rule": worker.get("budget_rule"),
                "kv_room_gib": gib(worker.get("kv_room_bytes")),
                "kv_tokens": worker.get("kv_tokens"),
                "fits": worker.get("fits"),
            },
            "nvml": memory,
        },
    )
    assert list(memory) == [0], memory


def test_lmdeploy_latency_through_gateway_and_direct(gateway: Gateway, results: Results) -> None:
    engine = gateway.engine_of(NAME)
    argv = engine.cmdline()
    port, key = flag(argv, "--server-port"), flag(argv, "--api-keys")
    assert port and key
    runs: dict[str, list[dict[str, float]]] = {"gateway": [], "direct": []}
    with (
        gateway.client() as through,
        gateway.client(base_url=f"http://127.0.0.1:{port}/v1", api_key=key) as direct,
    ):
        for sdk in (through, direct):
            timed_stream(sdk, NAME, 8)
        for _ in range(5):
            runs["gateway"].append(timed_stream(through, NAME, 128))
            runs["direct"].append(timed_stream(direct, NAME, 128))
    results.record(
        "lmdeploy tp1: streamed, 128 tokens max, median of 5",
        {path: medians(found) for path, found in runs.items()},
    )


def test_lmdeploy_sigterm_frees_the_gpu(gateway: Gateway, results: Results) -> None:
    pids = {m.pid for m in gateway.snapshot()}
    assert gpus_of(pids, gpu_views())
    started = time.monotonic()
    took = gateway.stop()
    freed = wait_gpus_free_of(pids, 30)
    results.record(
        "lmdeploy tp1: SIGTERM of the gateway",
        {
            "gateway_exit_s": None if took is None else round(took, 1),
            "gpus_free_after_s": None if freed is None else round(time.monotonic() - started, 1),
        },
    )
    assert gateway.left_behind() == []
    assert freed is not None
