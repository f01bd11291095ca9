"""A real gateway as a process, for the tiers that start real engines (tests/e2e, tests/gpu).

`GatewayProcess` runs `python -m gateway serve -c FILE` in a folder of its own (config, log,
state_dir) and remembers every process seen under it, so that `stop()` ends the whole tree
whatever a test did to it. What differs between tiers comes in as arguments: the keys and
token, extra `gateway:` keys, and environment variables for the gateway and its engines.

    gw = GatewayProcess(tmp / "gw", [worker], api_key="sk-1", gateway={"drain_timeout": 5})
    gw.start()
    gw.wait_ready()
    with gw.client() as sdk: ...
    gw.stop()
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml

from fakes.metrics import sample_values

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 420.0
STOP_GRACE = 20.0  # gateway.stop_grace: seconds an engine gets to stop
LOG_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1


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


class GatewayProcess:
    """`python -m gateway serve -c FILE` in `workdir`; the config is written at once, so that
    `cli("plan", "--json")` works before `start()`.

    `gateway` adds to or overrides the `gateway:` section (a None value removes the key, e.g.
    `{"api_keys": None, "allow_unauthenticated": True}`); `env` is set on top of this process's
    environment (minus ENGINEGATE_*) for the gateway and, through it, its engines.
    """

    def __init__(
        self,
        workdir: Path,
        models: list[dict[str, Any]],
        *,
        api_key: str,
        admin_key: str | None = None,
        metrics_token: str | None = None,
        stop_grace: float = STOP_GRACE,
        gateway: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.admin_key = admin_key
        self.metrics_token = metrics_token
        self.stop_grace = stop_grace
        self.models = models
        self.env = dict(env or {})
        self.log_path = workdir / "gateway.log"
        self.config_path = workdir / "enginegate.yaml"
        self.config = self.make_config(gateway or {})
        self.state_dir = Path(self.config["gateway"]["state_dir"])
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.members: dict[int, Member] = {}  # every process seen in the tree, ever

    def make_config(self, extra: dict[str, Any]) -> dict[str, Any]:
        section: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "api_keys": [self.api_key],
            "admin_keys": [self.admin_key] if self.admin_key else None,
            "metrics_token": self.metrics_token,
            "state_dir": str(self.workdir / "state"),
            "stop_grace": self.stop_grace,
            **extra,
        }
        section = {key: value for key, value in section.items() if value is not None}
        return {"gateway": section, "models": self.models}

    @property
    def pid(self) -> int:
        assert self.proc is not None, "gateway not started"
        return self.proc.pid

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINEGATE_")}
        return {**env, **self.env}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`python -m gateway ARGS -c FILE`, e.g. `plan --json`."""
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "-c", str(self.config_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env=self.child_env(),
        )

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "-c", str(self.config_path)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.child_env(),
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
                    pytest.fail(f"gateway exited with {self.returncode}\n{self.logs()}")
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
        """The guard process running the engine that serves `model_name`."""
        for child in psutil.Process(self.pid).children():
            argv = child.cmdline()
            if "backends.guard" in argv and model_name in served_names(argv):
                return child
        raise AssertionError(f"no guard process for {model_name} under gateway {self.pid}")

    def engine_of(self, model_name: str) -> psutil.Process:
        """The engine's main process (its API server): the guard's first child."""
        guard = self.guard_of(model_name)
        children = guard.children()
        assert children, f"guard {guard.pid} of {model_name} has no engine process"
        return min(children, key=lambda p: p.create_time())

    def tree_of(self, model_name: str) -> set[int]:
        """The pids of the engine serving `model_name`: its guard and everything under it."""
        guard = self.guard_of(model_name)
        return {guard.pid, *(p.pid for p in guard.children(recursive=True))}

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
                self.proc.wait(self.stop_grace + 30)
                took = time.monotonic() - signalled
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.left_behind():
            time.sleep(0.2)
        for member in [*self.left_behind(), *self._strays()]:
            member.kill()
        return took

    def left_behind(self) -> list[Member]:
        return [m for m in self.members.values() if m.is_alive]

    def _strays(self) -> list[Member]:
        """Guards of this gateway never seen in a snapshot, and everything under them."""
        strays = []
        for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
            argv = proc.info["cmdline"] or []
            if "backends.guard" in argv and flag(argv, "--parent") == str(self.pid):
                try:
                    tree = [proc, *proc.children(recursive=True)]
                    strays += [Member(p.pid, p.create_time(), "") for p in tree]
                except psutil.Error:
                    pass
        return strays

    def log(self) -> str:
        """The gateway's own log, whole."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def worker_log(self, worker_id: str) -> str:
        try:
            return (self.state_dir / "logs" / f"{worker_id}.log").read_text(errors="replace")
        except OSError:
            return ""

    def logs(self, lines: int = LOG_TAIL_LINES) -> str:
        """The tail of the gateway's log and of every worker's log, for failure messages."""
        parts = [tail(self.log_path, lines)]
        for path in sorted((self.state_dir / "logs").glob("*.log")):
            parts.append(tail(path, lines))
        return "\n".join(parts)

    def client(
        self, api_key: str | None = None, base_url: str | None = None, socket: str | None = None
    ) -> openai.OpenAI:
        """An OpenAI SDK client of this gateway (or of `base_url`, through the Unix socket
        `socket` if given: a vLLM engine's); no retries, so every failure shows."""
        http = engine_http(socket, timeout=120) if socket else None
        return openai.OpenAI(
            base_url=base_url or f"{self.url}/v1",
            api_key=api_key or self.api_key,
            max_retries=0,
            timeout=120,
            http_client=http,
        )

    def worker(self, worker_id: str) -> dict[str, Any]:
        """One worker as GET /admin/workers shows it (needs `admin_key`)."""
        return next(w for w in self.workers() if w["id"] == worker_id)

    def metrics_page(self) -> str:
        """GET /metrics, with the metrics token when there is one."""
        with httpx.Client(timeout=10, trust_env=False) as client:
            return client.get(f"{self.url}/metrics", headers=bearer(self.metrics_token)).text

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of GET /metrics named `name` that carry `labels` (and maybe
        others), or None when there is none."""
        values = sample_values(self.metrics_page(), name, **labels)
        return sum(values) if values else None

    def workers(self) -> list[dict[str, Any]]:
        """GET /admin/workers (needs `admin_key`)."""
        with httpx.Client(timeout=10, trust_env=False) as client:
            resp = client.get(f"{self.url}/admin/workers", headers=bearer(self.admin_key))
        resp.raise_for_status()
        data: list[dict[str, Any]] = resp.json()["data"]
        return data


def engine_http(socket: str, **options: Any) -> httpx.Client:
    """An httpx client of an engine on a Unix socket (vLLM workers listen on no TCP port); the
    host of the URLs it gets means nothing, e.g. `http://localhost/metrics`."""
    transport = httpx.HTTPTransport(uds=socket)
    return httpx.Client(transport=transport, trust_env=False, **options)


def engine_base(worker: dict[str, Any]) -> tuple[str, str | None]:
    """A worker's engine from its GET /admin/workers entry: its root URL and, for one on a
    Unix socket, that socket (for `engine_http` or `client(socket=...)`)."""
    if worker.get("socket"):
        return "http://localhost", worker["socket"]
    return f"http://127.0.0.1:{worker['port']}", None


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for `token`; none without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def served_names(argv: list[str]) -> set[str | None]:
    """The name an engine serves under: vLLM/SGLang --served-model-name, LMDeploy --model-name."""
    return {flag(argv, "--served-model-name"), flag(argv, "--model-name")}


def flag(argv: list[str], name: str) -> str | None:
    """The value after `name` in `argv`, or None."""
    try:
        return argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"--- {path}: {exc.strerror}"
    return "\n".join([f"--- {path} (last {len(text)} lines)", *text])


def wait_gone(members: list[Member], timeout: float) -> list[Member]:
    """The members still alive after up to `timeout` seconds of waiting for them to go."""
    deadline = time.monotonic() + timeout
    alive = [m for m in members if m.is_alive]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [m for m in alive if m.is_alive]
    return alive


def is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _die_with_parent() -> None:
    """In the gateway's child, before exec: SIGTERM when pytest dies, even by SIGKILL."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
