"""The state directory: one gateway owns it, and what it holds is private to that user.

`state_dir` holds the engines' logs (which can hold prompts) and their pid records (which the
next gateway uses to end what a crashed one left running). Two gateways sharing one would end
each other's engines at start-up and write to the same logs, so the first one takes an
exclusive lock for its whole life and a second one refuses to start, naming the holder.

Directories are 0700 and files 0600 whatever the umask: other local users must read neither
the logs nor the records.
"""

import contextlib
import fcntl
import json
import os
import stat
from pathlib import Path
from types import TracebackType

LOCK_NAME = "lock"


class StateDirError(Exception):
    """A state directory this gateway cannot use; str() says which and why."""


class StateDirInUse(StateDirError):
    """Another live gateway holds the state directory's lock."""


class StateDirLock:
    """The claim on a state directory; held until release() or the process ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "StateDirLock":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def claim(state_dir: Path, owner: str) -> StateDirLock:
    """Make `state_dir` private (0700, created if missing) and lock it for this process.

    `owner` names this gateway for whoever is refused next, e.g. its config file's path.
    Raises StateDirInUse while another gateway holds the lock ("state_dir /x is in use by
    another gateway (pid 123, config /a/b.yaml)"), StateDirError when the directory cannot
    be made private. The lock is an flock on `state_dir/lock`: the kernel drops it when the
    holder exits, however it exits, so a crashed gateway never blocks the next one.
    """
    state_dir = state_dir.expanduser()
    if state_dir.is_dir() and state_dir.stat().st_mode & stat.S_ISVTX:
        raise StateDirError(
            f"state_dir {state_dir} is a shared directory (sticky bit, like /tmp); "
            "give the gateway a directory of its own"
        )
    try:
        private_dir(state_dir)
        fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateDirError(f"state_dir {state_dir}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise StateDirInUse(
            f"state_dir {state_dir} is in use by another gateway ({holder})"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.fchmod(fd, 0o600)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "config": owner}).encode(), 0)
    return StateDirLock(state_dir / LOCK_NAME, fd)


def _holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(data['pid'])}, config {data['config']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner may enter: created 0700, or chmodded to 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)
    return path


def open_private(path: Path, flags: int) -> int:
    """os.open with mode 0600, also for a file an older version left world-readable."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text` at once (a reader never sees half of it), mode 0600."""
    private_dir(path.parent)
    partial = path.with_name(f".{path.name}.partial")
    try:
        fd = open_private(partial, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
