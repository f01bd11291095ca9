"""One rank's engine, started on its Ray node by an actor, under the guard (backends/guard.py).

The actor is the guard's parent: if the actor dies (its node leaves, the gateway's driver
exits and Ray ends its actors, or `ray.kill`), the guard gets its parent-death signal and
kills the engine's tree, as it does when the gateway dies on one host. The actor holds the
rank's GPUs as Ray resources, so Ray sets CUDA_VISIBLE_DEVICES for it and the guard and
engine inherit it. enginegate must be installed on every node (the actor runs
`python -m backends.guard` with the node's own interpreter).

Not wired into `serve` yet: this is the piece the supervisor will drive.
"""

import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

GUARD = ("-m", "backends.guard")


class EngineHost:
    """The actor's body (wrapped with ray.remote by `remote_class`): one guarded engine."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: str, grace: float):
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.grace = grace
        guard = [sys.executable, *GUARD, "--parent", str(os.getpid()), "--grace", str(grace)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*guard, "--", *argv],
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        """The guard's exit status (the engine's), or None while it runs."""
        return self.proc.poll()

    def stop(self) -> int:
        """SIGTERM to the guard (it passes it on and kills after the grace), then wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(self.grace + 5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def log_tail(self, lines: int = 50) -> str:
        try:
            with self.log_path.open(errors="replace") as log:
                return "".join(deque(log, maxlen=lines))
        except FileNotFoundError:
            return ""


def remote_class() -> Any:
    """EngineHost as a Ray actor class. No CPU is reserved for it: it only waits."""
    import ray

    return ray.remote(num_cpus=0)(EngineHost)
