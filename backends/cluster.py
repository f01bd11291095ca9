"""Where each replica would run on a Ray cluster: a plan from the nodes' resources.

`cluster: {ray: ADDRESS}` in the config. Each replica is one Ray placement group:
- a single-host replica is one bundle of tp*pp GPUs, packed on one node (PACK: a bundle
  never spans nodes);
- a replica with `nodes: N` is N bundles of tp*pp/N GPUs, one per node (STRICT_SPREAD), node
  rank 0 first.
Nodes are tried in the order the cluster lists them, first fit; GPUs on a node are handed out
lowest index first, as Ray numbers a node's GPUs from 0. Nothing is reserved on the cluster:
this is what `enginegate plan` shows before anything starts, from the nodes' totals.
"""

from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backends.placement import worker_id
from backends.spec import MANAGED_ENV, ModelSpec


class ClusterSpec(BaseModel):
    """The `cluster:` key of enginegate.yaml."""

    model_config = ConfigDict(extra="forbid")

    ray: str = Field(min_length=1, description="the Ray cluster's GCS address, HOST:PORT")
    node_ip: str | None = Field(
        None, description="this host's address in the cluster, when Ray would pick another"
    )
    node_env: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="per node address, environment for the ranks there, e.g. "
        "{10.0.0.2: {GLOO_SOCKET_IFNAME: ib0, NCCL_SOCKET_IFNAME: ib0}}",
    )
    start_timeout: float = Field(
        300, gt=0, description="seconds a replica's placement group may wait for resources"
    )

    @field_validator("node_env")
    @classmethod
    def _check_node_env(cls, node_env: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for address, env in node_env.items():
            managed = sorted(MANAGED_ENV.intersection(env))
            if managed:
                raise ValueError(f"{address}: {', '.join(managed)}: set by enginegate itself")
        return node_env


@dataclass(frozen=True)
class Node:
    """One alive Ray node and what it has in all."""

    id: str
    address: str
    gpus: int
    cpus: int

    @property
    def short(self) -> str:
        return f"{self.id[:8]} ({self.address})"


@dataclass(frozen=True)
class Bundle:
    """One rank's share of a replica: which node and devices; node None: it does not fit."""

    worker_id: str
    model: str
    engine: str
    strategy: str  # "PACK" | "STRICT_SPREAD"
    node_rank: int
    node: Node | None
    gpus: tuple[int, ...] = ()
    cpus: int = 0
    problem: str | None = None


@dataclass
class _Free:
    gpus: list[int]
    cpus: int


def place(models: list[ModelSpec], nodes: list[Node]) -> list[Bundle]:
    """One Bundle per node rank of every replica of every engine model, in config order."""
    free = {node.id: _Free(list(range(node.gpus)), node.cpus) for node in nodes}
    bundles: list[Bundle] = []
    for spec in models:
        if not spec.runs_here:
            continue
        for replica in range(spec.replicas):
            bundles += _place_replica(spec, replica, nodes, free)
    return bundles


def _place_replica(
    spec: ModelSpec, replica: int, nodes: list[Node], free: dict[str, _Free]
) -> list[Bundle]:
    gpus, cpus = need(spec)
    strategy = "PACK" if spec.nodes == 1 else "STRICT_SPREAD"
    wid = worker_id(spec.name, replica)
    base = Bundle(wid, spec.name, spec.backend, strategy, node_rank=0, node=None)
    chosen = [n for n in nodes if len(free[n.id].gpus) >= gpus and free[n.id].cpus >= cpus]
    if len(chosen) < spec.nodes:
        problem = _shortage(spec, gpus, cpus, nodes, free)
        return [replace(base, node_rank=r, problem=problem) for r in range(spec.nodes)]
    bundles = []
    for rank, node in enumerate(chosen[: spec.nodes]):
        left = free[node.id]
        taken, left.gpus = tuple(left.gpus[:gpus]), left.gpus[gpus:]
        left.cpus -= cpus
        bundles.append(replace(base, node_rank=rank, node=node, gpus=taken, cpus=cpus))
    return bundles


def need(spec: ModelSpec) -> tuple[int, int]:
    """(GPUs, CPUs) of one bundle: GPU ranks hold GPUs, CPU ranks a core each."""
    if spec.device == "cpu":
        return 0, spec.ranks_per_node
    return spec.ranks_per_node, 0


def _shortage(
    spec: ModelSpec, gpus: int, cpus: int, nodes: list[Node], free: dict[str, _Free]
) -> str:
    what = f"{gpus} GPUs" if gpus else f"{cpus} CPUs"
    where = "a node" if spec.nodes == 1 else f"{spec.nodes} different nodes"
    left = ", ".join(
        f"{n.short}: {len(free[n.id].gpus)} GPUs, {free[n.id].cpus} CPUs" for n in nodes
    )
    return f"needs {where} with {what} free each; left: {left or 'no alive node'}"
