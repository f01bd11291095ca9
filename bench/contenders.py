"""The contenders of the overhead benchmark: how each is installed, configured and started.

    direct         the upstream itself: the physical limit, and the baseline of every ratio
    enginegate     `python -m gateway serve -c <cfg>`, an `external` model, API keys and
                   metrics on, as users run it
    vllm-router    Rust, from PyPI, round robin over the one upstream
    sglang-router  Rust, from PyPI, `--backend openai`
    litellm        LiteLLM's proxy (Python), one `openai/` model, a master key

Each peer lives in its own venv under ~/.cache/enginegate/bench-venvs (`--setup` creates them;
the exact install commands are PEERS.md's). Every process binds 127.0.0.1 only. The routers'
logs are set to warnings so that neither side pays for an access log (enginegate's is off by
default); everything else is each peer's default.
"""

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VENVS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "enginegate/bench-venvs"

# name → what pip installs (versions as checked in PEERS.md; newer LiteLLM needs a certifi
# that the registry here does not have, and an unpinned install backtracks for minutes)
PEERS = {
    "vllm-router": "vllm-router==0.1.17",
    "sglang-router": "sglang-router==0.3.2",
    "litellm": "litellm[proxy]==1.106.2",
}
API_KEY = "sk-bench-enginegate-key"
ADMIN_KEY = "sk-bench-enginegate-admin"
LITELLM_KEY = "sk-bench-litellm-master"


@dataclass
class Contender:
    name: str
    base_url: str  # the OpenAI base URL clients use, ending in /v1
    key: str | None = None
    argv: list[str] = field(default_factory=list)  # empty: nothing to start (direct)
    env: dict[str, str] = field(default_factory=dict)
    ready_url: str | None = None  # GET until 200, then a real request until 200
    status: str = "ok"  # or why it is not measured


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv_bin(peer: str, command: str) -> Path:
    return VENVS / peer / "bin" / command


def is_installed(peer: str) -> bool:
    return (VENVS / peer / ".installed").exists()


def setup(peers: list[str]) -> dict[str, str]:
    """Create each peer's venv (skipped when done before); name → "ok" or pip's reason."""
    results = {}
    for peer in peers:
        if is_installed(peer):
            results[peer] = "ok"
            continue
        venv = VENVS / peer
        print(f"setup: pip install {PEERS[peer]} into {venv}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check"]
        done = subprocess.run([*pip, PEERS[peer]], capture_output=True, text=True)
        if done.returncode != 0:
            reason = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            results[peer] = "not installed: " + (" ".join(reason) or done.stderr[-500:]).strip()
            (venv / ".failed").write_text(results[peer])
            continue
        (venv / ".installed").touch()
        (venv / ".failed").unlink(missing_ok=True)
        results[peer] = "ok"
    return results


def direct(upstream: str) -> Contender:
    return Contender("direct", upstream + "/v1")


# A key with every per-key check on (allow-list, rates, concurrency, budgets), none of them
# reached: what tenancy costs per request, against `enginegate`'s plain key.
KEYED = {
    "name": "bench", "key": API_KEY, "models": ["tin*"], "rpm": 10**9, "tpm": 10**12,
    "max_concurrent": 10**6, "tokens_per_day": 10**15, "tokens_per_month": 10**16,
    "priority": "high",
}  # fmt: skip


def enginegate(upstream: str, workdir: Path, keyed: bool = False) -> Contender:
    port = free_port()
    name = "enginegate-keyed" if keyed else "enginegate"
    workdir = workdir / name
    workdir.mkdir(exist_ok=True)
    config = {
        "gateway": {
            "host": "127.0.0.1",
            "port": port,
            "api_keys": [KEYED if keyed else API_KEY],
            "admin_keys": [ADMIN_KEY],
            "state_dir": str(workdir / "enginegate-state"),
        },
        "models": [{"name": "tiny", "backend": "external", "url": upstream + "/v1"}],
    }
    path = workdir / "enginegate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Contender(
        name,
        f"http://127.0.0.1:{port}/v1",
        key=API_KEY,
        argv=[sys.executable, "-m", "gateway", "serve", "-c", str(path)],
        env={"PYTHONUNBUFFERED": "1"},
        ready_url=f"http://127.0.0.1:{port}/ready",
    )


def vllm_router(upstream: str) -> Contender:
    port, metrics = free_port(), free_port()
    return Contender(
        "vllm-router",
        f"http://127.0.0.1:{port}/v1",
        argv=[
            str(venv_bin("vllm-router", "vllm-router")),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            upstream,
            "--policy",
            "round_robin",
            "--log-level",
            "warning",
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(metrics),
        ],  # fmt: skip
        ready_url=f"http://127.0.0.1:{port}/health",
    )


def sglang_router(upstream: str) -> Contender:
    port, metrics = free_port(), free_port()
    return Contender(
        "sglang-router",
        f"http://127.0.0.1:{port}/v1",
        argv=[
            str(venv_bin("sglang-router", "sglang-router")),
            "launch",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--worker-urls",
            upstream,
            "--policy",
            "round_robin",
            "--backend",
            "openai",
            "--log-level",
            "warn",
            "--prometheus-host",
            "127.0.0.1",
            "--prometheus-port",
            str(metrics),
        ],  # fmt: skip
        ready_url=f"http://127.0.0.1:{port}/health",
    )


def litellm(upstream: str, workdir: Path) -> Contender:
    port = free_port()
    params = {"model": "openai/tiny", "api_base": upstream + "/v1", "api_key": "dummy"}
    config = {"model_list": [{"model_name": "tiny", "litellm_params": params}]}
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Contender(
        "litellm",
        f"http://127.0.0.1:{port}/v1",
        key=LITELLM_KEY,
        argv=[
            str(venv_bin("litellm", "litellm")),
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],  # fmt: skip
        # its /health sends a real completion upstream; liveliness only asks the process
        env={"LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        ready_url=f"http://127.0.0.1:{port}/health/liveliness",
    )


def build(names: list[str], upstream: str, workdir: Path) -> list[Contender]:
    """The contenders asked for, in order; a peer without its venv says so in its status."""
    makers = {
        "direct": lambda: direct(upstream),
        "enginegate": lambda: enginegate(upstream, workdir),
        "enginegate-keyed": lambda: enginegate(upstream, workdir, keyed=True),
        "vllm-router": lambda: vllm_router(upstream),
        "sglang-router": lambda: sglang_router(upstream),
        "litellm": lambda: litellm(upstream, workdir),
    }
    out = []
    for name in names:
        contender = makers[name]()
        failed = VENVS / name / ".failed"
        if name in PEERS and not is_installed(name):
            contender.status = (
                failed.read_text() if failed.exists()
                else "not installed (run `python -m bench.overhead --setup`)"
            )  # fmt: skip
        out.append(contender)
    return out
