"""Processes of a benchmark run: pinned to cores, measured through /proc, stopped as a group.

Also what the run was on (machine, commit), for the JSON reports.
"""

import os
import platform
import resource
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.contenders import REPO, Contender

MODEL = "tiny"


@dataclass
class Cores:
    """Which CPUs the contender and the instrument (upstream + load generator) run on."""

    gateway: set[int] | None
    instrument: set[int] | None

    @classmethod
    def plan(cls) -> "Cores":
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None)
        return cls({cpus[0]}, set(cpus[1:]))


class Process:
    """A started process tree (own session), measured through /proc and stopped as a group."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], cores: set[int] | None, log: Path
    ) -> None:
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pinned(cores),
            )
        self.name = name
        self.log = log
        self.root = psutil.Process(self.popen.pid)

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User + system time of the tree so far, reaped children included."""
        total = 0.0
        for proc in self.tree():
            try:
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss_mb(self) -> float:
        total = 0
        for proc in self.tree():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            _killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                _killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def pinned(cores: set[int] | None) -> Any:
    if cores is None:
        return None
    return lambda: os.sched_setaffinity(0, cores)


def _killpg(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def wait_ready(contender: Contender, process: Process | None, timeout: float = 90) -> float:
    """Seconds until the contender answers a real completion; raises RuntimeError if never."""
    start = time.monotonic()
    headers = {"authorization": f"Bearer {contender.key}"} if contender.key else {}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ready?"}], "max_tokens": 1}
    url = contender.ready_url
    while time.monotonic() - start < timeout:
        if process is not None and process.popen.poll() is not None:
            raise RuntimeError(f"exited with {process.popen.returncode}: {process.tail()}")
        try:
            if url and httpx.get(url, headers=headers, timeout=2).status_code != 200:
                raise httpx.HTTPError("not ready")
            url = None
            answer = httpx.post(
                f"{contender.base_url}/chat/completions", json=body, headers=headers, timeout=10
            )
            if answer.status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready in {timeout} s: {process.tail() if process else ''}")


def run_measured(argv: list[str], env: dict[str, str], cores: set[int] | None) -> tuple[str, float]:
    """Run a load generator to its end: (stdout, its CPU seconds from rusage)."""
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=pinned(cores),
    )
    out, err = proc.communicate()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative: the caller diffs it
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {err.decode()[-1000:]}")
    return out.decode(), usage.ru_utime + usage.ru_stime


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_before": os.getloadavg(),
    }


def commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "gateway", "backends") else "")
