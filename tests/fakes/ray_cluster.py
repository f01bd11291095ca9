"""A real Ray cluster of two nodes on this host, for `cluster: {ray: ...}` tests.

Each node is a `ray start --block` process on its own loopback address (127.0.0.2 is the
head, 127.0.0.3 the second node; Ray would turn 127.0.0.1 into the host's network address),
with one CPU, a small object store, no dashboard, and GPUs that exist only as Ray resources
(`--num-gpus`: Ray counts them, nothing runs on them). Each `ray start` is its own session:
SIGTERM to it stops its node's processes; what is still there after the grace is killed by
process group, and anything left that names the cluster's temporary directory by pid. Never
`ray stop`, which ends every Ray process of the machine by name.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).parent / "ray")
HEAD_IP, SECOND_IP = "127.0.0.2", "127.0.0.3"
STOP_GRACE = 30.0
STARTED = "Ray runtime started."


@dataclass(frozen=True)
class RayCluster:
    address: str  # the head's GCS, HOST:PORT
    node_ip: str  # the head's address: where a driver on this host joins
    logs: Path


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _node_args(ip: str, gpus: int) -> list[str]:
    return [
        "--node-ip-address", ip,
        "--num-cpus", "1",
        "--num-gpus", str(gpus),
        "--object-store-memory", str(80 * 1024 * 1024),
        "--dashboard-agent-listen-port", str(_free_port(ip)),
        "--min-worker-port", "0", "--max-worker-port", "0",
        "--disable-usage-stats",
        "--block",
    ]  # fmt: skip


@contextmanager
def ray_cluster(head_gpus: int, second_gpus: int, timeout: float = 120) -> Iterator[RayCluster]:
    """Start both nodes, wait until Ray lists both alive, stop them at exit."""
    temp = Path(tempfile.mkdtemp(prefix="eg-ray-"))  # short: Ray's socket paths live under it
    port = _free_port(HEAD_IP)
    head_argv = [RAY, "start", "--head", "--port", str(port), "--include-dashboard=false"]
    head_argv += ["--temp-dir", str(temp)]
    second_argv = [RAY, "start", "--address", f"{HEAD_IP}:{port}"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_start(head_argv + _node_args(HEAD_IP, head_gpus), temp / "head.out"))
        _wait_until_started(temp / "head.out", timeout, procs)
        procs.append(_start(second_argv + _node_args(SECOND_IP, second_gpus), temp / "second.out"))
        _wait_until_started(temp / "second.out", timeout, procs)
        yield RayCluster(f"{HEAD_IP}:{port}", HEAD_IP, temp)
    finally:
        _stop(procs, temp)


@contextmanager
def second_node_again(cluster: RayCluster, gpus: int, timeout: float = 120) -> Iterator[None]:
    """The second node joining `cluster` again (after its first `ray start` was stopped):
    stopped at exit, what it left killed by process group."""
    argv = [RAY, "start", "--address", cluster.address, *_node_args(SECOND_IP, gpus)]
    log = cluster.logs / "second-again.out"
    procs = [_start(argv, log)]
    try:
        _wait_until_started(log, timeout, procs)
        yield
    finally:
        _end(procs)


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _wait_until_started(log: Path, timeout: float, procs: list[subprocess.Popen[bytes]]) -> None:
    """`ray start` says so once its node is registered with the head (ray/scripts/scripts.py)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(proc.poll() is None for proc in procs):
        if STARTED in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"Ray node did not start ({log}): {log.read_text()[-3000:]}")


def _stop(procs: list[subprocess.Popen[bytes]], temp: Path) -> None:
    _end(procs)
    for leftover in leftovers(temp):
        leftover.kill()
    shutil.rmtree(temp, ignore_errors=True)


def _end(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):  # the second node first, then the head
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what the node left in its own session
        except ProcessLookupError:
            pass


def leftovers(temp: Path) -> list[psutil.Process]:
    """Processes that still name the cluster's temporary directory."""
    found = []
    for proc in psutil.process_iter():
        try:
            if any(str(temp) in part for part in proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found
