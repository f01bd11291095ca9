"""A worker whose engine dies is restarted, and the gateway says so while it is down."""

import os
import signal
import time

import httpx
import pytest
from fakes.gateway_process import is_alive

RESTART_TIMEOUT = 300.0


@pytest.mark.e2e
def test_killed_engine_is_restarted(running_gateway, timings):
    gw = running_gateway
    guard = gw.guard_of("tiny")
    engine = gw.engine_of("tiny")
    old_tree = [engine, *engine.children(recursive=True)]
    assert len(old_tree) >= 2, f"expected the engine and its EngineCore: {old_tree}"
    restarts_before = gw.metric("enginegate_worker_restarts_total", model="tiny", worker="tiny-0")
    assert restarts_before is not None

    killed = time.monotonic()
    os.kill(engine.pid, signal.SIGKILL)

    with httpx.Client(timeout=5, trust_env=False) as http:
        went_down = gw.poll_ready(503, timeout=60)
        assert went_down is not None, f"/ready stayed 200 after kill -9 of the engine\n{gw.logs()}"
        down = http.get(f"{gw.url}/ready").json()
        assert down["replicas_ready"]["tiny"] == 0, down
        assert down["replicas_ready"]["tiny-tp2"] == 1, down  # the other worker is untouched
        listed = http.get(
            f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {gw.api_key}"}
        ).json()
        assert {m["id"]: m["ready"] for m in listed["data"]}["tiny"] is False

        came_back = gw.poll_ready(200, timeout=RESTART_TIMEOUT)
        assert came_back is not None, (
            f"tiny-0 not ready again {RESTART_TIMEOUT:.0f} s after kill -9\n{gw.logs()}"
        )
    timings("tiny-0 kill -9 of the engine -> /ready 503", went_down)
    timings("tiny-0 kill -9 of the engine -> ready again", time.monotonic() - killed)

    with gw.client() as sdk:
        reply = sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello again"}], max_tokens=4
        )
    assert reply.model == "tiny"
    assert 0 < reply.usage.completion_tokens <= 4

    new_guard = gw.guard_of("tiny")
    new_engine = gw.engine_of("tiny")
    assert new_guard.pid != guard.pid
    assert new_engine.pid != engine.pid
    # The old engine's EngineCore and workers must not outlive it (vllm-project/vllm#55510).
    survivors = [p for p in old_tree if is_alive(p)]
    assert survivors == [], survivors
    restarts = gw.metric("enginegate_worker_restarts_total", model="tiny", worker="tiny-0")
    assert restarts is not None and restarts >= restarts_before + 1
    gw.snapshot()
