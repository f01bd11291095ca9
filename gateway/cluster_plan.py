"""`enginegate plan` for a config with `cluster: {ray: ADDRESS}`: node and GPUs of every rank.

The cluster's nodes come from Ray (backends/ray_nodes.py); the placement is computed here
(backends/cluster.py) and nothing is reserved or started. Exit status 1 when a replica does
not fit, naming the model's key in the file.
"""

import argparse
import json
import sys

from backends.base import Slot
from backends.cluster import Bundle, Node, place
from backends.placement import PlacementError, available_cores, check_names, plan_cluster
from backends.ray_nodes import ClusterUnavailable, read_nodes
from gateway.config import Config, ConfigError


def run(args: argparse.Namespace, config: Config, positions: list[int]) -> int:
    assert config.cluster is not None
    try:
        check_names(config.models)
        nodes = read_nodes(config.cluster)
    except PlacementError as exc:
        print(f"error: {ConfigError(args.config, [str(exc)])}", file=sys.stderr)
        return 1
    except ClusterUnavailable as exc:
        print(f"error: {args.config}: cluster.ray: {exc}", file=sys.stderr)
        return 1
    bundles = place(config.models, nodes)
    print(
        render_json(config, nodes, bundles) if args.json else render_table(config, nodes, bundles)
    )
    names = [spec.name for spec in config.models]
    problems = {
        f"models[{positions[names.index(b.model)]}] ({b.worker_id}): does not fit: {b.problem}"
        for b in bundles
        if b.problem
    }
    if problems:
        print(f"error: {ConfigError(args.config, sorted(problems))}", file=sys.stderr)
        return 1
    return 0


def slots(file: str, config: Config, positions: list[int]) -> list[Slot]:
    """For serve and check: every replica's Slot, once the cluster's nodes as they are now
    can hold them all; ConfigError naming the models that do not fit, or the cluster."""
    assert config.cluster is not None
    try:
        planned = plan_cluster(config.models, available_cores())
        nodes = read_nodes(config.cluster)
    except PlacementError as exc:
        raise ConfigError(file, [str(exc)]) from None
    except ClusterUnavailable as exc:
        raise ConfigError(file, [f"cluster.ray: {exc}"]) from None
    names = [spec.name for spec in config.models]
    problems = {
        f"models[{positions[names.index(b.model)]}] ({b.worker_id}): does not fit: {b.problem}"
        for b in place(config.models, nodes)
        if b.problem
    }
    if problems:
        raise ConfigError(file, sorted(problems))
    return planned


def render_table(config: Config, nodes: list[Node], bundles: list[Bundle]) -> str:
    assert config.cluster is not None
    lines = [f"Ray cluster at {config.cluster.ray}: {len(nodes)} alive nodes"]
    lines += [f"  {node.short}: {node.gpus} GPUs, {node.cpus} CPUs" for node in nodes]
    rows = [("worker", "engine", "placement", "rank", "node", "gpus", "cpus", "fits")]
    for b in bundles:
        node = b.node.short if b.node else "-"
        gpus = ",".join(map(str, b.gpus)) or "-"
        fits = "yes" if b.node else "NO"
        rows.append(
            (b.worker_id, b.engine, b.strategy, str(b.node_rank), node, gpus, str(b.cpus), fits)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines.append("")
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    lines += [
        f"{b.worker_id}: DOES NOT FIT: {b.problem}"
        for b in bundles
        if b.problem and b.node_rank == 0
    ]
    return "\n".join(lines)


def render_json(config: Config, nodes: list[Node], bundles: list[Bundle]) -> str:
    assert config.cluster is not None
    document = {
        "cluster": {"ray": config.cluster.ray},
        "nodes": [vars(node) for node in nodes],
        "ranks": [
            {
                "worker": b.worker_id,
                "model": b.model,
                "engine": b.engine,
                "strategy": b.strategy,
                "node_rank": b.node_rank,
                "node": b.node.id if b.node else None,
                "address": b.node.address if b.node else None,
                "gpus": list(b.gpus),
                "cpus": b.cpus,
                "fits": b.node is not None,
                "problem": b.problem,
            }
            for b in bundles
        ],
        "fits": all(b.node is not None for b in bundles),
    }
    return json.dumps(document, indent=2)
