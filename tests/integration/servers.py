"""Real processes for integration tests: scripted upstreams and the gateway, on free ports.

Every process goes through a `Spawner`, which stops all of them at teardown, pass or fail.
Output goes to log files (a full pipe would stall a chatty process), quoted in failures.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Spawner:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self, name: str, signum: int = signal.SIGTERM, timeout: float = 10) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signum)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()

    def stop_all(self) -> None:
        """SIGTERM every process at once, then wait for each (SIGKILL past its deadline)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for name in self.procs:
            self.stop(name)

    def wait_http(self, name: str, url: str, timeout: float = 20) -> None:
        """Until `url` answers 200; fails early, with the log, if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.procs[name].poll()
            assert code is None, f"{name} exited with {code}:\n{self.log(name)}"
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{url} not ready in {timeout} s:\n{self.log(name)}"
            time.sleep(0.05)


@dataclass
class Upstream:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, int]:
        return httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=5).json()


def start_upstream(spawner: Spawner, name: str, *flags: str) -> Upstream:
    """Start `python -m tests.fakes.upstream`; the caller waits with `wait_upstream`."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.fakes.upstream", "--port", str(port), *flags]
    spawner.start(name, argv)
    return Upstream(name, port)


def wait_upstream(spawner: Spawner, upstream: Upstream) -> None:
    spawner.wait_http(upstream.name, f"http://127.0.0.1:{upstream.port}/health")


def start_gateway(spawner: Spawner, config: Path) -> None:
    """Start `python -m gateway serve`; the caller waits for /ready."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    spawner.start("gateway", [sys.executable, "-m", "gateway", "serve", "-c", str(config)], env)
