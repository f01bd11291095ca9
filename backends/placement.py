"""Where each replica runs: a plan computed before anything starts.

GPUs: every replica holds a block of tp*pp GPUs; blocks never overlap, listed `gpus:` are
honoured and the rest are assigned from what is left, lowest index first. CPU: every rank gets
a share of the cores this process may use; with fewer cores than ranks they are shared (vLLM's
CPU build needs a core list per rank, not exclusive cores).

Each replica gets a worker id, which names its log and pid record files: the model's name made
a safe file name (`deepseek-ai/DeepSeek-R1` → `deepseek-ai--DeepSeek-R1`), then `-<replica>`.
"""

import os
import re
import shutil
import subprocess

from backends.base import Slot
from backends.spec import ModelSpec

_NOT_IN_FILE_NAMES = re.compile(r"[^A-Za-z0-9._-]")


def worker_id(name: str, replica: int) -> str:
    """`org/model` replica 0 → `org--model-0`; every character outside [A-Za-z0-9._-] → `_`.

    The replica suffix means an id is never `.` or `..`, and a `/` never reaches a path, so
    a name cannot put files outside the state directory.
    """
    return f"{_file_name(name)}-{replica}"


def _file_name(name: str) -> str:
    return _NOT_IN_FILE_NAMES.sub("_", name.replace("/", "--"))


MULTI_HOST = (
    "{nodes} hosts: without `cluster: {{ray: ...}}` enginegate starts engines on this host "
    "only; with it, serve places the model on that Ray cluster, and `enginegate render k8s` "
    "writes it as a LeaderWorkerSet"
)


class PlacementError(ValueError):
    """A plan that cannot be carried out; `path` names the config key at fault."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def plan(models: list[ModelSpec], gpu_count: int, cpu_cores: list[int]) -> list[Slot]:
    """One Slot per replica of every model, in config order."""
    check_names(models)
    _refuse_multi_node(models)
    used = _explicit_gpus(models, gpu_count)
    free = [gpu for gpu in range(gpu_count) if gpu not in used]
    cpu_ranks = _cpu_ranks(models, cpu_cores)
    slots: list[Slot] = []
    for index, spec in enumerate(models):
        for replica in range(spec.replicas):
            wid = worker_id(spec.name, replica)
            if spec.needs_cpu_cores:
                ranks = tuple(cpu_ranks.pop(0) for _ in range(spec.ranks))
                slots.append(Slot(wid, spec, replica, cpu_ranks=ranks))
            elif spec.needs_gpus:
                gpus = _gpu_block(spec, index, replica, free, gpu_count)
                slots.append(Slot(wid, spec, replica, gpus=gpus))
            else:
                slots.append(Slot(wid, spec, replica))
    return slots


def plan_cluster(models: list[ModelSpec], cpu_cores: list[int]) -> list[Slot]:
    """One Slot per replica for workers on a Ray cluster: no GPU indices (Ray hands out each
    rank's GPUs on its node); CPU ranks get core lists as on one host, rank by rank
    (`cluster.node_env` may bind others per node)."""
    check_names(models)
    cpu_ranks = _cpu_ranks(models, cpu_cores)
    slots = []
    for spec in models:
        for replica in range(spec.replicas):
            ranks: tuple[str, ...] = ()
            if spec.needs_cpu_cores:
                ranks = tuple(cpu_ranks.pop(0) for _ in range(spec.ranks))
            slots.append(Slot(worker_id(spec.name, replica), spec, replica, cpu_ranks=ranks))
    return slots


def _refuse_multi_node(models: list[ModelSpec]) -> None:
    for index, spec in enumerate(models):
        if spec.nodes > 1:
            raise PlacementError(f"models[{index}].nodes", MULTI_HOST.format(nodes=spec.nodes))


def check_names(models: list[ModelSpec]) -> None:
    """Names and aliases together: each one names a single model."""
    seen: dict[str, str] = {}
    for index, spec in enumerate(models):
        named = [("name", spec.name)] + [(f"aliases[{i}]", a) for i, a in enumerate(spec.aliases)]
        for key, name in named:
            if name in seen:
                raise PlacementError(
                    f"models[{index}].{key}", f"{name!r} is already used by {seen[name]}"
                )
            seen[name] = f"models[{index}]" if key == "name" else f"models[{index}].{key}"
    _check_worker_ids(models)


def _check_worker_ids(models: list[ModelSpec]) -> None:
    """Two names that differ only where worker ids replace characters would share files."""
    named: dict[str, str] = {}
    for index, spec in enumerate(models):
        base = _file_name(spec.name)
        if base in named:
            raise PlacementError(
                f"models[{index}].name",
                f"{spec.name!r} and {named[base]!r} give the same worker ids ({base}-N); "
                "rename one",
            )
        named[base] = spec.name


def _explicit_gpus(models: list[ModelSpec], gpu_count: int) -> dict[int, str]:
    """GPU → the model given it. Models of one `exclusive` group may share GPUs: they take
    turns (gateway/on_demand.py)."""
    owner: dict[int, str] = {}
    group: dict[int, str | None] = {}
    for index, spec in enumerate(models):
        for position, gpu in enumerate(spec.gpus or []):
            path = f"models[{index}].gpus[{position}]"
            if gpu < 0 or gpu >= gpu_count:
                raise PlacementError(path, f"GPU {gpu} does not exist ({_gpus_seen(gpu_count)})")
            if gpu in owner and (spec.exclusive is None or group[gpu] != spec.exclusive):
                raise PlacementError(path, f"GPU {gpu} is already given to {owner[gpu]}")
            owner[gpu] = f"models[{index}] ({spec.name})"
            group[gpu] = spec.exclusive
    return owner


def _gpu_block(
    spec: ModelSpec, index: int, replica: int, free: list[int], gpu_count: int
) -> tuple[int, ...]:
    if spec.gpus is not None:
        return tuple(spec.gpus[replica * spec.ranks : (replica + 1) * spec.ranks])
    if len(free) < spec.ranks:
        raise PlacementError(
            f"models[{index}]",
            f"replica {replica} of {spec.name!r} needs tp*pp = {spec.ranks} GPUs, "
            f"{len(free)} left unassigned ({_gpus_seen(gpu_count)})",
        )
    block, free[:] = tuple(free[: spec.ranks]), free[spec.ranks :]
    return block


def _gpus_seen(gpu_count: int) -> str:
    if gpu_count == 0:
        return "no NVIDIA GPU found on this machine; use device: cpu to run on the CPU"
    return f"this machine has {gpu_count}: 0..{gpu_count - 1}"


def _cpu_ranks(models: list[ModelSpec], cores: list[int]) -> list[str]:
    """Core lists for every CPU rank of every replica, in plan order."""
    total = sum(m.ranks * m.replicas for m in models if m.needs_cpu_cores)
    if total == 0:
        return []
    share = max(1, len(cores) // total)
    lists = []
    for rank in range(total):
        start = (rank * share) % len(cores)
        lists.append(_core_list(cores[start : start + share]))
    return lists


def _core_list(cores: list[int]) -> str:
    if len(cores) > 1 and cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def count_gpus() -> int:
    """NVIDIA GPUs visible here: NVML when installed, else `nvidia-smi -L`, else none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return 0
