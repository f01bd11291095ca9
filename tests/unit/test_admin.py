"""The admin API, the metrics token and the status page, on the real app.

The app runs in-process (httpx.ASGITransport) with a supervisor of `backend: external` workers
whose upstream is a scripted server on a loopback port; no process is started.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.loopback import from_httpx, serve

from backends.supervisor import Supervisor, Timings, WorkerState
from gateway.app import create_app
from gateway.config import Config, ConfigError, load_config, plan_workers

USER, ADMIN, METRICS = "sk-user-1111", "sk-admin-2222", "mt-3333"
FAST = Timings(startup_poll=0.01, health_interval=0.02, health_timeout=1, stop_grace=1)
ADMIN_ROUTES = [
    ("GET", "/admin/status"),
    ("GET", "/admin/workers"),
    ("POST", "/admin/workers/remote-0/restart"),
    ("GET", "/admin/workers/remote-0/log"),
]


def upstream(request: httpx.Request) -> httpx.Response:
    """An OpenAI-compatible server that lists the one model it serves."""
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"object": "list", "data": [{"id": "remote"}]})
    if request.url.path == "/v1/chat/completions":
        usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
        return httpx.Response(200, json={"object": "chat.completion", "usage": usage})
    return httpx.Response(404)


def make_config(tmp_path: Path, url: str = "http://up.test", **gateway: Any) -> Config:
    options = {"api_keys": [USER], "admin_keys": [ADMIN], "metrics_token": METRICS} | gateway
    return Config.model_validate(
        {
            "gateway": {"state_dir": str(tmp_path), **options},
            "models": [
                {"name": "remote", "backend": "external", "url": f"{url}/v1"},
                {"name": "other", "backend": "external", "url": f"{url}/v1"},
            ],
        }
    )


Started = tuple[httpx.AsyncClient, Supervisor]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """start(**gateway options) → (client of the app, its supervisor), every worker ready."""
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(serve(from_httpx(upstream)))

        async def started(**gateway: Any) -> Started:
            config = make_config(tmp_path, url, **gateway)
            slots = plan_workers(config, "test.yaml", gpu_count=0, cpu_cores=[0])
            probes = await stack.enter_async_context(httpx.AsyncClient())
            supervisor = Supervisor(slots, tmp_path, probes, timings=FAST)
            app = create_app(config, supervisor, probes)
            await stack.enter_async_context(app.router.lifespan_context(app))
            assert await supervisor.wait_ready(timeout=5)
            transport = httpx.ASGITransport(app=app)
            client = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")
            return client, supervisor

        yield started


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_admin_refuses_the_api_key_and_accepts_the_admin_key(start, method, path) -> None:
    client, _ = await start()
    async with client:
        with_api_key = await client.request(method, path, headers=bearer(USER))
        without = await client.request(method, path)
        wrong = await client.request(method, path, headers=bearer("sk-nope"))
        with_admin_key = await client.request(method, path, headers=bearer(ADMIN))
    assert with_api_key.status_code == 403
    assert with_api_key.json()["error"]["type"] == "permission_error"
    assert (without.status_code, wrong.status_code) == (401, 401)
    assert "admin key" in without.json()["error"]["message"]
    assert with_admin_key.status_code in (200, 202), with_admin_key.text


async def test_workers_lists_each_worker_with_its_state_and_history(start) -> None:
    client, supervisor = await start()
    supervisor.workers[1].last_error = ["Traceback (most recent call last):", "OOM"]
    async with client:
        body = (await client.get("/admin/workers", headers=bearer(ADMIN))).json()
    workers = {w["id"]: w for w in body["data"]}
    assert set(workers) == {"remote-0", "other-0"}
    remote = workers["remote-0"]
    assert remote["model"] == "remote" and remote["state"] == "ready"
    assert remote["devices"] == "remote" and remote["url"].endswith("/v1")
    assert remote["restarts"] == 0 and remote["uptime_seconds"] >= 0
    assert remote["last_start_seconds"] is not None
    assert remote["log"] == "/admin/workers/remote-0/log"
    assert workers["other-0"]["last_error"] == ["Traceback (most recent call last):", "OOM"]


async def test_restart_ends_the_worker_and_it_comes_back_ready(start) -> None:
    client, supervisor = await start()
    worker = supervisor.get("remote-0")
    states: list[WorkerState] = []
    worker._on_change = lambda w: states.append(w.state)
    async with client:
        resp = await client.post("/admin/workers/remote-0/restart", headers=bearer(ADMIN))
        assert resp.status_code == 202
        for _ in range(200):
            if worker.restarts == 1 and worker.is_ready:
                break
            await asyncio.sleep(0.01)
        missing = await client.post("/admin/workers/nope/restart", headers=bearer(ADMIN))
    assert (worker.restarts, worker.state) == (1, WorkerState.READY)
    assert states == [WorkerState.RESTARTING, WorkerState.STARTING, WorkerState.READY]
    assert supervisor.get("other-0").restarts == 0
    assert missing.status_code == 404


async def test_restart_gives_a_failed_worker_a_fresh_run(tmp_path) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(upstream)) as http:
        config = make_config(tmp_path)
        slots = plan_workers(config, "test.yaml", gpu_count=0, cpu_cores=[0])
        supervisor = Supervisor(slots, tmp_path, http, timings=FAST)
        worker = supervisor.workers[0]
        worker.state = WorkerState.FAILED  # as its task leaves it after a crash loop
        worker.restart()
        assert worker.state is WorkerState.STARTING  # decided before restart() returns
        try:
            for _ in range(200):
                if worker.is_ready:
                    break
                await asyncio.sleep(0.01)
            assert worker.is_ready
        finally:
            await supervisor.stop()
    assert worker.state is WorkerState.STOPPED


async def test_log_gives_the_last_lines(start) -> None:
    client, supervisor = await start()
    log_path = supervisor.get("remote-0").log_path
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("".join(f"line {i}\n" for i in range(1, 501)))
    async with client:
        three = await client.get("/admin/workers/remote-0/log?lines=3", headers=bearer(ADMIN))
        default = await client.get("/admin/workers/remote-0/log", headers=bearer(ADMIN))
        empty = await client.get("/admin/workers/other-0/log", headers=bearer(ADMIN))
    assert three.text == "line 498\nline 499\nline 500\n"
    assert three.headers["content-type"].startswith("text/plain")
    assert default.text.splitlines()[0] == "line 301"
    assert empty.status_code == 200 and empty.text == ""


async def test_a_rank_a_worker_lacks_is_404(start) -> None:
    client, _ = await start()
    async with client:
        rank0 = await client.get("/admin/workers/remote-0/log?rank=0", headers=bearer(ADMIN))
        rank1 = await client.get("/admin/workers/remote-0/log?rank=1", headers=bearer(ADMIN))
    assert rank0.status_code == 200
    assert rank1.status_code == 404
    assert "has one rank" in rank1.json()["error"]["message"]


async def test_status_has_models_workers_and_totals(start) -> None:
    client, _ = await start()
    chat = {"model": "remote", "messages": [{"role": "user", "content": "hi"}]}
    async with client:
        for _ in range(2):
            sent = await client.post("/v1/chat/completions", json=chat, headers=bearer(USER))
            assert sent.status_code == 200, sent.text
        status = (await client.get("/admin/status", headers=bearer(ADMIN))).json()
    assert [m["name"] for m in status["models"]] == ["remote", "other"]
    assert status["models"][0]["replicas_ready"] == 1
    assert [w["id"] for w in status["workers"]] == ["remote-0", "other-0"]
    assert status["gpus"] == []
    totals = status["totals"]
    assert totals["requests"] == {"remote": 2}
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (
        {"remote": 10},
        {"remote": 14},
    )
    assert totals["in_flight"] == {"remote": 0}
    assert "errors" not in totals


async def test_metrics_need_the_metrics_token_when_set(start) -> None:
    client, _ = await start()
    async with client:
        for path in ("/metrics", "/metrics/workers"):
            assert (await client.get(path)).status_code == 401
            assert (await client.get(path, headers=bearer(USER))).status_code == 401
            ok = await client.get(path, headers=bearer(METRICS))
            assert ok.status_code == 200
            assert ok.headers["content-type"].startswith("text/plain; version=0.0.4")
        page = (await client.get("/metrics", headers=bearer(METRICS))).text
    assert 'enginegate_worker_state{model="remote",state="ready",worker="remote-0"} 1.0' in page
    assert 'enginegate_worker_scrape_failures_total{model="remote",worker="remote-0"} 0.0' in page


async def test_metrics_are_open_without_a_token(start) -> None:
    client, _ = await start(metrics_token=None)
    async with client:
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/metrics/workers")).text == ""  # external servers only


async def test_admin_is_off_without_admin_keys(start) -> None:
    client, _ = await start(admin_keys=[])
    async with client:
        resp = await client.get("/admin/workers", headers=bearer(USER))
    assert resp.status_code == 403
    assert "gateway.admin_keys" in resp.json()["error"]["message"]


async def test_admin_is_open_when_the_whole_gateway_is(start) -> None:
    client, _ = await start(api_keys=[], admin_keys=[], allow_unauthenticated=True)
    async with client:
        assert (await client.get("/admin/workers")).status_code == 200


async def test_status_page_is_public_and_holds_no_data(start) -> None:
    client, _ = await start()
    async with client:
        resp = await client.get("/ui")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
    assert "/admin/status" in resp.text and "sessionStorage" in resp.text
    assert "remote-0" not in resp.text and ADMIN not in resp.text


def test_config_refuses_an_admin_key_that_is_also_an_api_key(tmp_path) -> None:
    path = tmp_path / "enginegate.yaml"
    path.write_text(
        f'gateway: {{api_keys: ["{USER}"], admin_keys: ["{USER}"]}}\n'
        "models: [{name: r, backend: external, url: 'http://up.test/v1'}]\n"
    )
    with pytest.raises(ConfigError, match="admin_keys and api_keys share a key") as caught:
        load_config(path, {})
    assert USER not in str(caught.value)


def test_config_metrics_token_from_an_unset_variable_means_open(tmp_path) -> None:
    path = tmp_path / "enginegate.yaml"
    path.write_text(
        'gateway: {api_keys: ["k"], metrics_token: "${TOKEN:-}", admin_keys: ["${ADMIN}"]}\n'
        "models: [{name: r, backend: external, url: 'http://up.test/v1'}]\n"
    )
    config = load_config(path, {"ADMIN": "a"})
    assert config.gateway.metrics_token is None
    with pytest.raises(ConfigError, match=r"gateway.admin_keys: an API key is empty"):
        load_config(path, {"ADMIN": " "})


async def test_restart_revives_a_worker_whose_task_ended(start) -> None:
    """Finding 2: a worker whose supervision task had died stayed wedged: the admin restart
    only set a flag no loop read, and still answered 202.

    1. End the task of a ready worker (cancelled here; an unexpected exception did it
    before); 2. POST its restart; 3. a new task runs, and the worker is ready again.
    """
    client, supervisor = await start()
    worker = supervisor.get("remote-0")
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "worker remote-0"]
    task.cancel()
    await asyncio.wait([task])
    async with client:
        resp = await client.post("/admin/workers/remote-0/restart", headers=bearer(ADMIN))
    assert resp.status_code == 202 and resp.json()["state"] == "starting"
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "worker remote-0"]
    assert not task.done()
    for _ in range(200):
        if worker.is_ready:
            break
        await asyncio.sleep(0.01)
    assert worker.is_ready


async def test_hugging_face_names_give_safe_worker_ids_and_files(tmp_path: Path) -> None:
    """Finding 17: a model named `org/eng` got the worker id `org/eng-0`: its log and pid
    record landed in subdirectories and the admin log and restart routes answered 404.

    1. Serve an external model named `deepseek-ai/DeepSeek-R1`; 2. its worker id is
    `deepseek-ai--DeepSeek-R1-0`; 3. its admin routes answer, and its log is a file directly
    in state_dir/logs.
    """
    name = "deepseek-ai/DeepSeek-R1"

    def lists_name(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"object": "list", "data": [{"id": name}]})

    async with serve(from_httpx(lists_name)) as url, httpx.AsyncClient() as probes:
        config = Config.model_validate(
            {
                "gateway": {"state_dir": str(tmp_path), "admin_keys": [ADMIN], "api_keys": [USER]},
                "models": [{"name": name, "backend": "external", "url": f"{url}/v1"}],
            }
        )
        slots = plan_workers(config, "test.yaml", gpu_count=0, cpu_cores=[0])
        supervisor = Supervisor(slots, tmp_path, probes, timings=FAST)
        app = create_app(config, supervisor, probes)
        async with app.router.lifespan_context(app):
            assert await supervisor.wait_ready(timeout=5)
            (worker,) = supervisor.workers
            worker.log_path.parent.mkdir(parents=True, exist_ok=True)
            worker.log_path.write_text("hello\n")
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://127.0.0.1"
            ) as client:
                listed = (await client.get("/admin/workers", headers=bearer(ADMIN))).json()
                (entry,) = listed["data"]
                log = await client.get(entry["log"], headers=bearer(ADMIN))
                restart = await client.post(
                    f"/admin/workers/{entry['id']}/restart", headers=bearer(ADMIN)
                )
    assert entry["id"] == "deepseek-ai--DeepSeek-R1-0" and entry["model"] == name
    assert (log.status_code, log.text) == (200, "hello\n")
    assert restart.status_code == 202
    assert worker.log_path == tmp_path / "logs" / "deepseek-ai--DeepSeek-R1-0.log"
