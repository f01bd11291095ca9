"""Supervision of real processes: a scripted fake engine (tests/fakes/engine.py) as a vLLM
worker's `command`, started under the guard by the supervisor.

These test what the supervisor does around an engine (start failures, an impostor on the
port, restarts, the environment); they never claim an engine works. Every process a test
starts is killed by pid at teardown, pass or fail.
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fakes.other_user import connect_as_nobody
from prometheus_client import CollectorRegistry

from backends.base import Slot
from backends.spec import ModelSpec
from backends.supervisor import NoRoom, Supervisor, Timings, Worker, WorkerState
from gateway.app import create_app
from gateway.config import Config, plan_workers
from gateway.scrape import EngineScraper

FAKE_ENGINE = Path(__file__).resolve().parents[1] / "fakes" / "engine.py"
FAST = Timings(
    startup_poll=0.05,
    health_interval=0.1,
    health_timeout=2,
    stop_grace=1,
    backoff_base=0.05,
    backoff_max=0.2,
)
ADMIN = "sk-admin-test"


def fake_model(name: str = "fake", **fields: Any) -> dict[str, Any]:
    """A model entry whose engine is the fake engine; `env` sets its switches."""
    return {
        "name": name,
        "backend": "vllm",
        "model": "/models/none",
        "device": "cpu",
        "command": [sys.executable, str(FAKE_ENGINE)],
        "startup_timeout": 20,
        **fields,
    }


def fake_slot(name: str = "fake", **fields: Any) -> Slot:
    """A vLLM worker: the fake engine serves on the Unix socket it is given (`--uds`)."""
    return Slot(f"{name}-0", ModelSpec(**fake_model(name, **fields)), 0, cpu_ranks=("0",))


def fake_tcp_slot(name: str = "fake", **fields: Any) -> Slot:
    """An SGLang worker: the fake engine serves on the loopback port it is given."""
    spec = ModelSpec(**{**fake_model(name, **fields), "backend": "sglang", "device": "cuda"})
    return Slot(f"{name}-0", spec, 0, gpus=(0,))


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """Kills every process this test started that still runs at its end: by process group
    for guards (each leads its own), by pid for the rest."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    for proc in me.children(recursive=True):
        if proc.pid in before:
            continue
        with contextlib.suppress(OSError, psutil.NoSuchProcess):
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as http:
        yield http


@pytest.fixture
async def supervise(
    tmp_path: Path, client: httpx.AsyncClient
) -> AsyncIterator[Callable[..., Supervisor]]:
    """supervise(slots, **Supervisor options) → a supervisor, stopped at teardown."""
    made: list[Supervisor] = []

    def make(slots: list[Slot], **options: Any) -> Supervisor:
        options.setdefault("timings", FAST)
        supervisor = Supervisor(slots, tmp_path / "state", client, **options)
        made.append(supervisor)
        return supervisor

    yield make
    for supervisor in made:
        await asyncio.wait_for(supervisor.stop(), timeout=15)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def engines_of(name: str) -> list[psutil.Process]:
    """Live fake engines serving `name` under this test process (not their guards)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
            if cmdline[1:2] == [str(FAKE_ENGINE)] and name in cmdline and proc.status() != "zombie":
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


async def test_a_start_that_raises_is_logged_counted_and_retried(
    supervise: Callable[..., Supervisor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 2: an exception inside a start (here the log cannot be opened: EISDIR, as
    EMFILE or ENOSPC would) does not end the worker's supervision.

    1. Make the worker's log path a directory; 2. start: the error is logged with its
    traceback, counted as a failed start, and retried after a backoff; 3. remove the
    obstacle: the worker becomes ready on its own.
    """
    supervisor = supervise([fake_slot()])
    worker = supervisor.workers[0]
    worker.log_path.mkdir(parents=True)
    with caplog.at_level(logging.ERROR, logger="enginegate.supervisor"):
        await supervisor.start()
        await until(lambda: worker.restarts >= 2, 5, "two failed starts")
    failed = [r for r in caplog.records if "start or supervision failed" in r.getMessage()]
    assert failed and failed[0].exc_info is not None, "logged without its traceback"
    assert "IsADirectoryError" in "\n".join(worker.last_error)
    assert worker.state in (WorkerState.RESTARTING, WorkerState.STARTING)
    worker.log_path.rmdir()
    await until(lambda: worker.is_ready, 10, "ready once the log can be opened")


async def test_a_nonsense_models_answer_fails_the_start_but_not_the_worker(
    supervise: Callable[..., Supervisor],
) -> None:
    """Finding 2: an engine answering /v1/models with {"data": null} made the probe raise
    TypeError, which ended the worker's task and left it `starting` for good, its engine
    running untracked.

    1. Start a worker whose engine answers so, with a 1 s startup timeout and one failure
    allowed; 2. it ends `failed` (the probe said "not ready" until the timeout);
    3. its engine is stopped.
    """
    timings = Timings(**{**vars(FAST), "max_failures": 1})
    slot = fake_slot("nulldata", startup_timeout=1, env={"FAKE_ENGINE_MODELS": '{"data": null}'})
    supervisor = supervise([slot], timings=timings)
    worker = supervisor.workers[0]
    await supervisor.start()
    await until(lambda: worker.state is WorkerState.FAILED, 10, "failed after the timeout")
    await until(lambda: not engines_of("nulldata"), 5, "its engine stopped")


class Crowded(Worker):
    """A worker whose first starts find no room, as a Ray worker whose node has left."""

    no_room_left = 4

    async def _spawn(self) -> None:
        if Crowded.no_room_left > 0:
            Crowded.no_room_left -= 1
            raise NoRoom(f"not placed: {Crowded.no_room_left} more tries without room")
        await super()._spawn()


async def test_a_start_without_room_is_tried_again_not_counted_as_a_crash(
    supervise: Callable[..., Supervisor],
) -> None:
    """1. A worker whose first 4 starts find no devices (NoRoom), with 1 failure allowed;
    2. it is never `failed`: each try shows the reason in `last_error`, counts no restart and
    starts no engine; 3. once there is room it is ready with its engine."""
    timings = Timings(**{**vars(FAST), "max_failures": 1})
    supervisor = supervise([fake_slot("crowded")], timings=timings, worker_type=Crowded)
    worker = supervisor.workers[0]
    states: list[WorkerState] = []
    reasons: list[str] = []
    await supervisor.start()
    deadline = time.monotonic() + 15
    while not worker.is_ready:
        assert worker.state is not WorkerState.FAILED, worker.last_error
        assert time.monotonic() < deadline, f"not ready in 15 s: {worker.state}"
        states.append(worker.state)
        reasons += worker.last_error
        await asyncio.sleep(0.01)
    assert "not placed: 0 more tries without room" in reasons
    assert WorkerState.RESTARTING in states
    assert worker.restarts == 0
    assert engines_of("crowded")


async def test_an_engine_refusing_the_probe_fails_at_once_saying_url_and_status(
    supervise: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19: SGLang 0.5.17 answered the probe 401 (it has no `/ready`) and the worker sat
    `starting` for the whole startup_timeout, then restarted, for 75 minutes, logging nothing
    but the engine's last line. 401, 403 and 404 do not pass by waiting.

    1. Start an SGLang worker whose engine answers its health URL 401, with a 20 s timeout;
    2. it is `failed` within seconds, not restarted, its engine ended; 3. the log and
    `last_error` name the URL and the status; 4. an operator's restart tries again."""
    slot = fake_tcp_slot("refuses", env={"FAKE_ENGINE_HEALTH": "401"})
    supervisor = supervise([slot])
    worker = supervisor.workers[0]
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="enginegate.supervisor"):
        await supervisor.start()
        await until(lambda: worker.state is WorkerState.FAILED, 10, "failed at once")
    assert time.monotonic() - started < slot.model.startup_timeout / 2
    assert worker.restarts == 0
    await until(lambda: not engines_of("refuses"), 5, "its engine stopped")
    said = [r for r in caplog.records if r.levelno == logging.ERROR and "refused" in r.message]
    url = f"http://127.0.0.1:{worker.port}/health"
    assert said and url in said[0].message and "401" in said[0].message
    assert url in worker.last_error[0] and "401" in worker.last_error[0]
    worker.restart()
    await until(lambda: bool(engines_of("refuses")), 5, "started again on request")
    await until(lambda: worker.state is WorkerState.FAILED, 10, "refused again")


async def test_each_new_probe_failure_is_logged_once_with_its_cause(
    supervise: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19: a probe that fails says why (the URL and what came back), once per new
    cause rather than every poll, and the timeout names the last one.

    1. Start a worker whose engine binds after 0.5 s and then answers 503 (starting) until a
    1 s timeout; 2. the log says the connection failed, then the 503, each once; 3. the
    timeout warning repeats the 503."""
    timings = Timings(**{**vars(FAST), "max_failures": 1})
    env = {"FAKE_ENGINE_BIND_DELAY": "0.5", "FAKE_ENGINE_HEALTH": "503"}
    supervisor = supervise([fake_tcp_slot("slow", startup_timeout=1.5, env=env)], timings=timings)
    worker = supervisor.workers[0]
    with caplog.at_level(logging.INFO, logger="enginegate.supervisor"):
        await supervisor.start()
        await until(lambda: worker.state is WorkerState.FAILED, 10, "failed after the timeout")
    not_ready = [r.message for r in caplog.records if "not ready:" in r.message]
    assert any("ConnectError" in m for m in not_ready), not_ready
    answered = [m for m in not_ready if "/health answered 503" in m]
    assert len(answered) == 1, not_ready  # ~20 polls said the same: logged once
    timeout = [r.message for r in caplog.records if "not ready in time" in r.message]
    assert timeout and "answered 503" in timeout[0]


async def test_restart_starts_a_worker_whose_task_ended(
    supervise: Callable[..., Supervisor],
) -> None:
    """Finding 2: a worker whose task ended anyway (here: cancelled) is started again by
    restart(), whatever its state says; before, only a `failed` one was.

    1. Start a worker and let it be ready; 2. cancel its task: it still says `ready`;
    3. restart(): a new task, the worker is ready again on a fresh engine.
    """
    supervisor = supervise([fake_slot("orphan")])
    worker = supervisor.workers[0]
    await supervisor.start()
    await until(lambda: worker.is_ready, 10, "ready")
    first = worker.process.pid if worker.process else None
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "worker orphan-0"]
    task.cancel()
    await asyncio.wait([task])
    assert worker.state is WorkerState.READY
    worker.restart()
    assert worker.state is WorkerState.STARTING  # decided at once, not by the new task
    await until(lambda: worker.is_ready and worker.process is not None, 10, "ready again")
    assert worker.process is not None and worker.process.pid != first
    await until(lambda: len(engines_of("orphan")) == 1, 5, "the old engine ended")


async def test_two_restarts_at_once_of_a_failed_worker_give_one_engine(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """Finding 7: two admin restarts of a `failed` worker handled in the same loop turn
    started two supervision loops, so one worker had two engines.

    1. A worker whose engine exits at once until a marker file exists ends `failed`;
    2. create the marker; send two POST /admin/workers/{id}/restart at once; 3. the worker
    is ready with exactly one engine, and still one a moment later.
    """
    marker = tmp_path / "fixed"
    model = fake_model("twice", env={"FAKE_ENGINE_FAIL_UNLESS": str(marker)})
    config = Config.model_validate(
        {"gateway": {"state_dir": str(tmp_path / "state"), "admin_keys": [ADMIN],
                     "api_keys": ["sk-user"]}, "models": [model]}
    )  # fmt: skip
    slots = plan_workers(config, "test.yaml", gpu_count=0, cpu_cores=[0])
    timings = Timings(**{**vars(FAST), "max_failures": 2})
    supervisor = Supervisor(slots, tmp_path / "state", client, timings=timings)
    app = create_app(config, supervisor, client)
    worker = supervisor.workers[0]
    async with app.router.lifespan_context(app):
        await until(lambda: worker.state is WorkerState.FAILED, 10, "failed")
        marker.touch()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as admin:
            headers = {"Authorization": f"Bearer {ADMIN}"}
            answers = await asyncio.gather(
                *(admin.post("/admin/workers/twice-0/restart", headers=headers) for _ in "ab")
            )
        assert [a.status_code for a in answers] == [202, 202]
        await until(lambda: worker.is_ready, 10, "ready after the restart")
        await asyncio.sleep(0.5)  # a second loop would have started its engine by now
        assert len(engines_of("twice")) == 1
        assert worker.process is not None
        assert worker.process.pid in {p.ppid() for p in engines_of("twice")}


async def test_engines_get_no_gateway_secret_from_the_environment(
    supervise: Callable[..., Supervisor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 13: every engine inherited the gateway's environment whole, admin key and
    third-party keys included.

    1. The gateway's environment holds ENGINEGATE_* keys, an upstream's key the config read
    (named in hidden_env) and a harmless variable; 2. the fake engine dumps what it got;
    3. it has the harmless variable and its own worker key, none of the secrets.
    """
    monkeypatch.setenv("ENGINEGATE_API_KEY", "user-key-env")
    monkeypatch.setenv("ENGINEGATE_ADMIN_KEY", "admin-key-env")
    monkeypatch.setenv("UPSTREAM_KEY", "sk-third-party")
    monkeypatch.setenv("HARMLESS_SETTING", "kept")
    dump = tmp_path / "env.json"
    slot = fake_slot("envdump", env={"FAKE_ENGINE_ENV_DUMP": str(dump)})
    supervisor = supervise([slot], hidden_env=frozenset({"UPSTREAM_KEY"}))
    await supervisor.start()
    worker = supervisor.workers[0]
    await until(lambda: worker.is_ready, 10, "ready")
    env = json.loads(dump.read_text())
    assert env["HARMLESS_SETTING"] == "kept"
    assert env["VLLM_API_KEY"] == worker.api_key
    leaked = {k: v for k, v in env.items() if "key-env" in v or "third-party" in v}
    assert leaked == {}


class Squatter:
    """Another local user's listener, bound to the port the worker was given before its
    engine binds it; answers /health and /v1/models like the engine would."""

    def __init__(self, served_name: str) -> None:
        self.served_name = served_name
        self.port: int | None = None
        self.heads: list[str] = []
        self._sock: socket.socket | None = None
        self._server: asyncio.Server | None = None

    def take(self, port: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        self._sock, self.port = sock, port
        asyncio.ensure_future(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._answer, sock=sock)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        self.heads.append(head)
        models = {"object": "list", "data": [{"id": self.served_name}]}
        body = json.dumps(models if "/v1/models" in head.split("\r\n")[0] else {}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sock is not None:
            self._sock.close()


async def test_a_squatter_on_the_port_is_never_trusted_nor_sent_the_key(
    supervise: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 4: a listener that is not the engine's, on the engine's port, was marked
    ready, sent the worker key and then users' prompts.

    1. When the worker first starts, bind its port in this process (the squatter) and answer
    /health and /v1/models; the engine binds late (1 s); 2. the worker is never ready on that
    port, the squatter never sees an Authorization header, and the log names the problem;
    3. the worker starts again on a new port and is ready with its own engine.
    An SGLang worker: vLLM ones have no port since finding 19 (a private Unix socket instead).
    """
    squatter = Squatter("squatted")
    ready_ports: list[int | None] = []

    def on_change(worker: Worker) -> None:
        if worker.state is WorkerState.READY:
            ready_ports.append(worker.port)

    slot = fake_tcp_slot("squatted", env={"FAKE_ENGINE_BIND_DELAY": "1"})
    supervisor = supervise([slot], on_change=on_change)
    worker = supervisor.workers[0]
    try:
        with caplog.at_level(logging.ERROR, logger="enginegate.supervisor"):
            await supervisor.start()
            # The port is handed out before the engine is spawned; the engine waits 1 s.
            await until(lambda: worker.port is not None, 2, "a port handed out")
            assert worker.port is not None
            squatter.take(worker.port)
            await until(lambda: worker.is_ready, 15, "ready on a port of its own")
    finally:
        squatter.close()
    assert squatter.heads, "the squatter was never asked: the test proved nothing"
    assert not [h for h in squatter.heads if "authorization" in h.lower()]
    assert squatter.port not in ready_ports and ready_ports == [worker.port]
    assert any("another process holds the port" in r.getMessage() for r in caplog.records)


async def test_a_vllm_worker_serves_on_a_private_socket_and_no_port(
    supervise: Callable[..., Supervisor], tmp_path: Path
) -> None:
    """Finding 19: vLLM's key guards only /v1, /v2, /inference and /cohere, so on a loopback
    port /invocations ran inference for any local user.

    1. A vLLM worker gets no TCP port: its engine serves on state_dir/run/<id>.sock, in a
    directory no other user may enter; 2. it is probed and its metrics scraped through the
    socket; 3. after stop() the socket is gone.
    """
    supervisor = supervise([fake_slot("private")])
    worker = supervisor.workers[0]
    await supervisor.start()
    await until(lambda: worker.is_ready, 10, "ready")
    socket_path = tmp_path / "state" / "run" / "private-0.sock"
    assert worker.port is None and worker.socket_path == str(socket_path)
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    socket_path.chmod(0o777)  # as uvicorn's own --uds does: the directory alone must refuse
    assert connect_as_nobody(socket_path) == "PermissionError"
    (engine,) = engines_of("private")
    assert not [c for c in engine.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    page = await EngineScraper(supervisor, CollectorRegistry()).scrape()
    assert 'fake_engine_up{model="private",worker="private-0"} 1' in page
    await supervisor.stop()
    assert not socket_path.exists()


async def test_an_engine_killed_leaves_its_socket_and_the_next_one_binds_anew(
    supervise: Callable[..., Supervisor],
) -> None:
    """A killed engine leaves its socket file, on which the next one's bind would fail; the
    worker removes it before each start."""
    supervisor = supervise([fake_slot("killed")])
    worker = supervisor.workers[0]
    await supervisor.start()
    await until(lambda: worker.is_ready, 10, "ready")
    (engine,) = engines_of("killed")
    engine.kill()
    assert worker.socket_path and Path(worker.socket_path).exists()
    await until(lambda: worker.restarts >= 1 and worker.is_ready, 15, "ready again")
    assert [p.pid for p in engines_of("killed")] != [engine.pid]


async def test_a_state_dir_too_deep_for_a_socket_path_uses_a_private_temporary_one(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """Socket paths hold 107 bytes: past that, the worker's socket goes to a directory of its
    own from mkdtemp (0700), removed when the worker stops."""
    state_dir = tmp_path / ("d" * 60) / ("e" * 60)
    supervisor = Supervisor([fake_slot("deep")], state_dir, client, timings=FAST)
    worker = supervisor.workers[0]
    try:
        await supervisor.start()
        await until(lambda: worker.is_ready, 10, "ready")
        assert worker.socket_path is not None
        socket_dir = Path(worker.socket_path).parent
        assert socket_dir.name.startswith("enginegate-") and not socket_dir.is_relative_to(tmp_path)
        assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    finally:
        await asyncio.wait_for(supervisor.stop(), timeout=15)
    assert not socket_dir.exists()
