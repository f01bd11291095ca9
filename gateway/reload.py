"""What a reload changes: the running config against the file as it is now, as a plan.

    load + validate the file → diff by model → place what starts → check it fits → Plan

`diff` is pure. A model is *kept* when its engine settings are equal (only what the gateway
enforces changed: aliases, admission, routing, startup_timeout, on-demand start), *scaled*
when only `replicas` changed, *replaced* when anything else about its engine changed (flags,
command, model path, layout, env, devices), *started* when new and *stopped* when gone.
Gateway settings (keys, timeouts, limits) apply at once; those uvicorn holds (host, port, ...)
cannot change while the gateway runs, and a file that changes them is refused. Nothing here
starts or stops anything: gateway/rollout.py carries a plan out.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.adapters import ADAPTERS
from backends.base import Slot
from backends.fit import check
from backends.gpus import Inventory, read_inventory
from backends.placement import PlacementError, available_cores, count_gpus, plan
from backends.spec import ModelSpec
from gateway.config import Config, ConfigError, load_config

# Model keys the gateway enforces or only plans with: a change applies at once, no restart.
GATEWAY_FIELDS = frozenset(
    {
        "aliases",
        "max_in_flight",
        "max_queue",
        "queue_timeout",
        "routing",
        "prefix_chars",
        "startup_timeout",
        "config_json",
        "start",
        "idle_stop",
        "exclusive",
    }
)
# Gateway keys that uvicorn or the state directory hold for the life of the process.
FIXED_SETTINGS = ("host", "port", "state_dir", "database", "max_connections", "header_timeout",
                  "keepalive_timeout", "access_log")  # fmt: skip


@dataclass
class Plan:
    """Model names by what happens to them, and the gateway settings that change."""

    start: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    replace: list[str] = field(default_factory=list)
    scale: dict[str, tuple[int, int]] = field(default_factory=dict)  # name → (old, new)
    keep: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # key paths, e.g. gateway.read_timeout
    slots: dict[str, list[Slot]] = field(default_factory=dict)  # placed, for start/replace/scale

    @property
    def changes_engines(self) -> bool:
        return bool(self.start or self.stop or self.replace or self.scale)

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "stop": self.stop,
            "replace": self.replace,
            "scale": {name: {"from": a, "to": b} for name, (a, b) in self.scale.items()},
            "keep": self.keep,
            "settings": self.settings,
        }

    def describe(self) -> str:
        """One line per change, as `enginegate reload` and `check --reload` print them."""
        lines = [
            f"start    {name} ({len(self.slots.get(name, []))} replicas)" for name in self.start
        ]
        lines += [f"replace  {name} (replica by replica)" for name in self.replace]
        lines += [f"scale    {name} {a} -> {b} replicas" for name, (a, b) in self.scale.items()]
        lines += [f"stop     {name} (drained first)" for name in self.stop]
        lines += [f"apply    {key}" for key in self.settings]
        if not lines:
            lines.append("nothing changes")
        lines += [f"keep     {name}" for name in self.keep]
        return "\n".join(lines)


def engine_settings(spec: ModelSpec) -> dict[str, Any]:
    """What the engine process is started from; a change means new engines."""
    return spec.model_dump(exclude=set(GATEWAY_FIELDS) | {"replicas"})


def diff(old: Config, new: Config, stale: frozenset[str] = frozenset()) -> Plan:
    """The plan that turns `old` into `new` (slots left empty: `prepare` places them).
    `stale`: models with workers that run other engine settings than `old` says (a
    replacement that failed half-way): replaced whatever the file says."""
    result = Plan()
    before = {spec.name: spec for spec in old.models}
    for spec in new.models:
        was = before.get(spec.name)
        if was is None:
            result.start.append(spec.name)
        elif engine_settings(was) != engine_settings(spec) or spec.name in stale:
            result.replace.append(spec.name)
        elif was.replicas != spec.replicas:
            result.scale[spec.name] = (was.replicas, spec.replicas)
        else:
            result.keep.append(spec.name)
        if was is not None and _gateway_part(was) != _gateway_part(spec):
            result.settings.append(f"models[{new.models.index(spec)}] ({spec.name})")
    names = {spec.name for spec in new.models}
    result.stop = [spec.name for spec in old.models if spec.name not in names]
    a, b = old.gateway.model_dump(), new.gateway.model_dump()
    result.settings = [f"gateway.{k}" for k in a if a[k] != b[k]] + result.settings
    return result


def _gateway_part(spec: ModelSpec) -> dict[str, Any]:
    return spec.model_dump(include=set(GATEWAY_FIELDS))


def prepare(
    path: str | Path,
    running: Config,
    held_gpus: dict[str, tuple[int, ...]],
    stale: frozenset[str] = frozenset(),
) -> tuple[Config, Plan]:
    """Load `path`, diff it against `running` and place what starts; ConfigError (naming the
    file and key) for a file that does not validate, changes what cannot change while the
    gateway runs, or does not fit. `held_gpus`: the GPUs each running model's workers hold,
    which placement leaves to the models that keep them; `stale` as for diff."""
    file = str(path)
    new = load_config(path)
    result = diff(running, new, stale)
    fixed = [k for k in FIXED_SETTINGS if f"gateway.{k}" in result.settings]
    if fixed:
        raise ConfigError(
            file, [f"gateway.{k}: cannot change while the gateway runs; restart it" for k in fixed]
        )
    slots = _place(new, result, held_gpus, file)
    for name in [*result.start, *result.replace, *result.scale]:
        result.slots[name] = [s for s in slots if s.model.name == name]
    changing = [*result.replace, *result.stop, *result.scale]
    freed = {gpu for name in changing for gpu in held_gpus.get(name, ())}
    _refuse_unfit([s for group in result.slots.values() for s in group], file, new, freed)
    return new, result


def _place(
    config: Config, result: Plan, held_gpus: dict[str, tuple[int, ...]], file: str
) -> list[Slot]:
    """Place every replica, with kept (and scaled) models pinned to the GPUs they hold, so a
    new model is given what is left."""
    pinned = []
    for spec in config.models:
        gpus = held_gpus.get(spec.name)
        if spec.name in result.keep and spec.needs_gpus and spec.gpus is None and gpus:
            spec = spec.model_copy(update={"gpus": list(gpus)})
        pinned.append(spec)
    needs_gpus = any(spec.needs_gpus for spec in pinned)
    try:
        return plan(pinned, count_gpus() if needs_gpus else 0, available_cores())
    except PlacementError as exc:
        raise ConfigError(file, [str(exc)]) from None


def _refuse_unfit(slots: list[Slot], file: str, config: Config, freed: set[int]) -> None:
    if any(slot.gpus for slot in slots):
        inventory = as_if_freed(read_inventory(), freed)
    else:
        inventory = Inventory((), "none", "no model asks for GPUs")
    fits = check(slots, inventory, Path(file).parent, ADAPTERS)
    names = [spec.name for spec in config.models]
    problems = [
        f"models[{names.index(fit.model)}] ({fit.worker_id}): does not fit: {fit.problem}"
        for fit in fits
        if fit.fits is False
    ]
    if problems:
        raise ConfigError(file, problems)


def as_if_freed(inventory: Inventory, gpus: set[int]) -> Inventory:
    """`inventory` with `gpus` all free: the engines on them (of models being replaced or
    stopped) are gone before a successor starts there (a successor that cannot start beside
    them waits for them to stop)."""
    return dataclasses.replace(
        inventory,
        gpus=tuple(
            dataclasses.replace(gpu, free_bytes=gpu.total_bytes) if gpu.index in gpus else gpu
            for gpu in inventory.gpus
        ),
    )


def successor_id(worker_id: str, taken: set[str]) -> str:
    """`tiny-0` → `tiny-0.1`, `tiny-0.1` → `tiny-0.2`: the id of the worker that replaces it.

    Placement ids always end in `-N`, so one ending in `.N` is never a first worker's.
    """
    base, dot, generation = worker_id.rpartition(".")
    if not dot or not generation.isdigit() or "-" in generation:
        base, generation = worker_id, "0"
    n = int(generation) + 1
    while f"{base}.{n}" in taken:
        n += 1
    return f"{base}.{n}"


def successor_slot(slot: Slot, worker_id: str, spec: ModelSpec) -> Slot:
    """`slot` under another id and spec (same replica and devices)."""
    return dataclasses.replace(slot, worker_id=worker_id, model=spec)
