"""Does each replica fit on the GPUs placement gave it? The engines' own memory rules.

Each engine sizes its KV cache from a share of GPU memory, and refuses to start when the cache
cannot hold one request of the full context. Per GPU (the tightest of the replica's block):

- vLLM: `--gpu-memory-utilization` (0.92) of *total* memory holds weights, activations and the
  KV cache, and that much must be free at start.
- SGLang: `--mem-fraction-static` of total holds weights and KV cache; the rest is kept for
  activations and CUDA graphs, and memory other processes hold comes out of the KV cache.
  Unset, the fraction follows `_sglang_reserve` (SGLang 0.5.23 `arg_groups/memory_hook.py`).
- LMDeploy: `--cache-max-entry-count` (0.8) of the memory *free after the weights* is the KV cache.
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from backends.base import Slot
from backends.gpus import MIB, Gpu, Inventory
from backends.memory import GIB, Estimate, estimate, load_shape

VLLM_UTILIZATION = 0.92
LMDEPLOY_CACHE_SHARE = 0.8


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


def check(slots: list[Slot], inventory: Inventory, base_dir: Path) -> list[Fit]:
    """One Fit per replica, in plan order; `base_dir` resolves relative `config_json` paths."""
    by_index = {gpu.index: gpu for gpu in inventory.gpus}
    return [_check_slot(slot, by_index, base_dir) for slot in slots]


def _check_slot(slot: Slot, gpus: dict[int, Gpu], base_dir: Path) -> Fit:
    spec = slot.model
    row = Fit(slot.worker_id, spec.name, spec.backend, slot.gpus, None)
    if spec.backend == "external":
        return replace(row, unknown="external: runs elsewhere")
    if not slot.gpus:
        return replace(row, unknown=f"cpu: KV cache {spec.kv_cache_gib:g} GiB of RAM")
    shape = load_shape(spec, base_dir)
    if isinstance(shape, str):
        return replace(row, unknown=shape)
    try:
        figures = estimate(shape, spec)
    except ValueError as exc:
        return replace(row, unknown=f"unknown ({exc})")
    row = replace(row, estimate=figures)
    block = [gpus[index] for index in slot.gpus if index in gpus]
    if len(block) != len(slot.gpus):
        return replace(row, unknown="no memory figures for these GPUs")
    total = min(gpu.total_bytes for gpu in block)
    free = min(gpu.free_bytes for gpu in block)
    return _judge(row, figures, total, free, spec.engine_args)


def _judge(row: Fit, need: Estimate, total: int, free: int, args: dict[str, Any]) -> Fit:
    if row.engine == "lmdeploy":
        share = float(args.get("cache-max-entry-count", LMDEPLOY_CACHE_SHARE))
        rule = f"{share:g} x (free {_gib(free)} - weights - overhead)"
        after_weights = free - need.weights - need.overhead
        row = replace(row, budget=free, budget_rule=rule, kv_room=int(share * after_weights))
        if after_weights <= 0:
            loaded = _gib(need.weights + need.overhead)
            return replace(row, problem=f"weights + overhead {loaded} > free {_gib(free)}")
    elif row.engine == "sglang":
        share, rule = _sglang_fraction(row, need, total, args)
        budget = int(share * total)
        row = replace(row, budget=budget, budget_rule=rule)
        row = replace(row, kv_room=budget - need.weights - (total - free))
    else:
        share = float(args.get("gpu-memory-utilization", VLLM_UTILIZATION))
        rule = f"{share:g} x total {_gib(total)}"
        budget = int(share * total)
        # The share holds activations too; vLLM refuses to start if it is not free.
        kv_room = budget - need.weights - need.overhead
        row = replace(row, budget=budget, budget_rule=rule, kv_room=kv_room)
        if budget > free:
            return replace(row, problem=f"{rule} = {_gib(budget)} > free {_gib(free)}")
    if row.kv_room is not None and row.kv_room < need.kv_for_context:
        return replace(
            row,
            problem=f"KV room {_gib(max(0, row.kv_room))} < one full context: "
            f"{need.context} tokens x {need.kv_per_token} B = {_gib(need.kv_for_context)}",
        )
    return row


def _sglang_fraction(
    row: Fit, need: Estimate, total: int, args: dict[str, Any]
) -> tuple[float, str]:
    if "mem-fraction-static" in args:
        share = float(args["mem-fraction-static"])
        return share, f"{share:g} x total {_gib(total)}"
    reserve = _sglang_reserve(total // MIB, len(row.gpus), need.is_mla) * MIB
    share = round((total - reserve) / total, 3)
    return share, f"auto {share:g} x total {_gib(total)}"


def _sglang_reserve(total_mib: int, ranks: int, is_mla: bool) -> float:
    """MiB SGLang keeps outside --mem-fraction-static when it picks the fraction itself:
    activations for one prefill chunk, CUDA graphs, a slack per 8 ranks. Its own figure also
    depends on flags not modelled here (DP attention, speculative decoding, DeepEP)."""
    sizes = ((20, 2048, 8), (35, 4096, 160), (60, 4096, 160), (160, 8192, 512))
    chunk, max_bs = next(((c, b) for gib, c, b in sizes if total_mib < gib * 1024), (16384, 512))
    reserve = 512 + 1.5 * max(chunk, 2048) + ranks / 8 * 1024 + 2 * max_bs
    reserve += 1.5 * 1024 if is_mla else 0  # prefill CUDA graphs with an MLA backend
    return max(reserve, 10 * 1024) if total_mib > 60 * 1024 else reserve


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"
