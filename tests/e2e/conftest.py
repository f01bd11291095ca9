"""The e2e tier: one real gateway with real vLLM CPU workers, shared by the session.

`bash deploy/setup-cpu-engine.sh` provides the engine venv and a tiny random-weight model (it
installs them on first use). The shared gateway serves two workers, `tiny` (tp=1) and
`tiny-tp2` (tp=2); tests that need a gateway of their own start one with `GatewayProcess`.
Whatever happens in a test, teardown ends every process a gateway started.

Timings measured on the way (start → ready, restart after kill -9, ...) are printed in the
terminal summary.
"""

import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml
from fakes.metrics import sample_values

REPO = Path(__file__).resolve().parents[2]
API_KEY = f"sk-e2e-{secrets.token_hex(8)}"
ADMIN_KEY = f"sk-e2e-admin-{secrets.token_hex(8)}"  # /admin, /ui
METRICS_TOKEN = f"e2e-metrics-{secrets.token_hex(8)}"  # /metrics, /metrics/workers
READY_TIMEOUT = 420.0  # two CPU engines starting side by side on two cores
STOP_GRACE = 20.0  # gateway.stop_grace: seconds an engine gets to stop
LOG_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1

# Runs after every other test of the session: it stops the shared gateway.
ENDS_GATEWAY = "e2e_ends_gateway"

TIMINGS: dict[str, float] = {}
RESULTS: dict[str, str] = {}  # measurements other than timings, e.g. prefix-cache hit rates


@dataclass(frozen=True)
class Engine:
    python: str
    model: str
    r1_model: str = ""  # DeepSeek-R1 style chat template (tests/e2e/test_clients.py)
    embed_model: str = ""  # a BERT for /v1/embeddings


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
            return proc.status() != psutil.STATUS_ZOMBIE  # dead, not yet reaped
        except psutil.NoSuchProcess:
            return False

    def kill(self) -> None:
        if self.is_alive:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{ENDS_GATEWAY}: stops the shared e2e gateway, so it runs last"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the tests that stop the shared gateway to the end, whatever the file order."""
    last = [item for item in items if item.get_closest_marker(ENDS_GATEWAY)]
    if last:
        items[:] = [item for item in items if item not in last] + last


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("e2e timings")
        for what, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{what}: {seconds:.1f} s")
    if RESULTS:
        terminalreporter.section("e2e results")
        for what, value in RESULTS.items():
            terminalreporter.write_line(f"{what}: {value}")


def record_timing(what: str, seconds: float) -> None:
    TIMINGS[what] = seconds
    print(f"\n[e2e timing] {what}: {seconds:.1f} s", flush=True)


def record_result(what: str, value: str) -> None:
    RESULTS[what] = value
    print(f"\n[e2e result] {what}: {value}", flush=True)


class GatewayProcess:
    """`python -m gateway serve` in a directory of its own: config, log, state_dir."""

    def __init__(self, workdir: Path, models: list[dict], stop_grace: float = STOP_GRACE) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = API_KEY
        self.admin_key = ADMIN_KEY
        self.metrics_token = METRICS_TOKEN
        self.state_dir = workdir / "state"
        self.log_path = workdir / "gateway.log"
        self.config_path = workdir / "enginegate.yaml"
        self.stop_grace = stop_grace
        self.models = models
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.members: dict[int, Member] = {}  # every process seen in the tree, ever

    @property
    def pid(self) -> int:
        assert self.proc is not None, "gateway not started"
        return self.proc.pid

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        config = {
            "gateway": {
                "host": "127.0.0.1",
                "port": self.port,
                "api_keys": [self.api_key],
                "admin_keys": [self.admin_key],
                "metrics_token": self.metrics_token,
                "state_dir": str(self.state_dir),
                "stop_grace": self.stop_grace,
            },
            "models": self.models,
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINEGATE_")}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "-c", str(self.config_path)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
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
                    last = f"{resp.status_code} {resp.text}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(1)
        pytest.fail(f"gateway not ready after {timeout:.0f} s (last: {last})\n{self.logs()}")

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
        """The guard process running the engine that serves `model_name`."""
        for child in psutil.Process(self.pid).children():
            argv = child.cmdline()
            if "backends.guard" in argv and _flag(argv, "--served-model-name") == model_name:
                return child
        raise AssertionError(f"no guard process for {model_name} under gateway {self.pid}")

    def engine_of(self, model_name: str) -> psutil.Process:
        """The engine's main process (the API server): the guard's first child."""
        guard = self.guard_of(model_name)
        children = guard.children()
        assert children, f"guard {guard.pid} of {model_name} has no engine process"
        return min(children, key=lambda p: p.create_time())

    def stop(self) -> None:
        """SIGTERM, SIGKILL past the grace period, then kill anything left of the tree."""
        if self.proc is None:
            return
        self.snapshot()
        if self.is_running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_grace + 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.left_behind():
            time.sleep(0.2)
        for member in [*self.left_behind(), *self._strays()]:
            member.kill()

    def left_behind(self) -> list[Member]:
        return [m for m in self.members.values() if m.is_alive]

    def _strays(self) -> list[Member]:
        """Guards of this gateway never seen in a snapshot, and everything under them."""
        strays = []
        for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
            argv = proc.info["cmdline"] or []
            if "backends.guard" in argv and _flag(argv, "--parent") == str(self.pid):
                try:
                    tree = [proc, *proc.children(recursive=True)]
                    strays += [Member(p.pid, p.create_time(), "") for p in tree]
                except psutil.Error:
                    pass
        return strays

    def logs(self) -> str:
        """The tail of the gateway's log and of every worker's log, for failure messages."""
        parts = [_tail(self.log_path)]
        for path in sorted((self.state_dir / "logs").glob("*.log")):
            parts.append(_tail(path))
        return "\n".join(parts)

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        """An OpenAI SDK client of this gateway; no retries, so every failure shows."""
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key or self.api_key, max_retries=0, timeout=120
        )

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of GET /metrics named `name` that carry `labels` (and maybe
        others), or None when there is none."""
        with httpx.Client(timeout=10, trust_env=False) as client:
            token = {"Authorization": f"Bearer {self.metrics_token}"}
            text = client.get(f"{self.url}/metrics", headers=token).text
        values = sample_values(text, name, **labels)
        return sum(values) if values else None


def cpu_worker(engine: Engine, name: str, tp: int = 1) -> dict:
    """A `models:` entry for one vLLM CPU worker of the tiny model."""
    return {
        "name": name,
        "backend": "vllm",
        "model": engine.model,
        "device": "cpu",
        "tp": tp,
        "command": [engine.python, "-m", "vllm.entrypoints.openai.api_server"],
        "engine_args": {"max-model-len": 512, "enforce-eager": True},
        "startup_timeout": READY_TIMEOUT,
    }


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The vLLM CPU venv and the tiny model, installed by the setup script if missing."""
    done = subprocess.run(
        ["bash", "deploy/setup-cpu-engine.sh"], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(
            f"deploy/setup-cpu-engine.sh failed with {done.returncode}:\n{done.stderr[-4000:]}"
        )
    values = dict(
        line.split("=", 1) for line in done.stdout.splitlines() if re.match(r"^[A-Z0-9_]+=", line)
    )
    return Engine(
        python=values["ENGINE_PYTHON"],
        model=values["TINY_MODEL"],
        r1_model=values.get("TINY_R1_MODEL", ""),
        embed_model=values.get("TINY_EMBED_MODEL", ""),
    )


@pytest.fixture(scope="session")
def gateway(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The shared gateway: `tiny` (tp=1) and `tiny-tp2` (tp=2), both ready."""
    gw = GatewayProcess(
        tmp_path_factory.mktemp("gateway"),
        [cpu_worker(engine, "tiny"), cpu_worker(engine, "tiny-tp2", tp=2)],
    )
    gw.start()
    try:
        record_timing("shared gateway start -> ready (tiny + tiny-tp2)", gw.wait_ready())
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def running_gateway(gateway: GatewayProcess) -> GatewayProcess:
    """The shared gateway, failing clearly if a test already stopped it."""
    if not gateway.is_running:
        pytest.fail(f"the shared gateway has exited ({gateway.proc.returncode}); see its log")
    return gateway


@pytest.fixture
def client(running_gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with running_gateway.client() as sdk:
        yield sdk


@pytest.fixture
def start_gateway(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., GatewayProcess]]:
    """Start a gateway of the test's own with CPU workers given as (name, tp); not waited on.

    Every gateway started this way is stopped, and its tree ended, when the test ends.
    """
    started: list[GatewayProcess] = []

    def start(*workers: tuple[str, int]) -> GatewayProcess:
        gw = GatewayProcess(
            tmp_path_factory.mktemp("own-gateway"),
            [cpu_worker(engine, name, tp) for name, tp in workers],
        )
        started.append(gw)
        gw.start()
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def timings() -> Callable[[str, float], None]:
    """record(what, seconds): shown in the terminal summary."""
    return record_timing


def _die_with_parent() -> None:
    """In the gateway's child, before exec: SIGTERM when pytest dies, even by SIGKILL."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _flag(argv: list[str], name: str) -> str | None:
    try:
        return argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError as exc:
        return f"--- {path}: {exc.strerror}"
    return "\n".join([f"--- {path} (last {len(lines)} lines)", *lines])
