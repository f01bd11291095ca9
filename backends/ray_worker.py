"""One rank's engine, started on its Ray node by an actor, under the guard (backends/guard.py).

The actor is the guard's parent: if the actor dies (its node leaves, the gateway's driver
exits and Ray ends its actors, or `ray.kill`), the guard gets its parent-death signal and
kills the engine's tree, as it does when the gateway dies on one host. The actor holds the
rank's GPUs as Ray resources, so Ray sets CUDA_VISIBLE_DEVICES for it and the guard and
engine inherit it. enginegate must be installed on every node (the actor runs
`python -m backends.guard` with the node's own interpreter).

`serve` drives it through backends/ray_launch.py: one actor per rank of a replica.
"""

import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from backends.base import UNSAFE_ENV
from backends.probe import listens_on
from backends.process import tree_pids

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
                env={**_node_env(), **env},
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

    def owns_port(self, address: str, port: int) -> bool:
        """Whether a process of this engine's tree listens on address:port, asked on the node
        the engine runs on: the gateway, elsewhere, cannot see whose socket that is, and the
        port is in the engine's argv for any user of this node to bind first."""
        return listens_on(tree_pids(self.proc.pid), port, address)

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


def _node_env() -> dict[str, str]:
    """The node's environment as the actor has it, less what would tie the engine to Ray's
    own ports and cluster (a Ray worker has RAY_ADDRESS set) or to another engine's."""
    return {key: value for key, value in os.environ.items() if key not in UNSAFE_ENV}


# Ray's worker SIGKILLs its direct children when it exits (`kill_child_processes_on_worker_exit`,
# on by default), as when its owner, the gateway, dies: the guard would die before it could end
# the engine's tree, and what the engine forked (vLLM's resource trackers) would live on. With
# it off for the actor's own process, the guard sees its parent die and ends the tree itself.
ACTOR_ENV = {"RAY_kill_child_processes_on_worker_exit": "false"}


def remote_class() -> Any:
    """EngineHost as a Ray actor class. No CPU is reserved for it: it only waits."""
    import ray

    runtime_env = {"env_vars": ACTOR_ENV}
    return ray.remote(num_cpus=0, runtime_env=runtime_env)(EngineHost)
