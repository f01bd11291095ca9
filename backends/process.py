"""One engine process tree, seen from the gateway: start, wait, stop, and pid records.

Every engine runs under `backends.guard` in a session of its own, so one signal to the guard
reaches the whole tree and the guard ends it even if the gateway dies. The gateway keeps a
record of each guard in the state directory; a gateway started after a crash ends whatever
those records still point to.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

LOG_ROTATE_BYTES = 20 * 1024 * 1024
KILL_MARGIN_SECONDS = 5.0


class EngineProcess:
    def __init__(self, proc: asyncio.subprocess.Process, record: Path) -> None:
        self._proc = proc
        self._record = record
        self.pid = proc.pid

    @classmethod
    async def start(
        cls, argv: list[str], env: dict[str, str], log_path: Path, record: Path, grace: float
    ) -> "EngineProcess":
        """Start argv under a guard; stdout and stderr go to log_path (rotated at each start)."""
        _rotate(log_path)
        guard = [sys.executable, "-m", "backends.guard", "--parent", str(os.getpid())]
        guard += ["--grace", str(grace), "--", *argv]
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *guard,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        record.parent.mkdir(parents=True, exist_ok=True)
        created = psutil.Process(proc.pid).create_time()
        record.write_text(json.dumps({"pid": proc.pid, "create_time": created, "argv": argv}))
        return cls(proc, record)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        code = await self._proc.wait()
        self._record.unlink(missing_ok=True)
        return code

    def pids(self) -> list[int]:
        """The guard and every live process under it."""
        try:
            guard = psutil.Process(self.pid)
            return [self.pid, *(p.pid for p in guard.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    async def stop(self, grace: float) -> int:
        """SIGTERM the tree through the guard; past grace (+margin) SIGKILL the whole group."""
        if self._proc.returncode is None:
            _signal(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._proc.wait()), grace + KILL_MARGIN_SECONDS
                )
            except TimeoutError:
                kill_tree(self.pid)
        return await self.wait()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def kill_tree(pid: int) -> None:
    """SIGKILL a guard's process group and every descendant that left it."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def end_leftovers(records_dir: Path) -> list[int]:
    """Kill process trees recorded by an earlier gateway that did not stop them. Returns pids."""
    ended = []
    for record in sorted(records_dir.glob("*.json")):
        try:
            data = json.loads(record.read_text())
            proc = psutil.Process(int(data["pid"]))
            # A recycled pid belongs to someone else: only the same start time is ours.
            if abs(proc.create_time() - float(data["create_time"])) < 0.01:
                kill_tree(proc.pid)
                ended.append(proc.pid)
        except (psutil.NoSuchProcess, ValueError, KeyError, OSError):
            pass
        record.unlink(missing_ok=True)
    return ended


def _rotate(log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists() and log_path.stat().st_size > LOG_ROTATE_BYTES:
        log_path.replace(log_path.with_suffix(log_path.suffix + ".1"))


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
