"""The state directory has one owner, and only its owner may read it."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from backends.statedir import StateDirError, StateDirInUse, claim

REPO = Path(__file__).resolve().parents[2]

# Holds the claim until its stdin closes; prints "held" once it has it.
HOLDER = """\
import sys
from pathlib import Path
from backends.statedir import claim
lock = claim(Path(sys.argv[1]), "/etc/enginegate/blue.yaml")
print("held", flush=True)
sys.stdin.read()
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_second_gateway_is_refused_and_told_who_holds_it(tmp_path: Path) -> None:
    """Finding 5: a second gateway on the same state_dir ended the first one's engines.

    1. Another process claims the state directory; 2. claiming it here raises
    StateDirInUse naming that process's pid and config file; 3. once it exits, the claim
    succeeds.
    """
    state = tmp_path / "state"
    argv = [sys.executable, "-c", HOLDER, str(state)]
    pipes = subprocess.PIPE
    with subprocess.Popen(argv, cwd=REPO, stdin=pipes, stdout=pipes, text=True) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            with pytest.raises(StateDirInUse) as refused:
                claim(state, "/etc/enginegate/green.yaml")
            assert str(refused.value) == (
                f"state_dir {state} is in use by another gateway "
                f"(pid {holder.pid}, config /etc/enginegate/blue.yaml)"
            )
        finally:
            holder.kill()
    with claim(state, "/etc/enginegate/green.yaml") as lock:
        assert f'"pid": {os.getpid()}' in lock.path.read_text()


def test_the_claim_is_per_process_lifetime_not_per_call(tmp_path: Path) -> None:
    """Finding 5: the lock is held until released, even against this same process."""
    lock = claim(tmp_path / "state", "a.yaml")
    with pytest.raises(StateDirInUse, match=rf"pid {os.getpid()}, config a.yaml"):
        claim(tmp_path / "state", "b.yaml")
    lock.release()
    claim(tmp_path / "state", "b.yaml").release()


def test_the_state_dir_and_its_lock_are_private(tmp_path: Path) -> None:
    """Finding 14: state_dir was created 0755 (under umask 022) and left so.

    1. An existing world-readable state_dir is made 0700; 2. a new one is created 0700;
    3. the lock file is 0600.
    """
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    old_umask = os.umask(0o022)
    try:
        with claim(existing, "a.yaml") as lock:
            assert (mode(existing), mode(lock.path)) == (0o700, 0o600)
        with claim(tmp_path / "new" / "state", "a.yaml"):
            assert mode(tmp_path / "new" / "state") == 0o700
    finally:
        os.umask(old_umask)


def test_a_shared_directory_is_refused(tmp_path: Path) -> None:
    """A directory like /tmp (sticky bit) would be chmodded 0700 under every user's feet."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(StateDirError, match="shared directory"):
        claim(shared, "a.yaml")
    assert mode(shared) == 0o1777
