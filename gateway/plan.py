"""`enginegate plan`: which GPUs each replica gets and whether it fits, before anything starts.

`serve` and `check` go through `prepare()` as well, so a fleet that cannot fit is refused with
the figures that show why instead of half-starting. Figures are per GPU of a replica.
"""

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.adapters import ADAPTERS
from backends.base import Slot
from backends.fit import Fit, check
from backends.gpus import Inventory, inventory_from_json, read_inventory
from backends.memory import format_gib
from gateway import cluster_plan
from gateway.config import Config, ConfigError, load_config, plan_workers


def add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="only this model of the config (repeat for more), e.g. one of several alternatives",
    )
    parser.add_argument(
        "--inventory",
        metavar="FILE",
        help="plan against the GPUs listed in this JSON file instead of this machine's",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="enginegate.yaml", help="config file")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_selection(parser)


@dataclass(frozen=True)
class Plan:
    config: Config  # with only the selected models
    slots: list[Slot]
    inventory: Inventory
    fits: list[Fit]
    positions: list[int]  # where each selected model stands in the file, for key paths

    def refuse(self, file: str) -> None:
        """ConfigError when any replica does not fit."""
        problems = [
            f"models[{self._position(fit.model)}] ({fit.worker_id} on GPUs {_gpus(fit.gpus)}): "
            f"does not fit: {fit.problem}"
            for fit in self.fits
            if fit.fits is False
        ]
        if problems:
            raise ConfigError(file, problems)

    def _position(self, name: str) -> int:
        names = [spec.name for spec in self.config.models]
        return self.positions[names.index(name)]


def prepare(args: argparse.Namespace) -> Plan:
    """Load, select, place and size; ConfigError names the file and key at fault."""
    file = args.config
    config, positions = select(load_config(file), args.only or [], file)
    if config.cluster is not None:
        # GPUs are the cluster's: no local inventory, and the fit is Ray's nodes' totals.
        slots = cluster_plan.slots(file, config, positions)
        return Plan(config, slots, Inventory(gpus=(), source="the Ray cluster"), [], positions)
    inventory = _inventory(config, args.inventory, file)
    try:
        slots = plan_workers(config, file, gpu_count=len(inventory.gpus))
    except ConfigError as exc:
        problems = [_in_file(problem, positions) for problem in exc.problems]
        raise ConfigError(file, problems + _gpu_shortage(config, inventory)) from None
    fits = check(slots, inventory, Path(file).parent, ADAPTERS)
    return Plan(config, slots, inventory, fits, positions)


def _in_file(problem: str, positions: list[int]) -> str:
    """`models[0]` of the selection → `models[2]` of the file."""
    return re.sub(r"models\[(\d+)\]", lambda m: f"models[{positions[int(m[1])]}]", problem)


def _gpu_shortage(config: Config, inventory: Inventory) -> list[str]:
    """Why placement ran out of GPUs: none found, or the sum of what the models need."""
    needs = {spec.name: spec.ranks * spec.replicas for spec in config.models if spec.needs_gpus}
    if not inventory.gpus and needs:
        return [f"GPUs: {inventory.note or 'none in ' + inventory.source}"]
    if len(needs) < 2 or sum(needs.values()) <= len(inventory.gpus):
        return []
    parts = ", ".join(f"{name} {count}" for name, count in needs.items())
    return [
        f"models: need {sum(needs.values())} GPUs together ({parts}), this machine has "
        f"{len(inventory.gpus)}; plan alternatives one at a time with --only NAME"
    ]


def run(args: argparse.Namespace) -> int:
    """The `plan` command: print the plan; 1 when it cannot be carried out."""
    try:
        config, positions = select(load_config(args.config), args.only or [], args.config)
        if config.cluster is not None:
            return cluster_plan.run(args, config, positions)
        plan = prepare(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    render = render_json if args.json else render_table
    print(render(plan.inventory, plan.fits))
    try:
        plan.refuse(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def select(config: Config, only: list[str], file: str) -> tuple[Config, list[int]]:
    """The models named with --only (all without it), and their positions in the file."""
    names = [name for item in only for name in item.split(",") if name]
    if not names:
        return config, list(range(len(config.models)))
    known = {spec.name for spec in config.models}
    missing = [name for name in names if name not in known]
    if missing:
        wanted = ", ".join(sorted(known))
        raise ConfigError(file, [f"--only {', '.join(missing)}: no such model (have {wanted})"])
    positions = [i for i, spec in enumerate(config.models) if spec.name in names]
    models = [config.models[i] for i in positions]
    return config.model_copy(update={"models": models}), positions


def _inventory(config: Config, path: str | None, file: str) -> Inventory:
    if path:
        try:
            return inventory_from_json(Path(path).read_text(), path)
        except (OSError, ValueError) as exc:
            raise ConfigError(path, [f"GPU inventory: {exc}"]) from None
    if not any(spec.needs_gpus for spec in config.models):
        return Inventory((), "none", "no model asks for GPUs")
    return read_inventory()


def render_table(inventory: Inventory, fits: list[Fit]) -> str:
    lines = [_describe_inventory(inventory), ""]
    header = ("worker", "engine", "gpus", "weights", "KV/token", "context", "need", "budget")
    rows: list[tuple[str, ...]] = [(*header, "KV tokens", "fits")]
    notes: list[str] = []
    for fit in fits:
        rows.append(_row(fit))
        if fit.estimate:
            notes += [f"{fit.worker_id}: {note}" for note in fit.estimate.notes]
        if fit.budget_rule:
            notes.append(f"{fit.worker_id}: budget = {fit.budget_rule}")
        if fit.problem:
            notes.append(f"{fit.worker_id}: DOES NOT FIT: {fit.problem}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    lines += ["", "per GPU; need = weights + overhead + KV for one full context", *notes]
    return "\n".join(lines)


def _row(fit: Fit) -> tuple[str, ...]:
    head = (fit.worker_id, fit.engine, _gpus(fit.gpus))
    need = fit.estimate
    if need is None:
        return (*head, fit.unknown, "", "", "", "", "", "-")
    verdict = {True: "yes", False: "NO", None: "unknown"}[fit.fits]
    width = f"{need.weight_bits}-bit" if need.weight_bits else need.dtype
    return (
        *head,
        f"{format_gib(need.weights)} {width}",
        f"{need.kv_per_token / 1024:.1f} KiB",
        str(need.context),
        format_gib(need.needed),
        format_gib(fit.budget) if fit.budget is not None else fit.unknown,
        f"{fit.kv_tokens:,}" if fit.kv_tokens is not None else "",
        verdict,
    )


_BYTES = ("weights", "kv_per_token", "overhead")


def render_json(inventory: Inventory, fits: list[Fit]) -> str:
    workers = [_fit_json(fit) for fit in fits]
    document = {
        "inventory": dataclasses.asdict(inventory),
        "workers": workers,
        "fits": all(worker["fits"] is not False for worker in workers),
    }
    return json.dumps(document, indent=2)


def _fit_json(fit: Fit) -> dict[str, Any]:
    need = fit.estimate
    figures: dict[str, Any] = {}
    if need is not None:
        figures = {f"{k}_bytes": v for k, v in dataclasses.asdict(need).items() if k in _BYTES}
        figures |= {"needed_bytes": need.needed, "kv_for_context_bytes": need.kv_for_context}
        figures |= {"context_tokens": need.context, "dtype": need.dtype, "notes": need.notes}
        figures["weight_bits"] = need.weight_bits
    return {
        "worker": fit.worker_id,
        "model": fit.model,
        "engine": fit.engine,
        "gpus": list(fit.gpus),
        **figures,
        "budget_bytes": fit.budget,
        "budget_rule": fit.budget_rule,
        "kv_room_bytes": fit.kv_room,
        "kv_tokens": fit.kv_tokens,
        "fits": fit.fits,
        "unknown": fit.unknown,
        "problem": fit.problem,
    }


def _describe_inventory(inventory: Inventory) -> str:
    if not inventory.gpus:
        return f"GPUs: none ({inventory.note}); only CPU and external workers can be planned"
    kinds: dict[tuple[str, int], list[int]] = {}
    for gpu in inventory.gpus:
        kinds.setdefault((gpu.name, gpu.total_bytes), []).append(gpu.index)
    parts = [
        f"{len(indices)} x {name} ({format_gib(total)}, GPUs {_gpus(tuple(indices))})"
        for (name, total), indices in kinds.items()
    ]
    free = sorted({format_gib(gpu.free_bytes) for gpu in inventory.gpus})
    if len(free) == 1:
        return f"GPUs from {inventory.source}: {'; '.join(parts)}, {free[0]} free each"
    each = ", ".join(f"{gpu.index}: {format_gib(gpu.free_bytes)}" for gpu in inventory.gpus)
    return f"GPUs from {inventory.source}: {'; '.join(parts)}; free: {each}"


def _gpus(indices: tuple[int, ...]) -> str:
    if not indices:
        return "-"
    if len(indices) > 2 and list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}"
    return ",".join(map(str, indices))
