"""The guard ends the whole engine tree: on stop, on the engine's crash, on the gateway's death.

These start real processes. The engine is a shell wrapper that forks a child which ignores
SIGTERM, like launcher scripts around engines whose workers outlive a polite stop.
"""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from backends.process import EngineProcess, kill_tree

REPO = Path(__file__).resolve().parents[2]

# $1: a directory for pid files. The wrapper dies on SIGTERM; its child does not.
WRAPPER = """\
sh -c 'trap "" TERM; echo $$ > "$1/child.pid"; while :; do sleep 0.1; done' child "$1" &
echo $$ > "$1/wrapper.pid"
wait
"""


def engine_argv(tmp_path: Path) -> list[str]:
    script = tmp_path / "engine.sh"
    script.write_text(WRAPPER)
    return ["sh", str(script), str(tmp_path)]


async def wait_for_file(path: Path, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        await asyncio.sleep(0.02)
    return int(path.read_text())


def processes(pids: list[int]) -> list[psutil.Process]:
    """Handles that stay valid if a pid is recycled (psutil compares start times)."""
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return found


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running; a zombie has ended, it only waits for its parent to reap it."""
    running = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
        except psutil.NoSuchProcess:
            pass
    return running


async def wait_all_gone(procs: list[psutil.Process], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not alive(procs), f"still alive: {[p.pid for p in alive(procs)]}"


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[EngineProcess, list[psutil.Process]]]:
    """1. Start the wrapper under a guard; 2. record the guard, wrapper and child.
    Whatever a test leaves alive is killed and reaped afterwards."""
    engine = await EngineProcess.start(
        engine_argv(tmp_path),
        dict(os.environ),
        tmp_path / "logs" / "engine.log",
        tmp_path / "workers" / "engine.json",
        grace=1,
    )
    tree: list[psutil.Process] = []
    try:
        wrapper = await wait_for_file(tmp_path / "wrapper.pid")
        child = await wait_for_file(tmp_path / "child.pid")
        tree = processes(sorted({*engine.pids(), wrapper, child}))
        assert {engine.pid, wrapper, child} <= {p.pid for p in tree}
        yield engine, tree
    finally:
        for proc in alive(tree):
            proc.kill()
        if engine.returncode is None:
            kill_tree(engine.pid)
        await engine.wait()


async def test_stop_ends_a_forked_child_that_ignores_sigterm(
    engine: tuple[EngineProcess, list[psutil.Process]], tmp_path: Path
) -> None:
    """1. Start the tree; 2. stop(grace=1); 3. every recorded process is gone, and the
    stop took about the grace period, not the guard's longer wait for leftovers."""
    process, tree = engine
    started = time.monotonic()
    await asyncio.wait_for(process.stop(grace=1), timeout=20)
    assert time.monotonic() - started < 4
    assert not alive(tree), f"still alive: {[p.pid for p in alive(tree)]}"
    assert not (tmp_path / "workers" / "engine.json").exists()


async def test_guard_ends_leftovers_when_the_engine_is_killed(
    engine: tuple[EngineProcess, list[psutil.Process]], tmp_path: Path
) -> None:
    """1. Start the tree; 2. SIGKILL the wrapper (the engine's main process);
    3. the guard ends the orphaned child and exits with the engine's status."""
    process, tree = engine
    os.kill(int((tmp_path / "wrapper.pid").read_text()), signal.SIGKILL)
    code = await asyncio.wait_for(process.wait(), timeout=20)
    assert code == 128 + signal.SIGKILL
    await wait_all_gone(tree, timeout=2)


# The stand-in for the gateway: it starts the guard, writes the guard's pid, then waits.
GATEWAY_STAND_IN = """\
import os, subprocess, sys
work, script = sys.argv[1], sys.argv[2]
guard = subprocess.Popen(
    [sys.executable, "-m", "backends.guard", "--parent", str(os.getpid()), "--grace", "30",
     "--", "sh", script, work]
)
with open(os.path.join(work, "guard.pid"), "w") as f:
    f.write(str(guard.pid))
guard.wait()
"""


async def test_gateway_death_ends_the_tree(tmp_path: Path) -> None:
    """1. A stand-in gateway starts the guard; 2. SIGKILL the stand-in;
    3. the guard hears of it (PR_SET_PDEATHSIG) and the whole tree is gone within seconds."""
    argv = engine_argv(tmp_path)
    gateway = subprocess.Popen(
        [sys.executable, "-c", GATEWAY_STAND_IN, str(tmp_path), argv[1]], cwd=REPO
    )
    tree: list[psutil.Process] = []
    try:
        guard = await wait_for_file(tmp_path / "guard.pid")
        wrapper = await wait_for_file(tmp_path / "wrapper.pid")
        child = await wait_for_file(tmp_path / "child.pid")
        tree = processes([guard, wrapper, child])
        assert len(tree) == 3, "the tree ended before the test killed the gateway"
        gateway.kill()
        gateway.wait(timeout=5)
        await wait_all_gone(tree, timeout=5)
    finally:
        gateway.kill()
        gateway.wait()
        for proc in alive(tree):
            proc.kill()
