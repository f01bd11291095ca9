"""Reload and rolling replacement on a real gateway process whose engines are the scripted
fake engine (tests/fakes/engine.py): what changes, what is left alone, and that steady
traffic sees no failure meanwhile. They test what the gateway does around engines, never
that an engine works (tests/e2e/test_changes.py does that with vLLM).
"""

import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from fakes.gateway_process import GatewayProcess, bearer
from fakes.load import SteadyLoad

from .test_supervision_worker import fake_model

API_KEY = "sk-reload-test"
ADMIN_KEY = "sk-reload-admin"


def fake(name: str, **fields: Any) -> dict[str, Any]:
    """A vLLM CPU model entry whose engine is the fake engine (answers after 50 ms)."""
    env = {"FAKE_ENGINE_REPLY_DELAY": "0.05", **fields.pop("env", {})}
    return fake_model(name, env=env, **fields)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def make(models: list[dict[str, Any]], **gateway: Any) -> GatewayProcess:
        gw = GatewayProcess(
            tmp_path / f"gw{len(started)}", models, api_key=API_KEY, admin_key=ADMIN_KEY,
            stop_grace=2, gateway={"drain_timeout": 10, **gateway},
        )  # fmt: skip
        started.append(gw)
        gw.start()
        gw.wait_ready(timeout=60)
        return gw

    yield make
    for gw in started:
        gw.stop()


def rewrite(gw: GatewayProcess, models: list[dict[str, Any]], **gateway: Any) -> None:
    config = gw.make_config({"drain_timeout": 10, **gateway})
    config["models"] = models
    gw.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def pids(gw: GatewayProcess) -> dict[str, int]:
    return {w["id"]: w["pid"] for w in gw.workers()}


def admin(gw: GatewayProcess, method: str, path: str) -> httpx.Response:
    with httpx.Client(timeout=60, trust_env=False) as http:
        return http.request(method, f"{gw.url}{path}", headers=bearer(ADMIN_KEY))


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def chat(gw: GatewayProcess, model: str, key: str = API_KEY) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.Client(timeout=30, trust_env=False) as http:
        return http.post(f"{gw.url}/v1/chat/completions", json=body, headers=bearer(key))


def test_reload_applies_only_the_difference_under_steady_traffic(
    start: Callable[..., GatewayProcess],
) -> None:
    """1. Serve keep, flagged and gone; 2. rewrite the file: keep gets an alias and a limit,
    flagged a new engine flag, gone leaves, fresh arrives, a second API key and a new read
    timeout; 3. `enginegate reload` while 6 clients send to keep and flagged; 4. keep's engine
    is the same process, flagged's a new one with the flag, gone answers 404, fresh answers,
    the new key works; 5. every request of the load was answered 200."""
    models = [fake("keep"), fake("flagged"), fake("gone")]
    gw = start(models)
    before = pids(gw)
    new_models = [
        fake("keep", aliases=["kept"], max_in_flight=8),
        fake("flagged", engine_args={"max-num-seqs": 7}),
        fake("fresh"),
    ]
    rewrite(gw, new_models, api_keys=[API_KEY, "sk-second"], read_timeout=300)
    with SteadyLoad(gw.url, API_KEY, ["keep", "flagged"], clients=6) as load:
        time.sleep(1)
        load.phase("reload")
        done = gw.cli("reload")
        load.phase("after")
        time.sleep(1)
    assert done.returncode == 0, done.stderr + gw.logs()
    for line in ("start    fresh", "replace  flagged", "stop     gone", "apply    gateway.api_keys",
                 "apply    gateway.read_timeout", "keep     keep", "reload done"):  # fmt: skip
        assert line in done.stdout
    after = pids(gw)
    assert after["keep-0"] == before["keep-0"]
    assert set(after) == {"keep-0", "flagged-0.1", "fresh-0"}
    engine = psutil.Process(after["flagged-0.1"]).children(recursive=True)[-1].cmdline()
    assert engine[engine.index("--max-num-seqs") + 1] == "7"
    assert chat(gw, "gone").status_code == 404
    assert chat(gw, "fresh").status_code == 200
    assert chat(gw, "kept", key="sk-second").status_code == 200
    total = load.total
    assert load.counts["reload"].sent > 10, load.counts
    assert total.failed == 0, {phase: str(c) for phase, c in load.counts.items()}


def test_a_file_that_cannot_apply_changes_nothing_and_says_why(
    start: Callable[..., GatewayProcess],
) -> None:
    """1. A running gateway; 2. a file with tp: 0: `reload` and `check --reload` fail naming
    the file and key, POST /admin/reload answers 400 in OpenAI's shape; 3. a file that moves
    the port is refused the same way; 4. the worker is the same process throughout."""
    gw = start([fake("one")])
    before = pids(gw)
    rewrite(gw, [fake("one", tp=0)])
    for args in (("reload",), ("check", "--reload")):
        done = gw.cli(*args)
        assert done.returncode == 1
        assert f"{gw.config_path}: models[0].tp: Input should be greater than or equal to 1" in (
            done.stderr
        )
    answer = admin(gw, "POST", "/admin/reload")
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_config"
    assert "nothing changed" in answer.json()["error"]["message"]
    rewrite(gw, [fake("one")], port=gw.port + 1)
    done = gw.cli("reload", "--url", gw.url)  # the file names another port now
    assert done.returncode == 1
    assert "gateway.port: cannot change while the gateway runs" in done.stderr
    assert pids(gw) == before
    # The CLI refused the broken file itself; the gateway refused the POST and the port.
    assert gw.metric("enginegate_reloads_total", result="refused") == 2


def test_check_reload_shows_the_plan_and_changes_nothing(
    start: Callable[..., GatewayProcess],
) -> None:
    """`check --reload` prints what would start, stop and be replaced; nothing does."""
    gw = start([fake("a"), fake("b")])
    before = pids(gw)
    rewrite(gw, [fake("a", engine_args={"max-num-seqs": 3}), fake("c", replicas=2)])
    done = gw.cli("check", "--reload")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "start    c (2 replicas)",
        "replace  a (replica by replica)",
        "stop     b (drained first)",
    ]
    time.sleep(0.5)
    assert pids(gw) == before


def test_sighup_reloads_and_a_reload_of_the_same_file_touches_nothing(
    start: Callable[..., GatewayProcess],
) -> None:
    """1. SIGHUP after adding a model: it starts, the other keeps its process; 2. reload
    with the file unchanged: 'nothing changes', same processes; its time is printed."""
    gw = start([fake("a")])
    before = pids(gw)
    rewrite(gw, [fake("a"), fake("b")])
    gw.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    until(lambda: chat(gw, "b").status_code == 200, 30, "b to answer after SIGHUP")
    assert pids(gw)["a-0"] == before["a-0"]
    began = time.monotonic()
    done = gw.cli("reload")
    seconds = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    assert "nothing changes" in done.stdout
    last = admin(gw, "GET", "/admin/reload").json()
    print(f"\nreload, nothing changed: {last['seconds']:.3f} s in the gateway, "
          f"{seconds:.2f} s for `enginegate reload`")  # fmt: skip
    assert last["state"] == "done" and last["seconds"] < 1
    assert set(pids(gw)) == {"a-0", "b-0"}
    assert gw.metric("enginegate_reloads_total", result="applied") == 2


def test_rolling_restart_answers_every_request(start: Callable[..., GatewayProcess]) -> None:
    """1. Two replicas, 8 clients sending steadily (4 at a time admitted); 2. `enginegate
    restart two`: each replica is replaced by a successor started first; 3. every request
    was answered 200, the successors answered some, and the replacements are counted."""
    # Half the clients wait in the admission queue: they are routed after the wait, to
    # whichever workers are there by then.
    gw = start([fake("two", replicas=2, max_in_flight=4, max_queue=64)])
    with SteadyLoad(gw.url, API_KEY, ["two"], clients=8) as load:
        time.sleep(1)
        load.phase("restart")
        done = gw.cli("restart", "two")
        load.phase("after")
        time.sleep(1)
    assert done.returncode == 0, done.stderr + gw.logs()
    assert set(pids(gw)) == {"two-0.1", "two-1.1"}
    new_pids = {f"pid-{p.pid}" for p in psutil.Process(gw.pid).children(recursive=True)}
    assert set(load.counts["after"].fingerprints) <= new_pids
    assert load.total.failed == 0, {phase: str(c) for phase, c in load.counts.items()}
    assert load.counts["restart"].sent > 10
    assert gw.metric("enginegate_replacements_total", model="two", result="done") == 2
    # One worker alone, by id: `restart two-0.1`.
    done = gw.cli("restart", "two-0.1")
    assert done.returncode == 0, done.stderr
    assert set(pids(gw)) == {"two-0.2", "two-1.1"}


def test_a_successor_that_never_gets_ready_leaves_the_old_worker_serving(
    start: Callable[..., GatewayProcess],
) -> None:
    """1. A model whose new engine would never pass its probe (FAKE_ENGINE_HEALTH=503);
    2. reload: the reload fails naming the successor, the old worker keeps its process and
    answers, and no successor is left; 3. the file still differs from what runs."""
    gw = start([fake("solo", startup_timeout=2)])
    before = pids(gw)
    rewrite(gw, [fake("solo", startup_timeout=2, env={"FAKE_ENGINE_HEALTH": "503"})])
    done = gw.cli("reload")
    assert done.returncode == 1
    assert "solo-0.1 did not become ready" in done.stderr
    assert pids(gw) == before
    assert chat(gw, "solo").status_code == 200
    assert gw.metric("enginegate_reloads_total", result="failed") == 1
    assert gw.metric("enginegate_replacements_total", model="solo", result="failed") == 1
    # 3. The worker still runs the old settings: the same file plans its replacement again.
    done = gw.cli("check", "--reload")
    assert done.stdout.splitlines()[0] == "replace  solo (replica by replica)", done.stdout


def test_a_request_queued_during_a_replacement_goes_to_the_successor(
    start: Callable[..., GatewayProcess],
) -> None:
    """1. One replica, one request at a time, answers taking 3 s: A is answered, B waits in
    the admission queue; 2. the replica is replaced meanwhile (successor ready within a
    second, the old one drains A); 3. B, admitted once A is done, goes to the successor
    (routing reads the workers after the wait) and both are answered 200."""
    gw = start([fake("q", max_in_flight=1, max_queue=4, env={"FAKE_ENGINE_REPLY_DELAY": "3"})])
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, gw, "q")
        time.sleep(0.3)
        second = pool.submit(chat, gw, "q")
        time.sleep(0.3)
        assert admin(gw, "POST", "/admin/workers/q-0/replace").status_code == 202
        answers = [first.result(), second.result()]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    successor = gw.worker("q-0.1")["pid"]
    engine = psutil.Process(successor).children(recursive=True)[-1].pid
    assert answers[1].json()["system_fingerprint"] == f"pid-{engine}"
