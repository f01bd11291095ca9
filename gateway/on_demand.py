"""Models on demand (`start: on_demand`): no engine until a request needs one.

    request ─▶ ensure_ready(model) ─▶ ready replica?  yes ─▶ on to routing
                                       no: make room in its `exclusive` group, start (or wake)
                                           its workers, wait until one is ready ─▶ routing
                                           (not in startup_timeout: 503 naming the states)
    every few seconds: a model unused for `idle_stop` is stopped (IDLE) or put to sleep
    (`idle_action: sleep`, SLEEPING)

The request that starts a model holds its admission slot while it waits, so `max_in_flight`
and `max_queue` bound the line of requests waiting for an engine too. Models of one exclusive
group take turns: the group's running model is stopped (or put to sleep) once it has no
request in flight, and then the requested one starts. Starts and stops of one model, or of
one group, never overlap (one lock each).
"""

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from prometheus_client import Counter

from backends.spec import ModelSpec
from backends.supervisor import Worker, WorkerState
from gateway.config import Config
from gateway.errors import NoReadyReplica
from gateway.state import Gateway

log = logging.getLogger("enginegate.on_demand")

NO_ENGINE = (WorkerState.IDLE, WorkerState.STOPPED, WorkerState.FAILED, WorkerState.SLEEPING)
RECENT = 1.0  # seconds: a model used this recently is not stopped to make room for another


class OnDemand:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._config: Config | None = None
        self._specs: dict[str, ModelSpec] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.last_used: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        registry = gateway.metrics.registry
        self.starts = Counter(
            "enginegate_on_demand_starts", "Engines started (or woken) by a request, by model",
            ["model"], registry=registry,
        )  # fmt: skip
        self.stops = Counter(
            "enginegate_on_demand_stops", "On-demand models stopped or put to sleep, by model "
            "and reason (idle, exclusive)", ["model", "reason"], registry=registry,
        )  # fmt: skip

    def specs(self) -> dict[str, ModelSpec]:
        """The on-demand models of the running config (which a reload may change)."""
        if self._config is not self.gateway.config:
            self._config = self.gateway.config
            self._specs = {m.name: m for m in self._config.models if m.start == "on_demand"}
        return self._specs

    def waiter(self, name: str) -> Coroutine[Any, Any, None] | None:
        """None when `name` can be routed to now (not on demand, or a replica is ready);
        else what to await until it can (ensure_ready). Cheap: the proxy asks per request."""
        spec = self.specs().get(name)
        if spec is None:
            return None
        self.last_used[name] = time.monotonic()
        if any(w.is_ready for w in self._workers(name)):
            return None
        return self.ensure_ready(spec)

    async def ensure_ready(self, spec: ModelSpec) -> None:
        """Return once the model has a ready replica, starting it if need be. Raises
        NoReadyReplica when it is not ready within its startup_timeout."""
        async with self._lock(spec):
            if not any(w.is_ready for w in self._workers(spec.name)):
                await self._make_room(spec)
                await self._start(spec)
        self.last_used[spec.name] = time.monotonic()

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch_idle(), name="on-demand idle stop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    def _workers(self, name: str) -> list[Worker]:
        return self.gateway.supervisor.by_model(name)

    def _lock(self, spec: ModelSpec) -> asyncio.Lock:
        return self._locks.setdefault(spec.exclusive or spec.name, asyncio.Lock())

    async def _start(self, spec: ModelSpec) -> None:
        began = time.monotonic()
        log.info("starting %s on demand", spec.name)
        self.starts.labels(spec.name).inc()
        for worker in self._workers(spec.name):
            if worker.state is WorkerState.SLEEPING:
                if not await worker.wake():
                    worker.restart()
            elif worker.state in NO_ENGINE:
                worker.restart()  # IDLE and FAILED alike: a fresh start, failures at zero
        deadline = began + spec.startup_timeout
        while not any(w.is_ready for w in self._workers(spec.name)):
            workers = self._workers(spec.name)
            gave_up = workers and all(w.state is WorkerState.FAILED for w in workers)
            if gave_up or time.monotonic() > deadline:
                states = ", ".join(f"{w.id} {w.state.value}" for w in workers)
                raise NoReadyReplica(
                    f"`{spec.name}` was started on demand and is not ready after "
                    f"{time.monotonic() - began:.0f} s: {states}"
                )
            await asyncio.sleep(0.1)
        log.info("%s ready on demand in %.1f s", spec.name, time.monotonic() - began)

    async def _make_room(self, spec: ModelSpec) -> None:
        """Stop the other running models of `spec`'s exclusive group, once idle."""
        if spec.exclusive is None:
            return
        others = [
            m for m in self.specs().values() if m.exclusive == spec.exclusive and m is not spec
        ]
        deadline = time.monotonic() + spec.startup_timeout
        for other in others:
            while self._is_busy(other.name) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self._has_engine(other.name):
                await self._idle(other, "exclusive")

    def _is_busy(self, name: str) -> bool:
        recent = time.monotonic() - self.last_used.get(name, 0) < RECENT
        return recent or any(w.in_flight for w in self._workers(name))

    def _has_engine(self, name: str) -> bool:
        return any(w.state not in NO_ENGINE for w in self._workers(name))

    async def _idle(self, spec: ModelSpec, reason: str) -> None:
        log.info("%s: %s (%s)", spec.name, f"{spec.idle_action} on demand", reason)
        self.stops.labels(spec.name, reason).inc()
        for worker in self._workers(spec.name):
            if spec.idle_action == "sleep" and await worker.sleep():
                continue
            await worker.park()

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for name, spec in list(self.specs().items()):
                if any(w.in_flight for w in self._workers(name)):
                    self.last_used[name] = now
                if spec.idle_stop is None or not self._has_engine(name):
                    continue
                if now - self.last_used.setdefault(name, now) < spec.idle_stop:
                    continue
                try:
                    async with self._lock(spec):
                        if not self._is_busy(name) and self._has_engine(name):
                            await self._idle(spec, "idle")
                except Exception:
                    log.exception("%s: idle stop failed", name)
