"""vLLM on real GPUs through enginegate: TP=2 on two GPUs, two TP=1 engines side by side, an
engine killed and restarted, and the gateway SIGKILLed with nothing left holding GPU memory.

The tests run in file order and share one TP=2 gateway until the SIGKILL test ends it. Every
figure goes to results.json (see conftest.py); docs/gpu-validation.md reports them.
"""

import json
import os
import signal
import time
from typing import Any

import pytest
from fakes.gateway_process import flag, is_alive, wait_gone
from gpu_kit import (
    Gateway,
    GpuView,
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
    vllm_log_figures,
    wait_gpus_free_of,
)

pytestmark = [pytest.mark.gpu]

TP2 = "tiny-tp2"
RESTART_TIMEOUT = 300.0
CRASH_CLEANUP_SECONDS = 15.0
# vLLM's share (gpu-memory-utilization x total) covers weights, activations and KV cache; the
# CUDA context and NCCL's buffers come on top of it.
CONTEXT_SLACK = 6 * 1024**3


@pytest.fixture(scope="session")
def baseline(rig: Rig, results: Results) -> list[GpuView]:
    """The GPUs before any engine: nothing of ours on them yet."""
    views = gpu_views()
    results.record(
        "baseline",
        [
            {"gpu": v.index, "total_gib": gib(v.total), "used_gib": gib(v.used),
             "processes": len(v.processes)}
            for v in views
        ],
    )  # fmt: skip
    results.snapshot("baseline")
    return views


@pytest.fixture(scope="module")
def tp2(rig, tiny_model, workdir, gateways, results, baseline) -> Gateway:
    """One gateway, one vLLM worker at tp=2 (GPUs 0 and 1), ready."""
    gw = Gateway(workdir / "tp2", [rig.worker(tiny_model, TP2, tp=2)])
    gw.plan = gw.cli("plan", "--json")  # before the start: the GPUs are still free
    gateways.append(gw)
    gw.start()
    ready = gw.wait_ready()
    results.record("tp2: gateway start -> ready (s)", round(ready, 1))
    results.record(
        "tp2: worker start -> ready, supervisor (s)",
        gw.metric("enginegate_worker_last_start_seconds", worker=f"{TP2}-0"),
    )
    results.snapshot("tp2 ready")
    return gw


# ------------------------------------------------------------------------------------ tests


@skip_unless(gpus=2)
def test_tp2_serves_chat_streaming_and_not(tp2: Gateway, rig: Rig, results: Results) -> None:
    with tp2.client() as sdk:
        reply = chat(sdk, TP2, 16)
        streamed = timed_stream(sdk, TP2, 16)
    assert reply.model == TP2
    assert reply.usage.completion_tokens == 16
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason == "length"
    assert streamed["completion_tokens"] == 16

    if rig.on_cpu:
        return
    views = gpu_views()
    memory = memory_of(tp2, TP2, views)
    results.record("tp2: memory per GPU", memory)
    assert sorted(memory) == [0, 1], f"tp=2 engine should hold GPUs 0 and 1: {memory}"
    for index, figures in memory.items():
        held = figures["held_by_engine_gib"] * 1024**3
        budget = figures["budget_gib"] * 1024**3
        assert 0.5 * budget < held < budget + CONTEXT_SLACK, (index, figures)


@skip_unless(gpus=2)
def test_tp2_plan_against_what_vllm_took(tp2: Gateway, rig: Rig, results: Results) -> None:
    """`enginegate plan --json` (run before the start) side by side with what vLLM reported
    in its log and what NVML saw."""
    plan = tp2.plan
    assert plan is not None
    if "invalid choice: 'plan'" in plan.stderr:
        pytest.skip("this gateway has no `plan` command")
    assert plan.returncode == 0, plan.stderr
    document = json.loads(plan.stdout)
    worker = document["workers"][0]
    logged = vllm_log_figures(tp2.worker_log(f"{TP2}-0"))
    side_by_side: dict[str, Any] = {
        "inventory": [
            {k: g[k] for k in ("index", "name")} | {"total_gib": gib(g["total_bytes"])}
            for g in document["inventory"]["gpus"]
        ],
        "plan": {
            "weights_gib": gib(worker.get("weights_bytes")),
            "kv_per_token_bytes": worker.get("kv_per_token_bytes"),
            "needed_gib": gib(worker.get("needed_bytes")),
            "budget_gib": gib(worker.get("budget_bytes")),
            "kv_room_gib": gib(worker.get("kv_room_bytes")),
            "kv_tokens": worker.get("kv_tokens"),
            "fits": worker.get("fits"),
        },
        "vllm_log": logged,
    }
    if not rig.on_cpu:
        side_by_side["nvml"] = memory_of(tp2, TP2, gpu_views())
    results.record("tp2: plan vs actual", side_by_side)
    print(json.dumps(side_by_side, indent=2))
    if rig.on_cpu:
        return
    assert worker["fits"] is True
    assert worker["gpus"] == [0, 1]
    if "kv_tokens" in logged and worker.get("kv_tokens"):
        # The plan counts 2 GiB of overhead where vLLM measures its own: same order of size.
        ratio = logged["kv_cache_tokens"] / worker["kv_tokens"]
        results.record("tp2: KV tokens vLLM / plan", round(ratio, 3))
        assert 0.5 < ratio < 2.0, (logged, worker)


@skip_unless(gpus=2)
def test_tp2_latency_through_gateway_and_direct(tp2: Gateway, results: Results) -> None:
    """The same streamed requests through the gateway and straight to the engine."""
    engine = tp2.engine_of(TP2)
    socket = flag(engine.cmdline(), "--uds")
    key = engine.environ().get("VLLM_API_KEY")
    assert socket and key, "the engine's socket and key should be on its argv and in its env"
    runs: dict[str, list[dict[str, float]]] = {"gateway": [], "direct": []}
    with (
        tp2.client() as through,
        tp2.client(base_url="http://localhost/v1", api_key=key, socket=socket) as direct,
    ):
        for sdk in (through, direct):  # warm-up, not counted
            timed_stream(sdk, TP2, 8)
        for _ in range(5):
            runs["gateway"].append(timed_stream(through, TP2, 128))
            runs["direct"].append(timed_stream(direct, TP2, 128))
        started = time.perf_counter()
        reply = chat(through, TP2, 128)
        non_stream_ms = (time.perf_counter() - started) * 1000
    assert reply.usage.completion_tokens == 128
    summary = {path: medians(found) for path, found in runs.items()}
    summary["gateway_non_stream_128_tokens_ms"] = round(non_stream_ms, 1)
    results.record("tp2: streamed, 128 tokens, median of 5", summary)
    for found in runs.values():
        assert all(r["completion_tokens"] == 128 for r in found)


@skip_unless(gpus=2)
def test_tp2_engine_killed_is_restarted(tp2: Gateway, rig: Rig, results: Results) -> None:
    guard = tp2.guard_of(TP2)
    engine = tp2.engine_of(TP2)
    old_tree = [engine, *engine.children(recursive=True)]
    old_pids = {p.pid for p in old_tree}
    if not rig.on_cpu:
        assert sorted(gpus_of(old_pids, gpu_views())) == [0, 1]

    killed = time.monotonic()
    os.kill(engine.pid, signal.SIGKILL)
    went_down = tp2.poll_ready(503, timeout=60)
    assert went_down is not None, f"/ready stayed 200 after kill -9 of the engine\n{tp2.logs()}"
    freed = None if rig.on_cpu else wait_gpus_free_of(old_pids, timeout=60)
    came_back = tp2.poll_ready(200, timeout=RESTART_TIMEOUT)
    assert came_back is not None, f"not ready {RESTART_TIMEOUT:.0f} s after kill -9\n{tp2.logs()}"
    results.record(
        "tp2: kill -9 of the engine",
        {
            "to_ready_503_s": round(went_down, 1),
            "old_processes_off_the_gpus_s": None if freed is None else round(freed, 1),
            "to_ready_again_s": round(time.monotonic() - killed, 1),
            "worker_start_s": tp2.metric("enginegate_worker_last_start_seconds", worker=f"{TP2}-0"),
        },
    )
    results.snapshot("tp2 after restart")

    with tp2.client() as sdk:
        reply = chat(sdk, TP2, 8)
    assert reply.usage.completion_tokens == 8
    assert tp2.guard_of(TP2).pid != guard.pid
    # The old EngineCore and TP workers must not outlive their API server (vllm#55510).
    assert [p for p in old_tree if is_alive(p)] == []
    if not rig.on_cpu:
        assert freed is not None, "the killed engine's processes still hold GPU memory"
        assert sorted(gpus_of(tp2.tree_of(TP2), gpu_views())) == [0, 1]
    restarts = tp2.metric("enginegate_worker_restarts_total", worker=f"{TP2}-0")
    assert restarts is not None and restarts >= 1


@skip_unless(gpus=2)
def test_gateway_sigkill_leaves_nothing_on_the_gpus(
    tp2: Gateway, rig: Rig, results: Results, baseline: list[GpuView]
) -> None:
    members = tp2.snapshot()
    pids = {m.pid for m in members}
    if not rig.on_cpu:
        assert sorted(gpus_of(pids, gpu_views())) == [0, 1]

    killed = time.monotonic()
    tp2.proc.send_signal(signal.SIGKILL)
    tp2.proc.wait(10)
    left = wait_gone(members, CRASH_CLEANUP_SECONDS)
    gone = time.monotonic() - killed
    freed = None if rig.on_cpu else wait_gpus_free_of(pids, CRASH_CLEANUP_SECONDS)
    freed_total = None if freed is None else time.monotonic() - killed
    views = gpu_views()
    results.record(
        "gateway SIGKILL (tp2 engine up)",
        {
            "every_engine_process_gone_s": round(gone, 1),
            "gpus_free_of_them_s": None if freed_total is None else round(freed_total, 1),
            "gpu_used_after_gib": {v.index: gib(v.used) for v in views},
            "gpu_used_baseline_gib": {v.index: gib(v.used) for v in baseline},
            "processes_on_gpus_after": {v.index: sorted(v.processes) for v in views},
        },
    )
    results.snapshot("after gateway SIGKILL")
    assert left == [], "alive after the gateway's kill -9:\n" + "\n".join(
        f"  {m.pid} {m.cmdline}" for m in left
    )
    if not rig.on_cpu:
        assert freed is not None, f"processes of the tree still on the GPUs: {views}"
        assert all(not v.processes for v in views), [v.processes for v in views]


@skip_unless(gpus=2)
def test_two_tp1_engines_one_per_gpu(rig, tiny_model, workdir, gateways, results: Results) -> None:
    names = ("tiny-a", "tiny-b")
    gw = Gateway(workdir / "two-tp1", [rig.worker(tiny_model, name) for name in names])
    gateways.append(gw)
    gw.start()
    ready = gw.wait_ready()
    results.record("two tp1: gateway start -> ready (s)", round(ready, 1))
    results.snapshot("two tp1 ready")

    with gw.client() as sdk:
        for name in names:
            reply = chat(sdk, name, 8)
            assert reply.model == name
            assert reply.usage.completion_tokens == 8

    engines = {name: gw.engine_of(name) for name in names}
    sockets = {name: flag(proc.cmdline(), "--uds") for name, proc in engines.items()}
    assert len(set(sockets.values())) == 2, sockets
    if rig.on_cpu:
        return
    visible = {name: proc.environ().get("CUDA_VISIBLE_DEVICES") for name, proc in engines.items()}
    views = gpu_views()
    held = {name: gpus_of(gw.tree_of(name), views) for name in names}
    memory = {name: memory_of(gw, name, views) for name in names}
    results.record(
        "two tp1: placement",
        {"sockets": sockets, "CUDA_VISIBLE_DEVICES": visible, "memory": memory},
    )
    # Each engine on exactly one GPU, the one placement gave it, and not the other's.
    for name in names:
        assert list(held[name]) == [int(visible[name])], (name, held, visible)
    assert set(held["tiny-a"]).isdisjoint(held["tiny-b"]), held

    pids = {m.pid for m in gw.snapshot()}
    took = gw.stop()
    freed = wait_gpus_free_of(pids, 30)
    results.record(
        "two tp1: SIGTERM of the gateway",
        {"gateway_exit_s": None if took is None else round(took, 1), "gpus_free_after_s": freed},
    )
    assert gw.left_behind() == []
    assert freed is not None
