"""Where a worker whose engine serves HTTP on a Unix socket puts it.

Why a socket: any local user can connect to 127.0.0.1:PORT, and vLLM's key guards only the
paths under /v1, /v2, /inference and /cohere, so /invocations (a whole chat completion) and
/tokenize answered every local user without a key (security finding 19). Connecting to a
socket needs search permission on its directory, and the directory is 0700: only the
gateway's user gets in, and nobody else can put a file there before the engine binds.

The socket lives in `state_dir/run/` (0700, like the state directory). A socket path holds at
most 107 bytes; when that one would be longer, the worker gets a directory of its own from
tempfile.mkdtemp (0700), removed by `remove()` with the socket.
"""

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from backends.statedir import private_dir

MAX_PATH = 107  # sun_path is 108 bytes, NUL included
RUN_DIR = "run"
TEMP_PREFIX = "enginegate-"
_LONGEST_ID = 24  # longer worker ids are shortened, so a socket name stays under 40 bytes


def socket_name(worker_id: str) -> str:
    """`tiny-0` → `tiny-0.sock`; a long id → its start, `~` and a hash (no id has a `~`)."""
    if len(worker_id) <= _LONGEST_ID:
        return f"{worker_id}.sock"
    digest = hashlib.sha256(worker_id.encode()).hexdigest()[:12]
    return f"{worker_id[:8]}~{digest}.sock"


def fits(path: Path) -> bool:
    return len(os.fsencode(path)) <= MAX_PATH


class WorkerSocket:
    """One worker's socket path: fixed for the worker's life, its directory made on first use."""

    def __init__(self, state_dir: Path, worker_id: str) -> None:
        self.name = socket_name(worker_id)
        preferred = state_dir / RUN_DIR / self.name
        self._path: Path | None = preferred if fits(preferred) else None
        self._temp_dir: Path | None = None  # made here, so removed here

    @property
    def planned(self) -> str:
        """The path, or what it will look like before the temporary directory exists."""
        if self._path is not None:
            return str(self._path)
        return str(Path(tempfile.gettempdir()) / f"{TEMP_PREFIX}XXXXXXXX" / self.name)

    def prepare(self) -> Path:
        """The path, its directory private (0700) and no file left there by an earlier engine
        (binding fails on an existing file). OSError when the directory cannot be made;
        ValueError when even the temporary one gives too long a path."""
        if self._path is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))  # 0700 by definition
            self._path = self._temp_dir / self.name
            if not fits(self._path):
                self.remove()
                raise ValueError(f"no socket path under {MAX_PATH} bytes: TMPDIR is too long")
        private_dir(self._path.parent)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        return self._path

    def remove(self) -> None:
        """Remove the socket file and the temporary directory, if any. Any number of times."""
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = self._path = None
