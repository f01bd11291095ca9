"""Does each replica fit on the GPUs placement gave it? The engines' own memory rules.

Each engine sizes its KV cache from a share of GPU memory, and refuses to start when the cache
cannot hold one request of the full context. The share and what it must hold are the engine's
own rule, its adapter's `memory_budget`; this module applies it per GPU (the tightest of the
replica's block) and checks the KV room against one full context.
"""

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from backends.base import Adapter, Slot
from backends.gpus import Gpu, Inventory
from backends.memory import Estimate, estimate, format_gib, load_shape


@dataclass(frozen=True)
class Fit:
    """One replica against its GPUs; byte figures are per GPU."""

    worker_id: str
    model: str
    engine: str
    gpus: tuple[int, ...]
    estimate: Estimate | None
    unknown: str = ""  # why there is no estimate or no check
    budget: int | None = None  # what the engine will take for weights (+ overhead) + KV
    budget_rule: str = ""
    kv_room: int | None = None  # what is left of the budget for the KV cache
    problem: str = ""  # why it does not fit; "" when it does or when unknown

    @property
    def fits(self) -> bool | None:
        if self.problem:
            return False
        return None if self.kv_room is None else True

    @property
    def kv_tokens(self) -> int | None:
        if self.kv_room is None or self.estimate is None or not self.estimate.kv_per_token:
            return None
        return max(0, self.kv_room) // self.estimate.kv_per_token


def check(
    slots: list[Slot], inventory: Inventory, base_dir: Path, adapters: Mapping[str, Adapter]
) -> list[Fit]:
    """One Fit per replica, in plan order; `base_dir` resolves relative `config_json` paths,
    `adapters` are the engines' by backend name."""
    by_index = {gpu.index: gpu for gpu in inventory.gpus}
    return [_check_slot(slot, adapters[slot.model.backend], by_index, base_dir) for slot in slots]


def _check_slot(slot: Slot, adapter: Adapter, gpus: dict[int, Gpu], base_dir: Path) -> Fit:
    spec = slot.model
    row = Fit(slot.worker_id, spec.name, spec.backend, slot.gpus, None)
    if not adapter.has_process:
        return replace(row, unknown=f"{spec.backend}: runs elsewhere")
    if not slot.gpus:
        return replace(row, unknown=f"cpu: KV cache {spec.kv_cache_gib:g} GiB of RAM")
    shape = load_shape(spec, base_dir)
    if isinstance(shape, str):
        return replace(row, unknown=shape)
    try:
        need = estimate(shape, spec, adapter.context_flag)
    except ValueError as exc:
        return replace(row, unknown=f"unknown ({exc})")
    row = replace(row, estimate=need)
    block = [gpus[index] for index in slot.gpus if index in gpus]
    if len(block) != len(slot.gpus):
        return replace(row, unknown="no memory figures for these GPUs")
    total = min(gpu.total_bytes for gpu in block)
    free = min(gpu.free_bytes for gpu in block)
    budget = adapter.memory_budget(need, total, free, spec)
    if budget is None:
        return replace(row, unknown=f"{spec.backend}: no memory rule")
    row = replace(row, budget=budget.total, budget_rule=budget.rule, kv_room=budget.kv_room)
    if budget.problem:
        return replace(row, problem=budget.problem)
    return _judge_kv(row, need)


def _judge_kv(row: Fit, need: Estimate) -> Fit:
    if row.kv_room is not None and row.kv_room < need.kv_for_context:
        return replace(
            row,
            problem=f"KV room {format_gib(max(0, row.kv_room))} < one full context: "
            f"{need.context} tokens x {need.kv_per_token} B = {format_gib(need.kv_for_context)}",
        )
    return row
