"""Another local user connecting to an engine: what a worker's private directory must refuse.

`connect_as_nobody(path)` runs a python as `nobody` (uid and gid 65534, no other groups) that
connects to the Unix socket `path`, and says how that went: "connected", or the OSError's
name ("PermissionError" when a directory on the way is closed to it). Only root can switch
user, so it skips the test otherwise; it also skips when no python is open to that user (a
pyenv python under /root is not).
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

NOBODY = 65534
CONNECT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


def connect_as_nobody(path: str | Path) -> str:
    if os.geteuid() != 0:
        pytest.skip("only root can act as another local user")
    python = _python_for_anyone()
    done = subprocess.run(
        [python, "-c", CONNECT, str(path)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _python_for_anyone() -> str:
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        if _open_to_others(Path(candidate)):
            return candidate
    pytest.skip("no python that another user may run")


def _open_to_others(path: Path) -> bool:
    """Whether every directory above `path` and `path` itself let others in (o+x)."""
    try:
        return all(p.stat().st_mode & stat.S_IXOTH for p in [path.resolve(), *path.parents])
    except OSError:
        return False
