"""Is a worker up, and is what answers on its port the engine we started?

A probe asks the health URL (no key), then, for `full`, whether `/models` lists the served
name (with the worker key). It never raises: a refused connection, a timeout or a body that is
not what `/models` returns all mean "down", with the cause said. 401, 403 or 404 from the
engine itself means "refused": a probe that can never pass. (SGLang 0.5.17 has no `/ready` and
answered it 401 behind its key, through 75 minutes of restarts with nothing logged:
../shared/reviews/gpu-sglang-2026-12.md.)

Who answers matters. A port is free when the supervisor hands it out, but the engine binds it
seconds (vLLM) or minutes (SGLang, after loading the model) later, and the port is in the
engine's argv for any local user to read in `ps`: whoever binds it first gets the connections.
So for an engine we started, the socket listening on the port must belong to a process of its
tree (the kernel's /proc/<pid>/fd of our own children) before the key is ever sent. For rank 0
of a worker on a Ray cluster, on another host, its actor makes that check on its node
(backends/ray_worker.py `owns_port`); `probe` only takes the answer.

An engine on a Unix socket (`port` None, the client connects through the socket) needs no such
check: its directory is 0700 and the gateway's (backends/sockets.py), so no other user can
bind there first, and the supervisor removed any file left in it before the engine started.
"""

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import httpx
import psutil

from backends.base import Launch
from backends.process import Engine

# "port taken": something answered on the port, and it is not the engine.
# "refused": the engine answered 401, 403 or 404 where it should answer 200: a route it does not
# serve or a key it does not take. Waiting does not change that, so a start ends at once.
Verdict = Literal["ok", "down", "port taken", "refused"]
_REFUSALS = frozenset({401, 403, 404})

# Whether what listens on a worker's TCP port is its engine: asked before the key is sent.
OwnsPort = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class Probe:
    verdict: Verdict
    cause: str = ""  # why it is not "ok", for the log: the URL and what came back

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


OK = Probe("ok")


async def probe(
    client: httpx.AsyncClient,
    launch: Launch,
    owns_port: OwnsPort | None,
    timeout: float,
    full: bool,
) -> Probe:
    """One probe of a worker; `owns_port` is None for a server someone else runs and for an
    engine on a Unix socket (`client` goes through it)."""
    url = launch.health_url or f"{launch.base_url}/models"
    try:
        health = None
        if launch.health_url:
            health = await client.get(url, timeout=timeout)
        if owns_port is not None and not await owns_port():
            if health is None:  # with no health URL, maybe nobody listens yet
                where = httpx.URL(launch.base_url).netloc.decode()
                return Probe("down", f"nothing of the engine listens on {where}")
            return Probe("port taken", f"GET {url} was answered by a process not the engine's")
        if health is not None and health.status_code != 200:
            return _answered(url, health)
        if not full:
            return OK
        url = f"{launch.base_url}/models"
        headers = {"Authorization": f"Bearer {launch.api_key}"} if launch.api_key else {}
        resp = await client.get(url, headers=headers, timeout=timeout)
        if resp.status_code != 200:
            return _answered(url, resp)
        if not launch.has_process:
            return OK  # an external server may list many names or none
        listed = [m["id"] for m in resp.json()["data"]]
        if launch.served_name in listed:
            return OK
        return Probe("down", f"GET {url} lists {listed}, not {launch.served_name!r}")
    except httpx.TimeoutException:
        return Probe("down", f"GET {url}: no answer within {timeout:g} s")
    except httpx.TransportError as exc:
        return Probe("down", f"GET {url}: {type(exc).__name__} {exc}".rstrip())
    except Exception as exc:  # a body that is not what /models returns, ...
        return Probe("down", f"GET {url}: {type(exc).__name__}: {exc}")


def _answered(url: str, resp: httpx.Response) -> Probe:
    verdict: Verdict = "refused" if resp.status_code in _REFUSALS else "down"
    return Probe(verdict, f"GET {url} answered {resp.status_code} {resp.text[:200]!r}")


def local_owner(engine: Engine | None, port: int | None) -> OwnsPort | None:
    """The check for an engine of ours on a TCP port of this host: a socket of its tree."""
    if engine is None or port is None:
        return None

    async def owns_port() -> bool:
        return listens_on(engine.pids(), port)

    return owns_port


def listens_on(pids: Iterable[int], port: int, address: str = "127.0.0.1") -> bool:
    """Whether one of `pids` has a TCP socket listening on `port` that takes connections to
    `address`: bound to it, or to every address. Another user cannot hold address:port beside
    such a socket: the second bind fails (SO_REUSEPORT needs the same uid)."""
    takes = {address, f"::ffff:{address}", "0.0.0.0", "::", "::ffff:0.0.0.0"}
    for pid in pids:
        try:
            listening = _listening(psutil.Process(pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(p == port and ip in takes for ip, p in listening):
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
