"""One engine process tree, seen from the gateway: start, wait, stop, and pid records.

Every engine runs under `backends.guard` in a session of its own, so one signal to the guard
reaches the whole tree and the guard ends it even if the gateway dies. The gateway keeps a
record of each guard in the state directory; a gateway started after a crash ends whatever
those records still point to.

The guard's pid is also the tree's process group id. A guard can itself be SIGKILLed (by the
OOM killer, say), leaving its engine running with no parent that knows it; the group id still
finds it, because the kernel does not hand a group's id to a new process while a member of the
group lives. Members are also matched by start time: none can be older than the guard.
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import psutil

from backends.statedir import open_private, private_dir, write_private

log = logging.getLogger("enginegate.process")

LOG_ROTATE_BYTES = 20 * 1024 * 1024
KILL_MARGIN_SECONDS = 5.0
GONE_TIMEOUT_SECONDS = 5.0
SECRET_FLAGS = frozenset({"--api-key", "--api-keys"})  # SGLang, LMDeploy: the worker key


class Engine(Protocol):
    """What the supervisor needs of a running engine: one process tree here (EngineProcess),
    or the ranks of one replica on a Ray cluster (backends/ray_launch.py Gang)."""

    pid: int

    @property
    def returncode(self) -> int | None:
        """None while it runs; once it (any part of it) ended, its exit status."""
        ...

    async def wait(self) -> int: ...

    def pids(self) -> list[int]: ...

    async def stop(self, grace: float) -> int:
        """End it all, SIGKILL past `grace`; its status."""
        ...

    def kill(self) -> None:
        """End it all now, without waiting: when stop() failed."""
        ...


class EngineProcess:
    def __init__(self, proc: asyncio.subprocess.Process, record: Path, create_time: float) -> None:
        self._proc = proc
        self._record = record
        self.pid = proc.pid  # the guard's, and the tree's process group id
        self.create_time = create_time

    @classmethod
    async def start(
        cls, argv: list[str], env: dict[str, str], log_path: Path, record: Path, grace: float
    ) -> "EngineProcess":
        """Start argv under a guard; stdout and stderr go to log_path (rotated at each start).

        The pid record is written before this returns; if that fails the guard's tree is
        ended and the error raised, so no engine runs untracked.
        """
        guard = [sys.executable, "-m", "backends.guard", "--parent", str(os.getpid())]
        guard += ["--grace", str(grace), "--", *argv]
        spawned = time.time()
        log_fd = _open_log(log_path)
        try:
            proc = await asyncio.create_subprocess_exec(
                *guard,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        try:
            created = _create_time(proc.pid, spawned)
            write_private(record, json.dumps(_record(proc.pid, created, argv)))
        except BaseException:
            kill_tree(proc.pid)
            await proc.wait()
            raise
        return cls(proc, record, created)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        """Until the guard exits; stop() still ends what it may have left."""
        return await self._proc.wait()

    def pids(self) -> list[int]:
        """The guard and every live process under it, the guard first."""
        return tree_pids(self.pid)

    def kill(self) -> None:
        kill_tree(self.pid)

    async def stop(self, grace: float) -> int:
        """SIGTERM the tree through the guard; past grace (+margin) SIGKILL the whole group.

        Whatever is still in the guard's process group afterwards is SIGKILLed too: that is
        the engine of a guard that was itself killed. Returns the guard's exit status.
        """
        if self._proc.returncode is None:
            _signal(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._proc.wait()), grace + KILL_MARGIN_SECONDS
                )
            except TimeoutError:
                kill_tree(self.pid)
        code = await self._proc.wait()
        left = end_group(self.pid, self.create_time)
        if left:
            log.warning("killed processes %s left in the group of guard %d", left, self.pid)
            await _wait_gone(left, GONE_TIMEOUT_SECONDS)
        self._record.unlink(missing_ok=True)
        return code


def _open_log(log_path: Path) -> int:
    """The worker's log, appended to, 0600; the previous one kept as .1 past LOG_ROTATE_BYTES."""
    private_dir(log_path.parent)
    if log_path.exists() and log_path.stat().st_size > LOG_ROTATE_BYTES:
        rotated = log_path.with_suffix(log_path.suffix + ".1")
        log_path.replace(rotated)
        rotated.chmod(0o600)  # a log an older version wrote 0644
    return open_private(log_path, os.O_WRONLY | os.O_APPEND)


def _create_time(pid: int, spawned: float) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        # Gone (and reaped) already: nothing of it can be older than the spawn. psutil's
        # start times have 10 ms steps, so allow one.
        return spawned - 0.01


def _record(pid: int, created: float, argv: list[str]) -> dict[str, Any]:
    gateway = psutil.Process()
    return {
        "pid": pid,
        "create_time": created,
        "pgid": pid,  # the guard leads a session of its own
        "gateway_pid": gateway.pid,
        "gateway_create_time": gateway.create_time(),
        "argv": redact(argv),
    }


def redact(argv: list[str]) -> list[str]:
    """argv without the worker key (`--api-key K`, `--api-keys=K`), for records and logs."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        flag, equals, _ = arg.partition("=")
        if hide_next:
            out.append("<redacted>")
        elif equals and flag in SECRET_FLAGS:
            out.append(f"{flag}=<redacted>")
        else:
            out.append(arg)
        hide_next = arg in SECRET_FLAGS
    return out


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def tree_pids(pid: int) -> list[int]:
    """`pid` and every live process under it, `pid` first; [] when it is gone."""
    try:
        return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int) -> None:
    """SIGKILL a guard's process group and every descendant that left it."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        descendants = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            child.kill()


def end_group(pgid: int, since: float) -> list[int]:
    """SIGKILL every live process in group `pgid` that started at `since` or later; their pids.

    A process is killed through psutil, which checks its start time first, so a pid recycled
    in between is never hit.
    """
    ended = []
    for proc in _group_members(pgid, since):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()
            ended.append(proc.pid)
    return ended


def _group_members(pgid: int, since: float) -> list[psutil.Process]:
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
            proc = psutil.Process(pid)
            if proc.create_time() >= since and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return members


async def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_is_running(pid) for pid in pids):
        await asyncio.sleep(0.05)


def _is_running(pid: int) -> bool:
    """Not yet dead: a zombie only waits to be reaped (by init, which may be slow to)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def end_leftovers(records_dir: Path) -> list[int]:
    """Kill process trees recorded by an earlier gateway that did not stop them. Returns pids.

    A record whose gateway still runs is left alone: its engines are that gateway's.
    """
    ended: set[int] = set()
    for record in sorted(records_dir.rglob("*.json")):  # older versions nested some
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict):
            record.unlink(missing_ok=True)
            continue
        if _is_alive(data.get("gateway_pid"), data.get("gateway_create_time")):
            if data["gateway_pid"] != os.getpid():
                log.warning(
                    "%s belongs to running gateway %s: left alone", record, data["gateway_pid"]
                )
                continue
        ended.update(_end_recorded(data))
        record.unlink(missing_ok=True)
    return sorted(ended)


def _end_recorded(data: dict[str, Any]) -> set[int]:
    try:
        pid, created = int(data["pid"]), float(data["create_time"])
        pgid = int(data.get("pgid", pid))
    except (KeyError, TypeError, ValueError):
        return set()
    ended = set()
    # A recycled pid belongs to someone else: only the same start time is ours.
    if _is_alive(pid, created):
        kill_tree(pid)
        ended.add(pid)
    # The guard gone (killed), its engine lives on in the guard's group.
    ended.update(end_group(pgid, created))
    return ended


def _is_alive(pid: object, created: object) -> bool:
    """Whether process `pid` runs and is the one that started at `created`."""
    if not isinstance(pid, int) or not isinstance(created, int | float):
        return False
    try:
        return abs(psutil.Process(pid).create_time() - created) < 0.01
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def tail(log_path: Path, lines: int = 20) -> list[str]:
    """The last lines of a log file, read from its end."""
    try:
        with log_path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]
