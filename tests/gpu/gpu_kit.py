"""Helpers of the GPU tier (tests/gpu): where engines run, gateways as processes, NVML views
and the results file. Fixtures are in conftest.py; see its docstring for how to run the tier.
"""

import importlib.util
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fakes.gateway_process import READY_TIMEOUT, STOP_GRACE, GatewayProcess, flag

API_KEY = f"sk-gpu-{secrets.token_hex(8)}"
GIB = 1024**3
MODEL_FLAGS = ["--heads", "4", "--kv-heads", "2", "--head-dim", "128", "--layers", "4"]
GPU_MEMORY_UTILIZATION = 0.3  # two engines may share a GPU
# Kept in every engine's environment (KINDS.md: NVLink multicast off on shared hosts), no
# downloads, and no FlashInfer sampler (it would compile kernels on first use).
ENGINE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
}
HOW_TO_RUN = (
    "run on a machine with NVIDIA GPUs: bash deploy/gpu/prepare-wheels.sh here, copy "
    "wheels/gpu/parts/ there, then `bash deploy/gpu/run-gpu-tests.sh` "
    "(docs/gpu-validation.md)"
)


def nvml() -> Any | None:
    """The pynvml module, initialised, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def gpu_count() -> int:
    lib = nvml()
    return int(lib.nvmlDeviceGetCount()) if lib else 0


@dataclass(frozen=True)
class Rig:
    """Where the engines run: NVIDIA GPUs, or vLLM's CPU build for a rehearsal."""

    gpus: int
    python: str  # the engine's interpreter
    on_cpu: bool

    @property
    def command(self) -> list[str]:
        if self.on_cpu:
            return [self.python, "-m", "vllm.entrypoints.openai.api_server"]
        return [self.python, "-m", "vllm.entrypoints.cli.main", "serve"]

    def worker(self, model: Path, name: str, tp: int = 1) -> dict[str, Any]:
        """A `models:` entry for one vLLM worker of the tiny model."""
        args: dict[str, Any] = {"enforce-eager": True, "max-model-len": 1024}
        entry: dict[str, Any] = {
            "name": name,
            "backend": "vllm",
            "model": str(model),
            "tp": tp,
            "command": self.command,
            "env": dict(ENGINE_ENV),
            "startup_timeout": READY_TIMEOUT,
        }
        if self.on_cpu:
            entry["device"] = "cpu"
        else:
            args["gpu-memory-utilization"] = GPU_MEMORY_UTILIZATION
        entry["engine_args"] = args
        return entry


def find_rig() -> Rig | str:
    """The rig, or why these tests cannot run here."""
    rehearsal = os.environ.get("ENGINEGATE_GPU_REHEARSAL_PYTHON")
    if rehearsal:
        return Rig(gpus=0, python=rehearsal, on_cpu=True)
    count = gpu_count()
    if count == 0:
        return f"no NVIDIA GPU visible through NVML; {HOW_TO_RUN}"
    return Rig(gpus=count, python=sys.executable, on_cpu=False)


RIG = find_rig()


def skip_unless(gpus: int = 1, engine: str = "vllm") -> pytest.MarkDecorator:
    """Skip with the reason when there is no rig, too few GPUs, or the engine does not import."""
    if isinstance(RIG, str):
        return pytest.mark.skip(reason=RIG)
    if RIG.on_cpu:
        if engine != "vllm":
            return pytest.mark.skip(reason=f"{engine} has no CPU build to rehearse on")
        return pytest.mark.gpu  # already applied: a no-op
    if RIG.gpus < gpus:
        return pytest.mark.skip(reason=f"needs {gpus} GPUs, NVML sees {RIG.gpus}; {HOW_TO_RUN}")
    if importlib.util.find_spec(engine) is None:
        return pytest.mark.skip(
            reason=f"{engine} does not import: put its wheel set on PYTHONPATH with "
            f'`eval "$(bash deploy/gpu/install-wheels.sh {engine})"` (docs/gpu-validation.md)'
        )
    return pytest.mark.gpu


# ---------------------------------------------------------------------------------- results


class Results:
    """What the run measured, rewritten to results.json after every record, so a run cut off
    by its time limit still leaves what it had."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {}

    def record(self, key: str, value: Any) -> None:
        self.data[key] = value
        text = json.dumps(value, default=str)
        print(f"\n[gpu result] {key}: {text[:400]}", flush=True)
        path = self.folder / "results.json"
        path.write_text(json.dumps(self.data, indent=2, default=str))

    def snapshot(self, label: str) -> None:
        """Append nvidia-smi's view (GPUs and compute processes) to nvidia-smi.txt."""
        if not shutil.which("nvidia-smi"):
            return
        with (self.folder / "nvidia-smi.txt").open("a") as out:
            out.write(f"\n===== {label} (t={time.time():.1f})\n")
            out.flush()
            for args in (
                ["nvidia-smi"],
                [
                    "nvidia-smi",
                    "--query-compute-apps=gpu_bus_id,pid,process_name,used_memory",
                    "--format=csv",
                ],
            ):
                subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, check=False, timeout=60)


# ------------------------------------------------------------------------------ GPU memory


@dataclass
class GpuView:
    index: int
    total: int
    used: int
    processes: dict[int, int | None] = field(default_factory=dict)  # pid -> bytes


def gpu_views() -> list[GpuView]:
    """Every GPU with its compute processes, from NVML; [] without NVML."""
    lib = nvml()
    if lib is None:
        return []
    views = []
    for index in range(lib.nvmlDeviceGetCount()):
        handle = lib.nvmlDeviceGetHandleByIndex(index)
        memory = lib.nvmlDeviceGetMemoryInfo(handle)
        view = GpuView(index, int(memory.total), int(memory.used))
        for proc in lib.nvmlDeviceGetComputeRunningProcesses(handle):
            used = proc.usedGpuMemory
            view.processes[int(proc.pid)] = int(used) if isinstance(used, int) else None
        views.append(view)
    return views


def gpus_of(pids: set[int], views: list[GpuView]) -> dict[int, int]:
    """GPU index -> bytes held there by any of `pids`."""
    held: dict[int, int] = {}
    for view in views:
        mine = [used or 0 for pid, used in view.processes.items() if pid in pids]
        if mine:
            held[view.index] = sum(mine)
    return held


def gib(value: float | None) -> float | None:
    return None if value is None else round(value / GIB, 2)


# -------------------------------------------------------------------------------- gateways


class Gateway(GatewayProcess):
    """The shared harness (tests/fakes/gateway_process.py) with this tier's key and the
    engines' environment; `plan` holds `plan --json` when a test ran it before the start."""

    def __init__(self, folder: Path, models: list[dict[str, Any]], **options: Any) -> None:
        options = {"api_key": API_KEY, "stop_grace": STOP_GRACE, **options}
        options["env"] = {**ENGINE_ENV, **options.get("env", {})}
        super().__init__(folder, models, **options)
        self.folder = folder
        self.plan: subprocess.CompletedProcess[str] | None = None


def build_tiny_model(rig: Rig, path: Path, flags: list[str], results: Results, label: str) -> Path:
    """`deploy/tiny_model.py PATH FLAGS` with the engine's Python, unless PATH holds a model;
    the build time goes to results as `LABEL build (s)`."""
    if not (path / "config.json").exists():
        started = time.monotonic()
        script = Path(__file__).resolve().parents[2] / "deploy" / "tiny_model.py"
        done = subprocess.run(
            [rig.python, str(script), str(path), *flags], capture_output=True, text=True
        )
        assert done.returncode == 0, f"tiny_model.py {flags} failed:\n{done.stderr[-4000:]}"
        results.record(f"{label} build (s)", round(time.monotonic() - started, 1))
    return path


def direct_client(gw: Gateway, model: str) -> Any:
    """An OpenAI SDK client straight to `model`'s engine with the engine's own key: vLLM on its
    Unix socket (the key in VLLM_API_KEY), SGLang and LMDeploy on their loopback ports."""
    engine = gw.engine_of(model)
    argv = engine.cmdline()
    socket = flag(argv, "--uds")
    if socket:
        key = engine.environ().get("VLLM_API_KEY")
        return gw.client(base_url="http://localhost/v1", api_key=key, socket=socket)
    port = flag(argv, "--port") or flag(argv, "--server-port")
    key = flag(argv, "--api-key") or flag(argv, "--api-keys")
    assert port and key, f"no port or key on the engine's argv: {argv}"
    return gw.client(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)


def vllm_log_figures(log: str) -> dict[str, Any]:
    """What vLLM says about its memory in a worker log (the last start's lines win)."""
    patterns = {
        "model_loading_gib": r"Model loading took ([\d.]+) GiB",
        "available_kv_cache_gib": r"Available KV cache memory: ([\d.]+) GiB",
        "kv_cache_tokens": r"GPU KV cache size: ([\d,]+) tokens",
        "max_concurrency": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
        "init_engine_seconds": r"init engine \(profile, create kv cache, warmup model\) took "
        r"([\d.]+) s",
    }
    figures: dict[str, Any] = {}
    for key, pattern in patterns.items():
        found = re.findall(pattern, log)
        if found:
            figures[key] = float(found[-1].replace(",", ""))
    return figures


# ------------------------------------------------------------------------------ requests

PROMPT = [{"role": "user", "content": "Hello! How are you today? Let me think step by step."}]


def chat(sdk: Any, model: str, max_tokens: int) -> Any:
    return sdk.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=max_tokens, extra_body={"ignore_eos": True}
    )


def timed_stream(sdk: Any, model: str, max_tokens: int) -> dict[str, float]:
    """One streamed completion: time to first content, total time, decode tokens/s."""
    started = time.perf_counter()
    first = None
    usage = None
    text = []
    stream = sdk.chat.completions.create(
        model=model,
        messages=PROMPT,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    with stream:
        for chunk in stream:
            # With a reasoning parser a random model's whole answer is reasoning.
            delta = chunk.choices[0].delta if chunk.choices else None
            piece = delta and (delta.content or reasoning_of(delta)[1])
            if piece:
                first = first or time.perf_counter()
                text.append(piece)
            if chunk.usage:
                usage = chunk.usage
    ended = time.perf_counter()
    assert usage is not None, "no usage chunk although stream_options.include_usage was set"
    assert first is not None, "no content or reasoning in the stream"
    tokens = usage.completion_tokens
    return {
        "ttft_ms": (first - started) * 1000,
        "total_ms": (ended - started) * 1000,
        "completion_tokens": tokens,
        "decode_tokens_per_s": (tokens - 1) / (ended - first) if ended > first else 0.0,
    }


def reasoning_of(part: Any) -> tuple[str | None, str | None]:
    """(reasoning_content, reasoning) of an SDK message or delta: extras to the SDK's models."""
    extra = getattr(part, "model_extra", None) or {}
    return extra.get("reasoning_content"), extra.get("reasoning")


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}


def memory_of(
    gw: Gateway, model: str, views: list[GpuView], share: float | None = GPU_MEMORY_UTILIZATION
) -> dict[int, dict[str, Any]]:
    """Per GPU the engine of `model` is on: what its processes hold, and the GPU's totals;
    `share` of the total is the engine's budget (vLLM's gpu-memory-utilization)."""
    held = gpus_of(gw.tree_of(model), views)
    by_index = {v.index: v for v in views}
    figures: dict[int, dict[str, Any]] = {}
    for index, bytes_ in sorted(held.items()):
        view = by_index[index]
        figures[index] = {
            "held_by_engine_gib": gib(bytes_),
            "gpu_used_gib": gib(view.used),
            "gpu_total_gib": gib(view.total),
        }
        if share is not None:
            figures[index]["budget_gib"] = gib(share * view.total)
    return figures


def wait_gpus_free_of(pids: set[int], timeout: float) -> float | None:
    """Seconds until NVML lists none of `pids` on any GPU, or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not gpus_of(pids, gpu_views()):
            return time.monotonic() - started
        time.sleep(0.1)
    return None
