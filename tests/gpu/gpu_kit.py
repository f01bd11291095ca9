"""Helpers of the GPU tier (tests/gpu): where engines run, gateways as processes, NVML views
and the results file. Fixtures are in conftest.py; see its docstring for how to run the tier.
"""

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
API_KEY = f"sk-gpu-{secrets.token_hex(8)}"
GIB = 1024**3
READY_TIMEOUT = 420.0
STOP_GRACE = 20.0
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


@dataclass(frozen=True)
class Member:
    """One process of a gateway's tree; the start time tells a recycled pid apart."""

    pid: int
    create_time: float
    cmdline: str

    @property
    def is_alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.01:
                return False
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def kill(self) -> None:
        if self.is_alive:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Gateway:
    """`python -m gateway serve -c FILE` in a folder of its own (config, log, state)."""

    def __init__(self, folder: Path, models: list[dict[str, Any]]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state_dir = folder / "state"
        self.log_path = folder / "gateway.log"
        self.config_path = folder / "enginegate.yaml"
        self.models = models
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.members: dict[int, Member] = {}
        self.plan: subprocess.CompletedProcess[str] | None = None  # `plan --json`, if run
        config = {
            "gateway": {
                "host": "127.0.0.1",
                "port": self.port,
                "api_keys": [API_KEY],
                "state_dir": str(self.state_dir),
                "stop_grace": STOP_GRACE,
            },
            "models": models,
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def pid(self) -> int:
        assert self.proc is not None, "gateway not started"
        return self.proc.pid

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`python -m gateway ARGS -c FILE`, e.g. `plan --json`."""
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "-c", str(self.config_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINEGATE_")}
        env.update(ENGINE_ENV)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "-c", str(self.config_path)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.started = time.monotonic()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Seconds from start until GET /ready answered 200; fails with the logs otherwise."""
        deadline = self.started + timeout
        last = "no answer yet"
        with httpx.Client(timeout=5, trust_env=False) as client:
            while time.monotonic() < deadline:
                if not self.is_running:
                    pytest.fail(f"gateway exited with {self.proc.returncode}\n{self.logs()}")
                try:
                    resp = client.get(f"{self.url}/ready")
                    if resp.status_code == 200:
                        self.snapshot()
                        return time.monotonic() - self.started
                    last = f"{resp.status_code} {resp.text[:300]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.5)
        pytest.fail(f"gateway not ready after {timeout:.0f} s (last: {last})\n{self.logs()}")

    def poll_ready(self, want: int, timeout: float) -> float | None:
        """Seconds until GET /ready answered `want`, or None after `timeout`."""
        started = time.monotonic()
        with httpx.Client(timeout=5, trust_env=False) as client:
            while time.monotonic() - started < timeout:
                try:
                    if client.get(f"{self.url}/ready").status_code == want:
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        return None

    def snapshot(self) -> list[Member]:
        """Every process under the gateway now; also remembered for the final clean-up."""
        if not self.is_running:
            return []
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in children:
            try:
                member = Member(child.pid, child.create_time(), " ".join(child.cmdline()))
            except psutil.Error:
                continue
            self.members.setdefault(member.pid, member)
            found.append(member)
        return found

    def guard_of(self, model_name: str) -> psutil.Process:
        for child in psutil.Process(self.pid).children():
            argv = child.cmdline()
            if "backends.guard" in argv and model_name in served_names(argv):
                return child
        raise AssertionError(f"no guard process for {model_name} under gateway {self.pid}")

    def engine_of(self, model_name: str) -> psutil.Process:
        """The engine's main process (its API server): the guard's child."""
        guard = self.guard_of(model_name)
        children = guard.children()
        assert children, f"guard {guard.pid} of {model_name} has no engine process"
        return min(children, key=lambda p: p.create_time())

    def tree_of(self, model_name: str) -> set[int]:
        """The pids of the engine serving `model_name`: its guard and everything under it."""
        guard = self.guard_of(model_name)
        return {guard.pid, *(p.pid for p in guard.children(recursive=True))}

    def metric(self, name: str, **labels: str) -> float | None:
        from prometheus_client.parser import text_string_to_metric_families

        with httpx.Client(timeout=10, trust_env=False) as client:
            text = client.get(f"{self.url}/metrics").text
        values = [
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        ]
        return sum(values) if values else None

    def worker_log(self, worker_id: str) -> str:
        path = self.state_dir / "logs" / f"{worker_id}.log"
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def client(self, base_url: str | None = None, api_key: str | None = None) -> Any:
        import openai

        return openai.OpenAI(
            base_url=base_url or f"{self.url}/v1",
            api_key=api_key or API_KEY,
            max_retries=0,
            timeout=120,
        )

    def stop(self) -> float | None:
        """SIGTERM, SIGKILL past the grace period, then kill anything left of the tree.
        Returns the seconds the gateway took to exit, None if it was not running."""
        if self.proc is None:
            return None
        self.snapshot()
        took = None
        if self.is_running:
            signalled = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE + 30)
                took = time.monotonic() - signalled
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.left_behind():
            time.sleep(0.2)
        for member in self.left_behind():
            member.kill()
        return took

    def left_behind(self) -> list[Member]:
        return [m for m in self.members.values() if m.is_alive]

    def logs(self, lines: int = 40) -> str:
        parts = [tail(self.log_path, lines)]
        for path in sorted((self.state_dir / "logs").glob("*.log")):
            parts.append(tail(path, lines))
        return "\n".join(parts)


def served_names(argv: list[str]) -> set[str | None]:
    """The name an engine serves under: vLLM/SGLang --served-model-name, LMDeploy --model-name."""
    return {flag(argv, "--served-model-name"), flag(argv, "--model-name")}


def flag(argv: list[str], name: str) -> str | None:
    try:
        return argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"--- {path}: {exc.strerror}"
    return "\n".join([f"--- {path} (last {len(text)} lines)", *text])


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
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
    ended = time.perf_counter()
    assert usage is not None, "no usage chunk although stream_options.include_usage was set"
    assert first is not None, "no content in the stream"
    tokens = usage.completion_tokens
    return {
        "ttft_ms": (first - started) * 1000,
        "total_ms": (ended - started) * 1000,
        "completion_tokens": tokens,
        "decode_tokens_per_s": (tokens - 1) / (ended - first) if ended > first else 0.0,
    }


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


def wait_gone(members: list[Member], timeout: float) -> list[Member]:
    deadline = time.monotonic() + timeout
    alive = [m for m in members if m.is_alive]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [m for m in alive if m.is_alive]
    return alive


def wait_gpus_free_of(pids: set[int], timeout: float) -> float | None:
    """Seconds until NVML lists none of `pids` on any GPU, or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not gpus_of(pids, gpu_views()):
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
