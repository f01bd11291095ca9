"""Workers and their supervisor.

A `Worker` is one replica: one engine process tree (or one external URL) and its state.
One asyncio task per worker, which the worker owns, drives it:

    starting ──ready──▶ ready ──crash or failed health──▶ restarting ──backoff──▶ starting
        │                  │                                   │
        └── crash, timeout ┴──────── too many in a row ───────▶ failed
    any state ── stop() ──▶ stopped

Whatever goes wrong inside a start (no file descriptor left for a port or the log, a full
disk, an engine answering nonsense) is logged with its traceback and counted as a failed
start: the task never dies of it. `Worker.restart()` is the one way to restart a worker.

The gateway reads `state`, `base_url`, `socket_path`, `api_key` and keeps `in_flight` for
routing; nothing here imports the gateway.

An engine that `listens_on_socket` (vLLM) gets no TCP port: it serves on a Unix socket in a
directory only the gateway's user can open (backends/sockets.py), and the worker's own httpx
client (`client`) reaches it there for probes and metrics.
"""

import asyncio
import logging
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

import httpx

from backends.adapters import ADAPTERS
from backends.base import Launch, Slot, worker_secret
from backends.ports import PortAllocator
from backends.probe import Probe, local_owner, probe
from backends.process import Engine, EngineProcess, end_leftovers, tail
from backends.sockets import WorkerSocket

log = logging.getLogger("enginegate.supervisor")

LAST_ERROR_LINES = 30
# What one start ended with. "restart requested", "no room" and "stopping" are not failures.
Outcome = Literal[
    "ready",
    "exited",
    "timeout",
    "port taken",
    "refused",
    "error",
    "unhealthy",
    "no room",
    "restart requested",
    "stopping",
]
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")
_ENGINEGATE_ENV = "ENGINEGATE_"  # the gateway's own settings and keys, never an engine's


class NoRoom(Exception):
    """A start that found no devices for now (a cluster short of the node it needs): not a
    crash, so it is not counted toward `max_failures`; the worker tries again, as a pending
    pod or replica does, until the room is back."""


class WorkerState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    DRAINING = "draining"  # out of rotation for good: its requests finish, then it stops
    IDLE = "idle"  # start: on_demand, no engine now: one starts at the next request
    SLEEPING = "sleeping"  # start: on_demand, its engine sleeps (vLLM sleep mode) until woken
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class Timings:
    """Supervision knobs, in seconds unless named otherwise; tests shrink them."""

    startup_poll: float = 0.5
    health_interval: float = 5.0
    health_timeout: float = 10.0  # a CPU engine busy generating answered /health in up to 5.3 s
    unhealthy_after: int = 3  # failed health checks in a row before leaving rotation
    max_failures: int = 5  # starts in a row that did not stay ready for `stable_after`
    stable_after: float = 60.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    stop_grace: float = 30.0


def backoff(failures: int, timings: Timings = Timings()) -> float:
    """1, 2, 4, ... seconds, capped."""
    return float(min(timings.backoff_base * 2 ** max(0, failures - 1), timings.backoff_max))


@dataclass(frozen=True)
class WorkerView:
    """One worker as the admin API and the status page show it: a copy, read at one moment."""

    id: str
    model: str
    backend: str
    state: WorkerState
    gpus: tuple[int, ...]
    cpu_ranks: tuple[str, ...]
    port: int | None
    socket: str | None  # the Unix socket the engine serves on, for one with no port
    pid: int | None
    url: str | None
    uptime_seconds: float | None
    restarts: int
    last_start_seconds: float | None
    in_flight: int
    last_error: tuple[str, ...]
    replaces: str | None = None
    replaced_by: str | None = None


class Worker:
    def __init__(
        self,
        slot: Slot,
        ports: PortAllocator,
        client: httpx.AsyncClient,
        state_dir: Path,
        on_change: Callable[["Worker"], None] = lambda worker: None,
        timings: Timings = Timings(),
        hidden_env: frozenset[str] = frozenset(),
    ) -> None:
        if not _SAFE_ID.fullmatch(slot.worker_id) or slot.worker_id in (".", ".."):
            raise ValueError(f"worker id {slot.worker_id!r} is not a safe file name")
        self.slot = slot
        self.id = slot.worker_id
        self.model_name = slot.model.name
        self.state = WorkerState.STOPPED
        self.restarts = 0
        self.in_flight = 0
        self.launch: Launch | None = None
        self.process: Engine | None = None  # an EngineProcess here, a Gang on a cluster
        self.port: int | None = None
        self.side_ports: tuple[int, ...] = ()  # the engine's own, e.g. SGLang's --nccl-port
        self.started_at: float | None = None
        self.ready_seconds: float | None = None  # how long the last start took
        self.last_error: list[str] = []
        self.log_path = state_dir / "logs" / f"{self.id}.log"
        self._record = state_dir / "workers" / f"{self.id}.json"
        self._ports = ports
        self._client = client
        self._socket = WorkerSocket(state_dir, self.id)
        self._socket_client: httpx.AsyncClient | None = None  # made with its first launch
        self._on_change = on_change
        self._timings = timings
        self._hidden_env = hidden_env
        self._adapter = ADAPTERS[slot.model.backend]
        self._task: asyncio.Task[None] | None = None
        self._ready_at: float | None = None  # when the current start became ready
        self._stopping = asyncio.Event()
        self._restart_requested = asyncio.Event()
        self._is_retiring = False  # set by retire(): no state but DRAINING or STOPPED after
        self.replaces: str | None = None  # the worker this one succeeds (a rolling replacement)
        self.replaced_by: str | None = None  # the worker that succeeds this one

    @property
    def is_ready(self) -> bool:
        return self.state is WorkerState.READY

    @property
    def base_url(self) -> str:
        assert self.launch is not None, "worker has not been started"
        return self.launch.base_url

    @property
    def socket_path(self) -> str | None:
        """The Unix socket `base_url` is reached through; None: TCP."""
        return self.launch.socket_path if self.launch else None

    @property
    def client(self) -> httpx.AsyncClient:
        """The httpx client that reaches this worker's engine (probes, the metrics scrape)."""
        return self._socket_client or self._client

    @property
    def api_key(self) -> str | None:
        return self.launch.api_key if self.launch else None

    @property
    def upstream_model(self) -> str:
        return self.launch.served_name if self.launch else self.model_name

    def view(self) -> WorkerView:
        is_up = self.state in (WorkerState.STARTING, WorkerState.READY, WorkerState.UNHEALTHY)
        uptime = time.monotonic() - self.started_at if is_up and self.started_at else None
        return WorkerView(
            id=self.id,
            model=self.model_name,
            backend=self.slot.model.backend,
            state=self.state,
            gpus=self.slot.gpus,
            cpu_ranks=self.slot.cpu_ranks,
            port=self.port,
            socket=self.socket_path,
            pid=self.process.pid if self.process else None,
            url=self.launch.base_url if self.launch else None,
            uptime_seconds=uptime,
            restarts=self.restarts,
            last_start_seconds=self.ready_seconds,
            in_flight=self.in_flight,
            last_error=tuple(self.last_error[-LAST_ERROR_LINES:]),
            replaces=self.replaces,
            replaced_by=self.replaced_by,
        )

    def start(self) -> None:
        """Start supervising: the state is STARTING when this returns. No effect while the
        worker's task runs, or once stop() was called."""
        if self._stopping.is_set() or (self._task is not None and not self._task.done()):
            return
        self._set(WorkerState.STARTING)
        self._task = asyncio.create_task(self._run(), name=f"worker {self.id}")

    def restart(self) -> None:
        """Restart now, decided here and at once; callers need not look at the state first.

        - The task runs (starting, ready, unhealthy, backing off): the worker leaves rotation
          (RESTARTING on return), its requests in flight finish, its engine is ended and a
          fresh one started without backoff. A restart, not a failure.
        - The task has ended (failed, or anything else that ended it): a new task, with its
          failure count at zero (STARTING on return).
        - After stop(): nothing.

        Two calls in a row give one engine: the second finds the first one's task running.
        """
        if self._stopping.is_set():
            return
        if self._task is None or self._task.done():
            self.start()
        else:
            self._set(WorkerState.RESTARTING)
            self._restart_requested.set()

    async def stop(self) -> None:
        """End supervision: when this returns the engine tree is gone and the state STOPPED."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait([self._task])  # never raises, even if the task was cancelled
            if not self._task.cancelled() and self._task.exception() is not None:
                log.error("worker %s: its task ended", self.id, exc_info=self._task.exception())
        await self._end_process("stopping")  # left by a task that did not end normally
        self._socket.remove()
        if self._socket_client is not None:
            await self._socket_client.aclose()
            self._socket_client = None
        self._set(WorkerState.STOPPED)

    async def retire(self, drain_timeout: float) -> None:
        """Leave rotation for good (DRAINING on the first await), let the requests in flight
        finish for up to `drain_timeout` seconds, then stop(): STOPPED when this returns."""
        self._is_retiring = True
        self._set(WorkerState.DRAINING)
        deadline = time.monotonic() + drain_timeout
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.in_flight:
            log.warning("worker %s: drain timed out with %d in flight", self.id, self.in_flight)
        await self.stop()

    async def park(self) -> None:
        """Stop the engine, yet stay startable (an on-demand model): IDLE on return, and
        start() starts it again."""
        if self._is_retiring:
            return
        await self.stop()
        self._stopping.clear()
        self._task = None
        self._set(WorkerState.IDLE)

    async def sleep(self) -> bool:
        """Put a ready engine to sleep (vLLM `POST /sleep`, level 1: weights to CPU memory,
        KV cache dropped): SLEEPING and out of rotation. False if the engine refused."""
        if self.state is not WorkerState.READY or not await self._post_engine("/sleep?level=1"):
            return False
        self._set(WorkerState.SLEEPING)
        return True

    async def wake(self) -> bool:
        """Wake a sleeping engine (vLLM `POST /wake_up`): READY again. False if it failed."""
        if self.state is not WorkerState.SLEEPING or not await self._post_engine("/wake_up"):
            return False
        self._set(WorkerState.READY)
        return True

    async def _post_engine(self, path: str) -> bool:
        assert self.launch is not None
        root = self.launch.base_url.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            resp = await self.client.post(root + path, headers=headers, timeout=300)
        except httpx.HTTPError as exc:
            log.error("worker %s: POST %s failed: %r", self.id, path, exc)
            return False
        if resp.status_code != 200:
            log.error("worker %s: POST %s answered %d", self.id, path, resp.status_code)
        return resp.status_code == 200

    async def log_lines(self, lines: int, rank: int = 0) -> list[str]:
        """The last `lines` of rank `rank`'s log; a worker on this host has rank 0 only."""
        if rank != 0:
            raise LookupError(f"worker `{self.id}` has one rank, 0")
        return tail(self.log_path, lines)

    def plan_launch(self) -> Launch:
        """Fresh ports and secret for the next start (a dead engine's ports may linger); for
        an engine on a Unix socket, the worker's socket path, cleared of a dead engine's file."""
        for port in (self.port, *self.side_ports):
            if port is not None:
                self._ports.release(port)
        self.port, self.side_ports = None, ()
        adapter = self._adapter
        on_socket = adapter.listens_on_socket
        self.port = self._ports.allocate() if adapter.has_process and not on_socket else None
        count = adapter.side_ports(self.slot.model)
        self.side_ports = tuple(self._ports.allocate() for _ in range(count))
        socket_path = str(self._socket.prepare()) if on_socket else None
        if socket_path and self._socket_client is None:
            # The path stays the worker's until stop(), which closes this client with it.
            transport = httpx.AsyncHTTPTransport(uds=socket_path)
            self._socket_client = httpx.AsyncClient(transport=transport, trust_env=False)
        secret = worker_secret()
        return adapter.launch(self.slot, self.port or 0, secret, self.side_ports, socket_path)

    def _set(self, state: WorkerState) -> None:
        if self._is_retiring and state not in (WorkerState.DRAINING, WorkerState.STOPPED):
            return  # its task may still see the engine recover; it stays out of rotation
        if state is self.state:
            return
        self.state = state
        try:
            self._on_change(self)
        except Exception:
            log.exception("worker %s: on_change failed", self.id)

    async def _run(self) -> None:
        """The worker's task: keep it ready until stop() or a crash loop. Never raises."""
        await self._end_process("stopping")  # an engine left by a task that was cancelled
        failures = 0
        while not self._stopping.is_set():
            self._restart_requested.clear()
            outcome = await self._start_once()
            if self._stopping.is_set():
                break
            if outcome == "restart requested":
                self._set(WorkerState.RESTARTING)  # out of rotation while it drains
                self.restarts += 1
                await self._end_process(outcome)
                continue  # at once: an operator's restart is not a failure, so no backoff
            if outcome == "no room":  # no engine was started: nothing to end, no crash
                # The start itself waited for room (a placement group, start_timeout): soon again.
                self._set(WorkerState.RESTARTING)
                await self._sleep(self._timings.backoff_base)
                continue
            if outcome == "refused":
                # A probe the engine can never pass: a wrong route or key. Starting again
                # would only wait out another startup_timeout; an operator's restart retries.
                await self._end_process(outcome)
                self._set(WorkerState.FAILED)
                return
            if self._stayed_up():
                failures = 0  # a new crash, not a crash loop
            failures += 1
            # Out of rotation before the engine is ended: its port may soon be someone else's.
            self._set(WorkerState.RESTARTING)
            await self._end_process(outcome)
            if failures >= self._timings.max_failures:
                log.error("worker %s failed %d times in a row; giving up", self.id, failures)
                self._set(WorkerState.FAILED)
                return
            self.restarts += 1
            await self._sleep(backoff(failures, self._timings))
        await self._end_process("stopping")
        self._set(WorkerState.STOPPED)

    def _stayed_up(self) -> bool:
        """Whether the last start became ready and ran `stable_after` since it began."""
        if self._ready_at is None or self.started_at is None:
            return False
        return time.monotonic() - self.started_at > self._timings.stable_after

    async def _start_once(self) -> Outcome:
        """Start the engine, wait until it is ready, watch it until it ends. Never raises."""
        self._ready_at = None
        try:
            self._set(WorkerState.STARTING)
            self.started_at = time.monotonic()
            await self._spawn()
            outcome = await self._wait_ready()
            if outcome != "ready":
                return outcome
            self._ready_at = time.monotonic()
            self.ready_seconds = self._ready_at - self.started_at
            self._set(WorkerState.READY)
            return await self._watch()
        except NoRoom as exc:
            log.warning("worker %s: %s; trying again", self.id, exc)
            self.last_error = [str(exc)]
            return "no room"
        except Exception:
            log.exception("worker %s: start or supervision failed", self.id)
            self.last_error = traceback.format_exc().splitlines()[-LAST_ERROR_LINES:]
            return "error"

    async def _spawn(self) -> None:
        """Plan this start and start its engine: `launch` (and `process`, for an engine we
        run) are set on return. backends/ray_launch.py starts its ranks on a cluster instead."""
        self.launch = self.plan_launch()
        if self.launch.has_process:
            self.process = await EngineProcess.start(
                self.launch.argv,
                self._child_env(self.launch),
                self.log_path,
                self._record,
                self._timings.stop_grace,
            )

    def _child_env(self, launch: Launch) -> dict[str, str]:
        """The gateway's environment minus its secrets and what would mix engines up."""
        hidden = self._hidden_env.union(launch.remove_env)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in hidden and not k.startswith(_ENGINEGATE_ENV)
        }
        env.update(launch.env)
        return env

    async def _wait_ready(self) -> Outcome:
        assert self.started_at is not None
        deadline = self.started_at + self.slot.model.startup_timeout
        said = ""  # the last cause logged: each new one once, not every poll
        while not self._stopping.is_set():
            if self.process and self.process.returncode is not None:
                return "exited"
            if self.process and time.monotonic() > deadline:
                log.warning("worker %s not ready in time; last probe: %s", self.id, said)
                return "timeout"  # an external server has no deadline: it may come later
            if self._restart_requested.is_set():
                return "restart requested"
            answer = await self._probe(full=True)
            if answer.ok:
                return "ready"
            if answer.verdict == "port taken":
                self._port_taken()
                return "port taken"
            if answer.verdict == "refused" and self.process:
                self._refused(answer.cause)
                return "refused"
            if answer.cause != said:
                said = answer.cause
                level = logging.ERROR if answer.verdict == "refused" else logging.INFO
                log.log(level, "worker %s not ready: %s", self.id, said)
            await self._sleep(self._timings.startup_poll)
        return "stopping"

    async def _watch(self) -> Outcome:
        misses = 0
        while not self._stopping.is_set():
            if self.process and self.process.returncode is not None:
                return "exited"
            if self._restart_requested.is_set():
                return "restart requested"
            answer = await self._probe(full=self.process is None)
            if answer.verdict == "port taken":
                self._port_taken()
                return "port taken"
            if answer.ok:
                misses = 0
                if self.state is WorkerState.UNHEALTHY:
                    self._set(WorkerState.READY)
            else:
                # One slow probe is not a dead engine: a CPU engine busy generating can miss
                # one. Out of rotation (and restarted, if we own it) only after several.
                misses += 1
                log.info("worker %s missed health check %d: %s", self.id, misses, answer.cause)
                if misses >= self._timings.unhealthy_after:
                    self._set(WorkerState.UNHEALTHY)
                    if self.process:
                        return "unhealthy"
            await self._sleep(self._timings.health_interval, until_exit=True)
        return "stopping"

    async def _probe(self, full: bool) -> Probe:
        assert self.launch is not None
        timeout = max(self._timings.health_timeout, self.launch.health_timeout or 0)
        owner = local_owner(self.process, self.port)
        return await probe(self.client, self.launch, owner, timeout, full)

    def _refused(self, cause: str) -> None:
        message = (
            f"worker {self.id}: its engine refused the readiness probe ({cause}). That does "
            "not pass by waiting: the engine release may not serve this route, or the key "
            "does not reach it (see the adapter's supported releases). Not restarted; "
            "POST /admin/workers/{id}/restart tries again."
        ).replace("{id}", self.id)
        log.error(message)
        self.last_error = [message, *tail(self.log_path, LAST_ERROR_LINES - 1)]

    def _port_taken(self) -> None:
        where = httpx.URL(self.base_url).netloc.decode()
        message = (
            f"worker {self.id}: {where} answers, but not from a process of its "
            "engine: another process holds the port. The worker key was not sent to it; "
            "starting again on a new port"
        )
        log.error(message)
        self.last_error = [message]

    async def _end_process(self, why: Outcome) -> None:
        """End the engine tree, if any. Never raises: the tree is killed if stop() fails."""
        process = self.process
        if process is None:
            return
        if why in ("exited", "timeout", "unhealthy"):
            self.last_error = tail(self.log_path, LAST_ERROR_LINES)
            log.warning(
                "worker %s %s; last log line: %s", self.id, why, (self.last_error or [""])[-1]
            )
        try:
            if why in ("unhealthy", "restart requested"):
                await self._drain()  # out of rotation already; let what it is answering finish
            await process.stop(self._timings.stop_grace)
        except Exception:
            log.exception("worker %s: stopping its engine failed; killing it", self.id)
            process.kill()
        finally:
            self.process = None

    async def _drain(self) -> None:
        """Wait (up to stop_grace) until no request is in flight on this worker."""
        deadline = time.monotonic() + self._timings.stop_grace
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def _sleep(self, seconds: float, until_exit: bool = False) -> None:
        """Sleep, waking early on stop() or restart() (and on the engine's exit when
        until_exit)."""
        events = (self._stopping, self._restart_requested)
        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(e.wait()) for e in events]
        if until_exit and self.process:
            waits.append(asyncio.ensure_future(self.process.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


class Supervisor:
    """Owns every worker; start() launches them all, stop() ends them all.

    `hidden_env` names environment variables no engine may see (those the config read the
    gateway's keys or an upstream's api_key from); `ENGINEGATE_*` are always left out.
    """

    def __init__(
        self,
        slots: list[Slot],
        state_dir: Path,
        client: httpx.AsyncClient,
        on_change: Callable[[Worker], None] = lambda worker: None,
        timings: Timings = Timings(),
        hidden_env: frozenset[str] = frozenset(),
        worker_type: Callable[..., Worker] = Worker,
    ) -> None:
        self.state_dir = state_dir
        self.hidden_env = hidden_env  # for workers added later too; a reload may change it
        ports = PortAllocator()

        def make(slot: Slot) -> Worker:
            # worker_type: Worker, or one taking the same arguments (ray_launch.RayWorker)
            return worker_type(slot, ports, client, state_dir, on_change, timings, self.hidden_env)

        self._make = make
        self.workers = [make(s) for s in slots]

    def by_model(self, name: str) -> list[Worker]:
        return [w for w in self.workers if w.model_name == name]

    def get(self, worker_id: str) -> Worker | None:
        return next((w for w in self.workers if w.id == worker_id), None)

    async def start(self) -> None:
        ended = end_leftovers(self.state_dir / "workers")
        if ended:
            log.warning("ended %d engine processes left by an earlier gateway", len(ended))
        for worker in self.workers:
            self._launch(worker)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """True once every worker is ready; False if one failed or the timeout passed."""
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            if all(w.is_ready for w in self.workers):
                return True
            if any(w.state is WorkerState.FAILED for w in self.workers):
                return False
            if deadline and time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)

    def add(self, slot: Slot, start: bool | None = None) -> Worker:
        """A new worker for `slot`, supervised from now on: STARTING on return, or IDLE for
        an on-demand model (`start` decides instead when given)."""
        if self.get(slot.worker_id) is not None:
            raise ValueError(f"worker id {slot.worker_id!r} is taken")
        worker = self._make(slot)
        self.workers.append(worker)
        self._launch(worker, start)
        return worker

    def _launch(self, worker: Worker, start: bool | None = None) -> None:
        if start is None:
            start = worker.slot.model.start != "on_demand"
        if start:
            worker.start()
        else:
            worker.state = WorkerState.IDLE

    async def retire(self, worker: Worker, drain_timeout: float) -> None:
        """Drain and stop one worker (Worker.retire), then forget it."""
        await worker.retire(drain_timeout)
        if worker in self.workers:
            self.workers.remove(worker)

    async def stop(self) -> None:
        await asyncio.gather(*(worker.stop() for worker in list(self.workers)))
