"""Is a worker up, and is what answers on its port the engine we started?

A probe asks the health URL (no key), then, for `full`, whether `/models` lists the served
name (with the worker key). It never raises: a refused connection, a timeout or a body that is
not what `/models` returns all mean "down".

Who answers matters. A port is free when the supervisor hands it out, but the engine binds it
seconds (vLLM) or minutes (SGLang, after loading the model) later, and the port is in the
engine's argv for any local user to read in `ps`: whoever binds it first gets the connections.
So for an engine we started, the socket listening on the port must belong to a process of its
tree (the kernel's /proc/<pid>/fd of our own children) before the key is ever sent.

An engine on a Unix socket (`port` None, the client connects through the socket) needs no such
check: its directory is 0700 and the gateway's (backends/sockets.py), so no other user can
bind there first, and the supervisor removed any file left in it before the engine started.
"""

from collections.abc import Iterable
from typing import Literal

import httpx
import psutil

from backends.base import Launch
from backends.process import EngineProcess

# "port taken": something answered on the port, and it is not the engine.
Probe = Literal["ok", "down", "port taken"]

# Listening addresses that take connections to 127.0.0.1:port. Another user cannot hold
# 127.0.0.1:port beside one of these: the second bind fails (SO_REUSEPORT needs the same uid).
_TAKES_LOOPBACK = frozenset({"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0"})


async def probe(
    client: httpx.AsyncClient,
    launch: Launch,
    engine: EngineProcess | None,
    port: int | None,
    timeout: float,
    full: bool,
) -> Probe:
    """One probe of a worker; `engine` and `port` are None for a server someone else runs,
    `port` alone for an engine on a Unix socket (`client` goes through it)."""
    try:
        health = None
        if launch.health_url:
            health = await client.get(launch.health_url, timeout=timeout)
        if engine is not None and port is not None and not listens_on(engine.pids(), port):
            # Someone answered (or, with no health URL, maybe nobody listens yet).
            return "port taken" if health is not None else "down"
        if health is not None and health.status_code != 200:
            return "down"
        if not full:
            return "ok"
        headers = {"Authorization": f"Bearer {launch.api_key}"} if launch.api_key else {}
        resp = await client.get(f"{launch.base_url}/models", headers=headers, timeout=timeout)
        if resp.status_code != 200:
            return "down"
        if not launch.has_process:
            return "ok"  # an external server may list many names or none
        listed = resp.json()["data"]
        return "ok" if any(m["id"] == launch.served_name for m in listed) else "down"
    except Exception:
        return "down"


def listens_on(pids: Iterable[int], port: int) -> bool:
    """Whether one of `pids` has a TCP socket listening on `port` for 127.0.0.1."""
    for pid in pids:
        try:
            listening = _listening(psutil.Process(pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(p == port and ip in _TAKES_LOOPBACK for ip, p in listening):
            return True
    return False


def _listening(proc: psutil.Process) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket `proc` listens on."""
    # psutil 6.0 renamed Process.connections to net_connections; pyproject allows >= 5.9.
    if hasattr(proc, "net_connections"):
        sockets = proc.net_connections(kind="tcp")
    else:
        sockets = proc.connections(kind="tcp")
    return {
        (s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN and s.laddr
    }
