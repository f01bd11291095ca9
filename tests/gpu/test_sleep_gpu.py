"""Models on demand that sleep instead of stopping, through the gateway, with vLLM on one GPU.

Two on-demand models of one `exclusive` group share GPU 0, both with `idle_action: sleep`
(vLLM's `--enable-sleep-mode`, `/sleep?level=1`, `/wake_up`, driven by gateway/on_demand.py):

1. the first request for `nap-a` waits for its cold start;
2. a request for `nap-b` puts `nap-a` to sleep (its GPU memory freed, its process kept) and
   cold-starts `nap-b`;
3. the next request for `nap-a` puts `nap-b` to sleep and wakes `nap-a`: same pid, no new
   start, and far faster than the cold start;
4. left alone past `idle_stop`, the awake model goes to sleep by itself.

Every figure goes to results.json (cold start, sleep, wake, GPU memory of each state).
"""

import time
from pathlib import Path
from typing import Any

import pytest
from gpu_kit import RIG, Gateway, Results, Rig, gib, gpu_views, gpus_of, skip_unless

ON_CPU = not isinstance(RIG, str) and RIG.on_cpu
pytestmark = [
    pytest.mark.gpu,
    skip_unless(gpus=1, engine="vllm"),
    pytest.mark.skipif(ON_CPU, reason="vLLM's CPU build has no sleep mode"),
]

ADMIN_KEY = "sk-gpu-admin-sleep"
IDLE_STOP = 20  # seconds
STATE_TIMEOUT = 60.0


def napper(rig: Rig, model: Path, name: str) -> dict[str, Any]:
    entry = rig.worker(model, name)
    entry.update(
        start="on_demand", exclusive="gpu0", gpus=[0], idle_action="sleep", idle_stop=IDLE_STOP
    )
    return entry


def timed_answer(gw: Gateway, model: str) -> float:
    """Seconds for one short completion of `model` through the gateway."""
    started = time.perf_counter()
    reply = gw.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None
    return time.perf_counter() - started


def state_of(gw: Gateway, model: str) -> tuple[str, int | None]:
    worker = next(w for w in gw.workers() if w["model"] == model)
    return worker["state"], worker.get("pid")


def wait_state(gw: Gateway, model: str, state: str) -> float:
    started = time.monotonic()
    while state_of(gw, model)[0] != state:
        assert time.monotonic() - started < STATE_TIMEOUT, (state, gw.workers(), gw.logs())
        time.sleep(0.2)
    return time.monotonic() - started


def held_gib(gw: Gateway, model: str) -> float | None:
    return gib(sum(gpus_of(gw.tree_of(model), gpu_views()).values()))


def test_exclusive_models_sleep_and_wake_on_one_gpu(
    rig: Rig, tiny_model: Path, workdir: Path, gateways: list[Gateway], results: Results
) -> None:
    gw = Gateway(
        workdir / "sleep",
        [napper(rig, tiny_model, "nap-a"), napper(rig, tiny_model, "nap-b")],
        admin_key=ADMIN_KEY,
    )
    gateways.append(gw)
    gw.start()
    gw.wait_ready()
    assert state_of(gw, "nap-a")[0] == "idle" and state_of(gw, "nap-b")[0] == "idle"

    cold_a = timed_answer(gw, "nap-a")
    awake_a = held_gib(gw, "nap-a")
    pid_a = state_of(gw, "nap-a")[1]
    cold_b = timed_answer(gw, "nap-b")  # puts nap-a to sleep first
    assert state_of(gw, "nap-a") == ("sleeping", pid_a)
    asleep_a = held_gib(gw, "nap-a")
    pid_b = state_of(gw, "nap-b")[1]

    wake_a = timed_answer(gw, "nap-a")  # puts nap-b to sleep, wakes nap-a
    assert state_of(gw, "nap-a") == ("ready", pid_a), "nap-a was restarted, not woken"
    assert state_of(gw, "nap-b") == ("sleeping", pid_b)
    warm_a = timed_answer(gw, "nap-a")
    idle_sleep = wait_state(gw, "nap-a", "sleeping")

    results.record(
        "sleep mode through the gateway (s)",
        {
            "cold_start_first_answer": round(cold_a, 2),
            "cold_start_other_model_after_sleeping_the_first": round(cold_b, 2),
            "wake_first_answer": round(wake_a, 3),
            "answer_when_awake": round(warm_a, 3),
            "idle_stop": IDLE_STOP,
            "fell_asleep_after_the_warm_answer_within": round(idle_sleep, 1),
        },
    )
    results.record("sleep mode GPU memory of nap-a (GiB)", {"awake": awake_a, "asleep": asleep_a})
    starts = gw.metric("enginegate_on_demand_starts_total", model="nap-a")
    stops = gw.metric("enginegate_on_demand_stops_total", model="nap-a")
    results.record("sleep mode nap-a on-demand starts, stops", [starts, stops])
    assert awake_a and asleep_a is not None and asleep_a < awake_a / 2, (awake_a, asleep_a)
    assert wake_a < cold_a / 3, (wake_a, cold_a)
