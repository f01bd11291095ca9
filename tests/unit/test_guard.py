"""The guard ends the whole engine tree: on stop, on the engine's crash, on the gateway's death.

These start real processes. The engine is a shell wrapper that forks a child which ignores
SIGTERM, like launcher scripts around engines whose workers outlive a polite stop.
"""

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from backends.process import LOG_ROTATE_BYTES, EngineProcess, end_leftovers, kill_tree

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


async def test_an_engine_dies_with_its_guard(
    engine: tuple[EngineProcess, list[psutil.Process]], tmp_path: Path
) -> None:
    """Finding 10: SIGKILL of the guard left its engine running with no one to end it.

    1. Start the tree; 2. SIGKILL the guard; 3. the engine's main process (the wrapper) gets
    SIGKILL from the kernel (PR_SET_PDEATHSIG toward the guard) within a second or two.
    """
    process, _ = engine
    wrapper = processes([int((tmp_path / "wrapper.pid").read_text())])
    os.kill(process.pid, signal.SIGKILL)
    await wait_all_gone(wrapper, timeout=3)


async def test_stop_ends_the_engine_of_a_killed_guard(
    engine: tuple[EngineProcess, list[psutil.Process]], tmp_path: Path
) -> None:
    """Finding 10: stop() signalled nothing once the guard had exited, so an engine whose
    guard was SIGKILLed (the OOM killer) outlived it for good.

    1. Start the tree; 2. SIGKILL the guard; 3. stop(): every process of the tree is gone,
    the child that ignores SIGTERM included (it is still in the guard's process group).
    """
    process, tree = engine
    os.kill(process.pid, signal.SIGKILL)
    await asyncio.wait_for(process.stop(grace=1), timeout=20)
    await wait_all_gone(tree, timeout=3)
    assert not (tmp_path / "workers" / "engine.json").exists()


async def test_the_next_gateway_ends_the_engine_of_a_killed_guard(
    engine: tuple[EngineProcess, list[psutil.Process]], tmp_path: Path
) -> None:
    """Finding 10: a gateway's sweep of leftovers followed only the guard's pid.

    1. Start the tree; 2. SIGKILL the guard and reap it, as if the gateway then died too:
    its record stays; 3. end_leftovers() finds the rest by the recorded process group and
    start time and kills it.
    """
    process, tree = engine
    os.kill(process.pid, signal.SIGKILL)
    await process.wait()
    child = int((tmp_path / "child.pid").read_text())
    ended = end_leftovers(tmp_path / "workers")
    assert child in ended
    await wait_all_gone(tree, timeout=3)
    assert list((tmp_path / "workers").iterdir()) == []


async def test_the_sweep_finds_records_in_subdirectories(tmp_path: Path) -> None:
    """Finding 17: a model named `org/eng` put its record in workers/org/, which the sweep
    of leftovers did not look into. Records left so by an older gateway are found now.

    1. Start a tree whose record is workers/org/eng-0.json; 2. end_leftovers() kills it.
    """
    record = tmp_path / "workers" / "org" / "eng-0.json"
    process = await EngineProcess.start(
        engine_argv(tmp_path), dict(os.environ), tmp_path / "engine.log", record, grace=1
    )
    try:
        child = await wait_for_file(tmp_path / "child.pid")
        tree = processes([*process.pids(), child])
        assert process.pid in end_leftovers(tmp_path / "workers")
        await wait_all_gone(tree, timeout=5)
        assert not record.exists()
    finally:
        kill_tree(process.pid)
        await process.wait()


async def test_a_record_of_a_running_gateway_is_left_alone(tmp_path: Path) -> None:
    """Finding 5: a second gateway ended every recorded tree at start, another live
    gateway's included.

    1. Record a running process as an engine of a gateway that still runs (here: a second
    process standing in for it); 2. end_leftovers() leaves both it and the record alone.
    """
    engine = subprocess.Popen(["sleep", "30"])
    other_gateway = subprocess.Popen(["sleep", "30"])
    try:
        record = tmp_path / "workers" / "eng-0.json"
        record.parent.mkdir()
        created = psutil.Process(engine.pid).create_time()
        owner = psutil.Process(other_gateway.pid).create_time()
        record.write_text(
            json.dumps(
                {"pid": engine.pid, "create_time": created, "pgid": engine.pid,
                 "gateway_pid": other_gateway.pid, "gateway_create_time": owner}
            )
        )  # fmt: skip
        assert end_leftovers(tmp_path / "workers") == []
        assert engine.poll() is None and record.exists()
    finally:
        for proc in (engine, other_gateway):
            proc.kill()
            proc.wait()


async def test_a_failed_record_write_ends_the_spawned_guard(tmp_path: Path) -> None:
    """Finding 2: when writing the pid record failed after the spawn, the engine ran on
    with no one tracking it.

    1. Make the record's path a directory; 2. start() raises; 3. the guard it had spawned
    (a child of this process until it is reaped) and the engine under it are gone.
    """
    record = tmp_path / "workers" / "engine.json"
    record.mkdir(parents=True)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with pytest.raises(OSError):
        await EngineProcess.start(
            engine_argv(tmp_path), dict(os.environ), tmp_path / "engine.log", record, grace=1
        )
    spawned = [p for p in me.children(recursive=True) if p.pid not in before]
    try:
        await wait_all_gone(spawned, timeout=5)
    finally:
        for proc in spawned:  # the guard leads its group: what it started is in there too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


async def test_logs_and_records_are_private_and_hold_no_key(tmp_path: Path) -> None:
    """Finding 14: logs and records were world-readable (umask 022), and the record held
    the engine's argv, SGLang's `--api-key` value included.

    1. Under umask 022, with a world-readable log past the rotation size already there,
    start an engine whose argv holds `--api-key`; 2. directories are 0700, the log, the
    rotated log and the record 0600; 3. the record has pid, start time, process group and
    gateway pid, and no key.
    """
    log_path = tmp_path / "logs" / "eng-0.log"
    log_path.parent.mkdir()
    log_path.touch(mode=0o644)
    os.truncate(log_path, LOG_ROTATE_BYTES + 1)  # sparse: costs no disk
    record = tmp_path / "workers" / "eng-0.json"
    argv = ["sh", "-c", "sleep 30", "engine", "--api-key", "s3cret-key", "--api-keys=s3cret-2"]
    old_umask = os.umask(0o022)
    try:
        process = await EngineProcess.start(argv, dict(os.environ), log_path, record, grace=1)
    finally:
        os.umask(old_umask)
    try:
        modes = {
            path.name: stat.S_IMODE(path.stat().st_mode)
            for path in (log_path.parent, record.parent, log_path, record)
        }
        modes["rotated"] = stat.S_IMODE(log_path.with_suffix(".log.1").stat().st_mode)
        assert modes == {"logs": 0o700, "workers": 0o700, "eng-0.log": 0o600,
                         "eng-0.json": 0o600, "rotated": 0o600}  # fmt: skip
        data = json.loads(record.read_text())
        assert "s3cret" not in record.read_text()
        assert data["pid"] == data["pgid"] == process.pid
        assert data["gateway_pid"] == os.getpid() and data["create_time"] > 0
        assert data["argv"][-3:] == ["--api-key", "<redacted>", "--api-keys=<redacted>"]
    finally:
        await process.stop(grace=1)
