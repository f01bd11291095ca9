"""Changing the fleet while it serves: reloads and rolling replacements, one change at a time.

A replacement never leaves a replica's place empty when the devices allow otherwise:

    1. start the successor (`tiny-0` → `tiny-0.1`) beside the old worker;
    2. wait until it is ready: from then on routing sends it requests;
    3. the old worker drains (out of rotation, its requests in flight finish, up to
       `drain_timeout`), then its engine is stopped and the worker forgotten.

A successor that needs GPUs a live worker holds cannot start beside it: that worker drains and
stops first (one at a time). A successor that never becomes ready is stopped and the old worker
keeps serving; the rest of that model's replacement is called off and the change is reported
failed. A reload applies gateway settings at once (gateway/settings.py), drains and stops the
models that are gone, then starts, scales and replaces the rest, models side by side.
"""

import asyncio
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from backends.base import Slot
from backends.supervisor import Worker, WorkerState
from gateway.config import Config, ConfigError
from gateway.errors import ClientError, NotFound
from gateway.reload import Plan, engine_settings, prepare, successor_id, successor_slot
from gateway.settings import apply_settings, forget_models
from gateway.state import Gateway

log = logging.getLogger("enginegate.rollout")

READY_SLACK = 5.0  # seconds past startup_timeout a successor may take before it is given up
# Starts a successor gets before its replacement is given up: the supervisor starts a hung one
# again after startup_timeout, and that second start usually succeeds (seen with vLLM CPU: a
# worker stuck in its first seconds for 7 minutes, the next start ready in 23 s).
START_TRIES = 2


class Busy(ClientError):
    status = 409
    type = "conflict"
    code = "change_in_progress"


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "enginegate_reloads", "Reloads asked for, by result (applied, refused, failed)",
            ["result"], registry=registry,
        )  # fmt: skip
        self.replacements = Counter(
            "enginegate_replacements", "Workers replaced by a successor, by model and result",
            ["model", "result"], registry=registry,
        )  # fmt: skip


class Rollout:
    """Owns every change to the running fleet. `last` describes the latest change."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.metrics = RolloutMetrics(gateway.metrics.registry)
        self.last: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def is_busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def plan(self, path: str | Path | None = None) -> tuple[Config, Plan]:
        """What reloading `path` (default: the running config's file) would do; ConfigError
        when the file cannot be applied."""
        running = self.gateway.config
        path = path or running.path
        if path is None:
            raise ConfigError("(no file)", ["the gateway was not started from a config file"])
        held: dict[str, tuple[int, ...]] = {}
        specs = {spec.name: spec for spec in running.models}
        stale = set()
        for worker in self.gateway.supervisor.workers:
            held[worker.model_name] = held.get(worker.model_name, ()) + worker.slot.gpus
            spec = specs.get(worker.model_name)
            if spec and engine_settings(spec) != engine_settings(worker.slot.model):
                stale.add(worker.model_name)
        return prepare(path, running, held, frozenset(stale))

    def reload(self, path: str | Path | None = None) -> Plan:
        """Plan, then apply in the background; raises Busy or ConfigError (nothing changed)."""
        self._refuse_if_busy()
        began = time.monotonic()
        try:
            config, plan = self.plan(path)
        except ConfigError:
            self.metrics.reloads.labels("refused").inc()
            raise
        self._begin("reload", plan.as_dict(), self._apply(config, plan), began)
        return plan

    def restart(self, model: str | None = None, worker_id: str | None = None) -> list[str]:
        """Replace every worker of `model` (or the one `worker_id`) with a fresh one, replica
        by replica, in the background; the ids replaced. Raises Busy or NotFound."""
        self._refuse_if_busy()
        supervisor = self.gateway.supervisor
        if worker_id is not None:
            found = supervisor.get(worker_id)
            if found is None:
                raise NotFound(f"no worker `{worker_id}`; see GET /admin/workers")
            workers = [found]
        else:
            workers = supervisor.by_model(model or "")
            if not workers:
                raise NotFound(f"no model `{model}` with workers; see GET /admin/status")
        ids = [w.id for w in workers]
        what = {"workers": ids}
        pairs: list[tuple[Worker | None, Slot | None]] = [(w, w.slot) for w in workers]
        self._begin("restart", what, self._replace_all(pairs))
        return ids

    async def wait(self) -> None:
        """Until the change under way, if any, is done."""
        if self._task is not None:
            await asyncio.wait([self._task])

    async def stop(self) -> None:
        """Call off the change under way (the gateway is stopping: its workers stop too)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])

    def _refuse_if_busy(self) -> None:
        if self.is_busy:
            assert self.last is not None
            raise Busy(f"a {self.last['kind']} is under way; see GET /admin/reload")

    def _begin(
        self,
        kind: str,
        what: dict[str, Any],
        work: Coroutine[Any, Any, None],
        began: float | None = None,
    ) -> None:
        """Run `work` as the change under way; `seconds` counts from `began` (the plan's
        start), else from now."""
        self.last = {"kind": kind, "state": "applying", "plan": what, "errors": [],
                     "started": time.time(), "seconds": None}  # fmt: skip
        began = began if began is not None else time.monotonic()
        self._task = asyncio.create_task(self._run(kind, work, began), name=kind)

    async def _run(self, kind: str, work: Coroutine[Any, Any, None], began: float) -> None:
        assert self.last is not None
        try:
            await work
        except Exception as exc:
            log.exception("%s failed", kind)
            self.last["errors"].append(f"{type(exc).__name__}: {exc}")
        failed = bool(self.last["errors"])
        self.last["state"] = "failed" if failed else "done"
        self.last["seconds"] = round(time.monotonic() - began, 3)
        if kind == "reload":
            self.metrics.reloads.labels("failed" if failed else "applied").inc()
        log.info("%s %s in %.3f s", kind, self.last["state"], self.last["seconds"])

    async def _apply(self, config: Config, plan: Plan) -> None:
        gateway, supervisor = self.gateway, self.gateway.supervisor
        apply_settings(gateway, config)
        supervisor.hidden_env = supervisor.hidden_env | config.secret_env
        specs = {spec.name: spec for spec in config.models}
        for name in plan.keep:  # their engines stay; what the gateway enforces is new
            for worker in supervisor.by_model(name):
                worker.slot = successor_slot(worker.slot, worker.id, specs[name])
                if worker.state is WorkerState.IDLE and specs[name].start == "always":
                    worker.start()  # no longer on demand
        drain = config.gateway.drain_timeout
        gone = [w for name in plan.stop for w in supervisor.by_model(name)]
        await asyncio.gather(*(supervisor.retire(w, drain) for w in gone))
        forget_models(gateway, plan.stop)
        changes = [self._start(plan.slots[name]) for name in plan.start]
        changes += [self._scale(name, plan.slots[name]) for name in plan.scale]
        changes += [self._replace_all(self._pairs(name, plan.slots[name])) for name in plan.replace]
        await asyncio.gather(*changes)

    def _pairs(self, name: str, slots: list[Slot]) -> list[tuple[Worker | None, Slot | None]]:
        """Each new slot with the worker of the same replica, if any; surplus workers, with
        no slot, are retired by _replace_all."""
        workers = {w.slot.replica: w for w in self.gateway.supervisor.by_model(name)}
        pairs: list[tuple[Worker | None, Slot | None]]
        pairs = [(workers.pop(s.replica, None), s) for s in slots]
        return pairs + [(w, None) for w in workers.values()]

    async def _start(self, slots: list[Slot]) -> None:
        supervisor = self.gateway.supervisor
        for slot in slots:
            supervisor.add(self._free_id(slot))

    async def _scale(self, name: str, slots: list[Slot]) -> None:
        supervisor = self.gateway.supervisor
        by_replica = {w.slot.replica: w for w in supervisor.by_model(name)}
        drain = self.gateway.config.gateway.drain_timeout
        for slot in slots:
            worker = by_replica.pop(slot.replica, None)
            if worker is not None:
                worker.slot = successor_slot(worker.slot, worker.id, slot.model)
            else:
                supervisor.add(self._free_id(slot))
        await asyncio.gather(*(supervisor.retire(w, drain) for w in by_replica.values()))

    async def _replace_all(self, pairs: list[tuple[Worker | None, Slot | None]]) -> None:
        supervisor = self.gateway.supervisor
        drain = self.gateway.config.gateway.drain_timeout
        for old, slot in pairs:
            if slot is None:
                assert old is not None
                await supervisor.retire(old, drain)
            elif old is None:
                await self._until_ready(supervisor.add(self._free_id(slot)))
            elif not await self.replace(old, slot):
                return  # the old worker still serves; the rest is called off

    async def replace(self, old: Worker, slot: Slot) -> bool:
        """Replace `old` with a worker for `slot` (module docstring); False if the successor
        never became ready (then `old` is left as it was, if it still runs)."""
        supervisor = self.gateway.supervisor
        drain = self.gateway.config.gateway.drain_timeout
        if old.state is WorkerState.IDLE:  # on demand, no engine: its next start is new
            old.slot = successor_slot(slot, old.id, slot.model)
            return True
        taken = {w.id for w in supervisor.workers}
        new_slot = successor_slot(slot, successor_id(old.id, taken), slot.model)
        # Placement gave other models other GPUs (exclusive groups take turns on their own),
        # so only this model's workers can hold the successor's.
        blockers = [
            w
            for w in supervisor.by_model(old.model_name)
            if set(w.slot.gpus) & set(new_slot.gpus) and w is not old
        ]
        first = [*blockers, old] if set(old.slot.gpus) & set(new_slot.gpus) else blockers
        for worker in first:  # one at a time: its devices are the successor's
            await supervisor.retire(worker, drain)
        successor = supervisor.add(new_slot, start=True)
        successor.replaces, old.replaced_by = old.id, successor.id
        model = old.model_name
        if not await self._until_ready(successor):
            self.metrics.replacements.labels(model, "failed").inc()
            message = f"{successor.id} did not become ready ({successor.state.value})"
            message += "; " + (successor.last_error or ["see its log"])[-1]
            assert self.last is not None
            self.last["errors"].append(message)
            log.error("replacing %s: %s", old.id, message)
            old.replaced_by = None
            await supervisor.retire(successor, 0)
            return False
        await supervisor.retire(old, drain)
        self.metrics.replacements.labels(model, "done").inc()
        log.info("worker %s replaced by %s", old.id, successor.id)
        return True

    async def _until_ready(self, worker: Worker) -> bool:
        each = worker.slot.model.startup_timeout + READY_SLACK
        deadline = time.monotonic() + START_TRIES * each
        while not worker.is_ready:
            if worker.state is WorkerState.IDLE:
                return True  # on demand: it starts with its first request
            if worker.state in (WorkerState.FAILED, WorkerState.STOPPED):
                return False
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    def _free_id(self, slot: Slot) -> Slot:
        taken = {w.id for w in self.gateway.supervisor.workers}
        if slot.worker_id not in taken:
            return slot
        return successor_slot(slot, successor_id(slot.worker_id, taken), slot.model)
