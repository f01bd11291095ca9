"""Which NVIDIA GPUs this machine has, and how much memory each has free right now.

NVML comes from the optional `nvidia-ml-py` package (`pip install enginegate[gpu]`); without it
`nvidia-smi` is asked instead, and without either the machine has no GPUs as far as the plan
is concerned. Indices are NVML's, which are what CUDA_VISIBLE_DEVICES means when the gateway
itself runs without CUDA_VISIBLE_DEVICES (CUDA_DEVICE_ORDER=PCI_BUS_ID keeps them equal).

An inventory can also come from a JSON file (`enginegate plan --inventory FILE`), to plan for a
machine you are not on:

    [{"name": "NVIDIA H200", "total_mib": 143771, "free_mib": 143000, "count": 8}]
"""

import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

MIB = 1024**2


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...]
    source: str  # where the figures come from: "NVML", "nvidia-smi", a file name
    note: str = ""  # why there are none, when there are none


def read_inventory(nvml: Any | None = None, nvidia_smi: str | None = "nvidia-smi") -> Inventory:
    """This machine's GPUs. `nvml` is the pynvml module or a stand-in (None: import it);
    `nvidia_smi` the fallback command (None: none)."""
    problems = []
    try:
        return _from_nvml(nvml)
    except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        problems.append(f"NVML: {type(exc).__name__}: {exc}".rstrip(": "))
    command = shutil.which(nvidia_smi) if nvidia_smi else None
    if command:
        try:
            return _from_nvidia_smi(command)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            problems.append(f"nvidia-smi: {exc}")
    else:
        problems.append("no nvidia-smi")
    return Inventory((), "none", "no NVIDIA GPU found (" + "; ".join(problems) + ")")


def inventory_from_json(text: str, source: str) -> Inventory:
    """Parse the file format in the module docstring; ValueError says what is wrong."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise ValueError("expected a list of GPUs")
    gpus: list[Gpu] = []
    for position, entry in enumerate(entries):
        try:
            total = int(entry["total_mib"]) * MIB
            free = int(entry.get("free_mib", entry["total_mib"])) * MIB
            name, count = str(entry.get("name", "GPU")), int(entry.get("count", 1))
        except (TypeError, KeyError, ValueError) as exc:
            message = f"[{position}]: needs total_mib (and free_mib, name, count): {exc}"
            raise ValueError(message) from None
        for _ in range(count):
            gpus.append(Gpu(len(gpus), name, total, free))
    return Inventory(tuple(gpus), source)


def _from_nvml(nvml: Any | None) -> Inventory:
    if nvml is None:
        import pynvml

        nvml = pynvml
    nvml.nvmlInit()
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            gpus.append(Gpu(index, name, int(memory.total), int(memory.free)))
    finally:
        nvml.nvmlShutdown()
    return Inventory(tuple(gpus), "NVML", "" if gpus else "NVML sees no GPU")


def _from_nvidia_smi(command: str) -> Inventory:
    query = "--query-gpu=index,name,memory.total,memory.free"
    out = subprocess.run(
        [command, query, "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    gpus = []
    for line in out.splitlines():
        if line.strip():
            index, name, total, free = (field.strip() for field in line.split(","))
            gpus.append(Gpu(int(index), name, int(total) * MIB, int(free) * MIB))
    return Inventory(tuple(gpus), "nvidia-smi")
