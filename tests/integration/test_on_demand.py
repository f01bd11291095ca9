"""Models on demand on a real gateway process whose engines are the scripted fake engine:
started by the first request, stopped when idle, taking turns in an exclusive group.
tests/e2e/test_changes.py measures a first request with vLLM CPU.
"""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
from fakes.gateway_process import GatewayProcess

from .test_reload import chat, fake, until
from .test_reload import start as start  # the fixture: a gateway per call, stopped at the end


def on_demand(name: str, **fields: Any) -> dict[str, Any]:
    return fake(name, start="on_demand", **fields)


def states(gw: GatewayProcess) -> dict[str, str]:
    return {w["id"]: w["state"] for w in gw.workers()}


def engines(gw: GatewayProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(gw.pid).children(recursive=True) if "engine.py" in
            " ".join(p.cmdline())]  # fmt: skip


def test_the_first_request_starts_the_engine_and_idle_stops_it(
    start: Callable[..., GatewayProcess],
) -> None:
    """1. An on-demand model (engine binds after 1 s, idle_stop 2s): the gateway is ready
    with no engine and the worker idle; 2. four requests at once: all 200, the first after
    the engine's start, one start counted; 3. unused for 2 s it is idle again, its engine
    gone; 4. the next request starts it again."""
    gw = start([on_demand("od", idle_stop="2s", env={"FAKE_ENGINE_BIND_DELAY": "1"})])
    assert states(gw) == {"od-0": "idle"}
    assert engines(gw) == []
    began = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: chat(gw, "od").status_code, range(4)))
    first = time.monotonic() - began
    print(f"\nfake engine on demand: first request answered after {first:.2f} s")
    assert answers == [200] * 4
    assert first >= 1
    assert states(gw) == {"od-0": "ready"}
    assert gw.metric("enginegate_on_demand_starts_total", model="od") == 1
    until(lambda: states(gw) == {"od-0": "idle"}, 10, "idle stop")
    assert engines(gw) == []
    assert gw.metric("enginegate_on_demand_stops_total", model="od", reason="idle") == 1
    assert chat(gw, "od").status_code == 200
    assert gw.metric("enginegate_on_demand_starts_total", model="od") == 2


def test_models_of_an_exclusive_group_take_turns(start: Callable[..., GatewayProcess]) -> None:
    """1. a and b on demand, exclusive group g, and an always-on c; 2. a request for a
    starts a; 3. one for b stops a first, then starts b; 4. c was never touched."""
    gw = start([on_demand("a", exclusive="g"), on_demand("b", exclusive="g"), fake("c")])
    c_pid = gw.worker("c-0")["pid"]
    assert chat(gw, "a").status_code == 200
    assert states(gw) == {"a-0": "ready", "b-0": "idle", "c-0": "ready"}
    time.sleep(1.1)  # a model used within the last second is not stopped for another
    assert chat(gw, "b").status_code == 200
    assert states(gw) == {"a-0": "idle", "b-0": "ready", "c-0": "ready"}
    assert gw.metric("enginegate_on_demand_stops_total", model="a", reason="exclusive") == 1
    assert gw.worker("c-0")["pid"] == c_pid


def test_an_engine_that_never_gets_ready_is_a_503_naming_it(
    start: Callable[..., GatewayProcess],
) -> None:
    """A start on demand that does not become ready within startup_timeout answers 503,
    OpenAI-shaped, saying what was started and in which state it is."""
    gw = start([on_demand("slow", startup_timeout=2, env={"FAKE_ENGINE_HEALTH": "503"})])
    answer = chat(gw, "slow")
    assert answer.status_code == 503
    message = answer.json()["error"]["message"]
    assert "`slow` was started on demand and is not ready after 2 s: slow-0 " in message
