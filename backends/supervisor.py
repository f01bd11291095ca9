"""Workers and their supervisor.

A `Worker` is one replica: one engine process tree (or one external URL) and its state.
One asyncio task per worker drives it:

    starting ──ready──▶ ready ──crash or failed health──▶ restarting ──backoff──▶ starting
        │                  │                                   │
        └── crash, timeout ┴──────── too many in a row ───────▶ failed
    any state ── stop() ──▶ stopped

The gateway reads `state`, `base_url`, `api_key` and keeps `in_flight` for routing; nothing
here imports the gateway.
"""

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import httpx

from backends.base import Adapter, Launch, Slot
from backends.external import ExternalAdapter
from backends.lmdeploy import LmdeployAdapter
from backends.ports import PortAllocator
from backends.process import EngineProcess, end_leftovers, tail
from backends.sglang import SglangAdapter
from backends.vllm import VllmAdapter

log = logging.getLogger("enginegate.supervisor")

ADAPTERS: dict[str, Adapter] = {
    "vllm": VllmAdapter(),
    "sglang": SglangAdapter(),
    "lmdeploy": LmdeployAdapter(),
    "external": ExternalAdapter(),
}


class WorkerState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
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


class Worker:
    def __init__(
        self,
        slot: Slot,
        ports: PortAllocator,
        client: httpx.AsyncClient,
        state_dir: Path,
        on_change: Callable[["Worker"], None] = lambda worker: None,
        timings: Timings = Timings(),
    ) -> None:
        self.slot = slot
        self.id = slot.worker_id
        self.model_name = slot.model.name
        self.state = WorkerState.STOPPED
        self.restarts = 0
        self.in_flight = 0
        self.launch: Launch | None = None
        self.process: EngineProcess | None = None
        self.port: int | None = None
        self.side_ports: tuple[int, ...] = ()  # the engine's own, e.g. SGLang's --nccl-port
        self.started_at: float | None = None
        self.ready_seconds: float | None = None  # how long the last start took
        self.last_error: list[str] = []
        self.log_path = state_dir / "logs" / f"{self.id}.log"
        self._record = state_dir / "workers" / f"{self.id}.json"
        self._ports = ports
        self._client = client
        self._on_change = on_change
        self._timings = timings
        self._adapter = ADAPTERS[slot.model.backend]
        self._stopping = asyncio.Event()
        self._restart_requested = asyncio.Event()

    @property
    def is_ready(self) -> bool:
        return self.state is WorkerState.READY

    @property
    def base_url(self) -> str:
        assert self.launch is not None, "worker has not been started"
        return self.launch.base_url

    @property
    def api_key(self) -> str | None:
        return self.launch.api_key if self.launch else None

    @property
    def upstream_model(self) -> str:
        return self.launch.served_name if self.launch else self.model_name

    def _set(self, state: WorkerState) -> None:
        if state is not self.state:
            self.state = state
            self._on_change(self)

    def plan_launch(self) -> Launch:
        """Fresh ports and secret for the next start (a dead engine's ports may linger)."""
        for port in (self.port, *self.side_ports):
            if port is not None:
                self._ports.release(port)
        self.port = self._ports.allocate() if self.slot.model.backend != "external" else None
        count = self._adapter.side_ports(self.slot.model)
        self.side_ports = tuple(self._ports.allocate() for _ in range(count))
        secret = secrets.token_urlsafe(32)
        return self._adapter.launch(self.slot, self.port or 0, secret, self.side_ports)

    async def run(self) -> None:
        """Keep the worker ready until stop() or a crash loop. Never raises."""
        failures = 0
        while not self._stopping.is_set():
            self._restart_requested.clear()
            self.launch = self.plan_launch()
            self._set(WorkerState.STARTING)
            self.started_at = time.monotonic()
            if self.launch.has_process:
                self.process = await EngineProcess.start(
                    self.launch.argv,
                    self._child_env(self.launch),
                    self.log_path,
                    self._record,
                    self._timings.stop_grace,
                )
            outcome = await self._wait_ready()
            if outcome == "ready":
                self.ready_seconds = time.monotonic() - self.started_at
                self._set(WorkerState.READY)
                outcome = await self._watch()
                if time.monotonic() - self.started_at > self._timings.stable_after:
                    failures = 0
            if self._stopping.is_set():
                break
            if outcome == "restart requested":
                self._set(WorkerState.RESTARTING)  # out of rotation while it drains
                self.restarts += 1
                await self._end_process(outcome)
                continue  # at once: an operator's restart is not a failure, so no backoff
            failures += 1
            await self._end_process(outcome)
            if failures >= self._timings.max_failures:
                log.error("worker %s failed %d times in a row; giving up", self.id, failures)
                self._set(WorkerState.FAILED)
                return
            self._set(WorkerState.RESTARTING)
            self.restarts += 1
            await self._sleep(backoff(failures, self._timings))
        await self._end_process("stopping")
        self._set(WorkerState.STOPPED)

    async def stop(self) -> None:
        """Ask run() to end; the caller awaits the run task to know the tree is gone."""
        self._stopping.set()

    def request_restart(self) -> None:
        """Ask run() to end the engine (letting requests in flight finish) and start a fresh
        one now. It counts as a restart, not as a failure. No effect once stop() was called."""
        self._restart_requested.set()

    def _child_env(self, launch: Launch) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in launch.remove_env}
        env.update(launch.env)
        return env

    async def _wait_ready(self) -> str:
        assert self.started_at is not None
        deadline = self.started_at + self.slot.model.startup_timeout
        while not self._stopping.is_set():
            if self.process and self.process.returncode is not None:
                return "exited"
            if self.process and time.monotonic() > deadline:
                return "timeout"  # an external server has no deadline: it may come later
            if self._restart_requested.is_set():
                return "restart requested"
            if await self.probe(full=True):
                return "ready"
            await self._sleep(self._timings.startup_poll)
        return "stopping"

    async def _watch(self) -> str:
        misses = 0
        while not self._stopping.is_set():
            if self.process and self.process.returncode is not None:
                return "exited"
            if self._restart_requested.is_set():
                return "restart requested"
            if await self.probe(full=self.process is None):
                misses = 0
                if self.state is WorkerState.UNHEALTHY:
                    self._set(WorkerState.READY)
            else:
                # One slow probe is not a dead engine: a CPU engine busy generating can miss
                # one. Out of rotation (and restarted, if we own it) only after several.
                misses += 1
                log.info("worker %s missed health check %d", self.id, misses)
                if misses >= self._timings.unhealthy_after:
                    self._set(WorkerState.UNHEALTHY)
                    if self.process:
                        return "unhealthy"
            await self._sleep(self._timings.health_interval, until_exit=True)
        return "stopping"

    async def probe(self, full: bool) -> bool:
        """Liveness from the health URL; `full` also needs the model listed under /models."""
        launch = self.launch
        assert launch is not None
        timeout = self._timings.health_timeout
        try:
            if launch.health_url:
                resp = await self._client.get(launch.health_url, timeout=timeout)
                if resp.status_code != 200:
                    return False
            if not full:
                return True
            headers = {"Authorization": f"Bearer {launch.api_key}"} if launch.api_key else {}
            resp = await self._client.get(
                f"{launch.base_url}/models", headers=headers, timeout=timeout
            )
            if resp.status_code != 200:
                return False
            if not launch.has_process:
                return True  # an external server may list many names or none
            return any(m.get("id") == launch.served_name for m in resp.json().get("data", []))
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    async def _end_process(self, why: str) -> None:
        if self.process is None:
            return
        if why not in ("stopping", "restart requested"):
            self.last_error = tail(self.log_path, 30)
            log.warning(
                "worker %s %s; last log line: %s", self.id, why, (self.last_error or [""])[-1]
            )
        if why in ("unhealthy", "restart requested"):
            await self._drain()  # out of rotation already; let what it is answering finish
        await self.process.stop(self._timings.stop_grace)
        self.process = None

    async def _drain(self) -> None:
        """Wait (up to stop_grace) until no request is in flight on this worker."""
        deadline = time.monotonic() + self._timings.stop_grace
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def _sleep(self, seconds: float, until_exit: bool = False) -> None:
        """Sleep, waking early on stop() or request_restart() (and on the engine's exit when
        until_exit)."""
        events = (self._stopping, self._restart_requested)
        waits = [asyncio.ensure_future(event.wait()) for event in events]
        if until_exit and self.process:
            waits.append(asyncio.ensure_future(self.process.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


class Supervisor:
    """Owns every worker; start() launches them all, stop() ends them all."""

    def __init__(
        self,
        slots: list[Slot],
        state_dir: Path,
        client: httpx.AsyncClient,
        on_change: Callable[[Worker], None] = lambda worker: None,
        timings: Timings = Timings(),
    ) -> None:
        self.state_dir = state_dir
        ports = PortAllocator()
        self.workers = [Worker(s, ports, client, state_dir, on_change, timings) for s in slots]
        self._tasks: list[asyncio.Task[None]] = []

    def by_model(self, name: str) -> list[Worker]:
        return [w for w in self.workers if w.model_name == name]

    def get(self, worker_id: str) -> Worker | None:
        return next((w for w in self.workers if w.id == worker_id), None)

    def restart(self, worker: Worker) -> None:
        """Restart one worker now: a live one ends its engine and starts again; a failed one,
        whose run() has ended, gets a fresh run() with its failure count back at zero."""
        if worker.state is WorkerState.FAILED:
            self._tasks.append(asyncio.create_task(worker.run(), name=f"worker {worker.id}"))
        else:
            worker.request_restart()

    async def start(self) -> None:
        ended = end_leftovers(self.state_dir / "workers")
        if ended:
            log.warning("ended %d engine process trees left by an earlier gateway", len(ended))
        self._tasks = [asyncio.create_task(w.run(), name=f"worker {w.id}") for w in self.workers]

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

    async def stop(self) -> None:
        for worker in self.workers:
            await worker.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
