"""Runs one engine and makes sure its whole process tree dies with it, or with the gateway.

    python -m backends.guard --parent PID --grace SECONDS -- ENGINE ARGV...

Why a separate process: when vLLM's API server is SIGKILLed, its EngineCore and TP workers
live on and keep the GPUs (vllm-project/vllm#55510), and when the gateway itself is SIGKILLed
nobody is left to clean up. The guard is small and always there:

- it asks the kernel for a signal when the gateway dies (PR_SET_PDEATHSIG) and then kills the
  engine tree at once;
- it is a child subreaper (PR_SET_CHILD_SUBREAPER), so engine processes orphaned by a crash are
  re-parented to it and stay findable as its descendants, even if they left the process group;
- on SIGTERM it passes SIGTERM to the tree, waits up to the grace period, then SIGKILLs;
- when the engine's main process exits, anything it left behind is ended too, and the guard
  exits with the engine's status, so the supervisor sees one process per worker;
- the engine's main process gets SIGKILL from the kernel if the guard itself dies (the OOM
  killer, a stray `kill -9`), so it cannot outlive the one process that would end it. Its own
  children stay in the guard's process group, where the gateway still finds them.
"""

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_SECONDS = 0.1
LEFTOVER_GRACE_SECONDS = 5.0


class Guard:
    def __init__(
        self, argv: list[str], grace: float, preexec: Callable[[], None] | None = None
    ) -> None:
        self.argv = argv
        self.grace = grace
        self.preexec = preexec
        self.should_stop = False
        self.is_orphaned = False
        self.returncode: int | None = None

    def handle_sigterm(self, signum: int, frame: object) -> None:
        self.should_stop = True

    def handle_parent_death(self, signum: int, frame: object) -> None:
        self.is_orphaned = True

    def run(self) -> int:
        engine = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, preexec_fn=self.preexec)
        stop_deadline: float | None = None
        while self.returncode is None:
            self._reap(engine.pid)
            if self.is_orphaned:
                _signal_tree(signal.SIGKILL)
            elif self.should_stop and stop_deadline is None:
                _signal_tree(signal.SIGTERM)
                stop_deadline = time.monotonic() + self.grace
            elif stop_deadline is not None and time.monotonic() > stop_deadline:
                _signal_tree(signal.SIGKILL)
            time.sleep(POLL_SECONDS)
        self._end_leftovers(stop_deadline)
        return self.returncode

    def _reap(self, engine_pid: int) -> None:
        """Collect every exited child (orphans are ours too); note the engine's status."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == engine_pid:
                code = os.waitstatus_to_exitcode(status)
                self.returncode = code if code >= 0 else 128 - code  # shell convention

    def _end_leftovers(self, stop_deadline: float | None) -> None:
        """End what the engine left behind; during a stop, only the stop's grace is left."""
        if not psutil.Process().children(recursive=True):
            return
        _signal_tree(signal.SIGKILL if self.is_orphaned else signal.SIGTERM)
        if stop_deadline is not None:
            deadline = stop_deadline
        else:
            deadline = time.monotonic() + LEFTOVER_GRACE_SECONDS
        while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
            self._reap(-1)
            time.sleep(POLL_SECONDS)
        _signal_tree(signal.SIGKILL)
        time.sleep(POLL_SECONDS)
        self._reap(-1)


def _signal_tree(signum: int) -> None:
    for child in psutil.Process().children(recursive=True):
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def die_with(parent: int, libc: ctypes.CDLL) -> Callable[[], None]:
    """What the engine runs between fork and exec: SIGKILL for it when `parent` dies."""

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before prctl: no signal will ever come
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def main() -> None:
    parser = argparse.ArgumentParser(description="run an engine; end its tree with it")
    parser.add_argument("--parent", type=int, required=True, help="pid of the gateway")
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        parser.error("no engine command after --")

    libc = ctypes.CDLL(None, use_errno=True)
    guard = Guard(argv, args.grace, die_with(os.getpid(), libc))
    signal.signal(signal.SIGTERM, guard.handle_sigterm)
    signal.signal(signal.SIGINT, guard.handle_sigterm)
    signal.signal(signal.SIGUSR1, guard.handle_parent_death)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    # The gateway may have died between fork and prctl: then no signal will ever come.
    if os.getppid() != args.parent:
        sys.exit("guard: the gateway is already gone; not starting the engine")
    sys.exit(guard.run())


if __name__ == "__main__":
    main()
