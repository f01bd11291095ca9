"""Workers on a Ray cluster (`cluster: {ray: ADDRESS}`): one placement group per replica, one
actor per rank (backends/ray_worker.py), and all ranks of a replica one gang.

The gateway joins the cluster as its driver (`connect`), so every actor it creates is owned
by the gateway process: when that process ends, however it ends, Ray ends the actors, and each
rank's guard, seeing its actor die, kills its engine (backends/guard.py).

A start (`start_gang`, once per start of a worker):
1. a placement group of one bundle per node the replica spans (`cluster.need`): PACK for a
   single-node replica, STRICT_SPREAD for `nodes: N`; Ray picks the nodes, bundle 0 is rank 0;
2. the HTTP port (and the rendezvous and side ports) are found free on rank 0's node, anew at
   every start (a dead engine's ports may linger);
3. the adapter's argv, bound to rank 0's node address (never 0.0.0.0; the worker key kept),
   plus each engine's multi-node flags (backends/multinode.py), one actor per rank in its bundle.

A gang has ended when any rank has: its engine exited, or its actor or node is gone (the call
to it fails). The supervisor then stops every rank and starts the whole replica again, with
its backoff: a surviving rank of a broken multi-node engine may hang or keep answering
`/health` (vllm #16259, #53157; ../shared/reviews/multinode-2026-12.md §1.0). For the same
reason a worker here is ready, and stays ready, only while a one-token generation through
rank 0 passes, not on `/health` alone.
"""

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from backends.adapters import ADAPTERS
from backends.base import Launch, Slot, worker_secret
from backends.cluster import ClusterSpec, need
from backends.multinode import node_flags
from backends.probe import OK, Probe, probe
from backends.supervisor import LAST_ERROR_LINES, NoRoom, Outcome, Worker

log = logging.getLogger("enginegate.ray")

POLL_SECONDS = 1.0
CALL_TIMEOUT = 30.0  # one call to an actor; no answer in this long: its node is taken for gone
GENERATION_TIMEOUT = 60.0  # a one-token generation on a CPU engine busy with other requests
LOG_TIMEOUT = 5.0  # reading a rank's log on its node
KEPT_LOG_LINES = 200  # of each rank's log, kept when its gang ends


def connect(cluster: ClusterSpec) -> None:
    """Join the cluster as its driver (ray.init); backends/ray_nodes.py says why node_ip."""
    import ray

    options: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
    if cluster.node_ip:
        options["_node_ip_address"] = cluster.node_ip
    ray.init(address=cluster.ray, **options)


def disconnect() -> None:
    import ray

    ray.shutdown()


def worker_type(cluster: ClusterSpec) -> Callable[..., Worker]:
    """For Supervisor(worker_type=...): engines on the cluster, external models as ever."""

    def make(slot: Slot, *args: Any) -> Worker:
        if not slot.model.runs_here:
            return Worker(slot, *args)
        return RayWorker(slot, *args, cluster=cluster)

    return make


class RayWorker(Worker):
    """A Worker whose engine is a Gang on the cluster; supervision is the Worker's own."""

    def __init__(self, *args: Any, cluster: ClusterSpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cluster = cluster
        self._last_logs: dict[int, list[str]] = {}  # each rank's log when its gang ended

    async def log_lines(self, lines: int, rank: int = 0) -> list[str]:
        """Rank `rank`'s log, read on its node by its actor while the gang runs; once it has
        ended, the lines each rank's log had then (the actors, and with them the way to the
        node's files, are gone)."""
        ranks = self.slot.model.nodes
        if not 0 <= rank < ranks:
            raise LookupError(f"worker `{self.id}` has ranks 0 to {ranks - 1}")
        gang = self.process
        if not isinstance(gang, Gang):
            return self._last_logs.get(rank, [])[-lines:]
        try:
            return await asyncio.to_thread(gang.log_tail, rank, lines)
        except Exception as exc:  # its actor or node is gone
            return [f"rank {rank}'s log could not be read on its node: {exc!r}"]

    @property
    def rank_pids(self) -> tuple[int, ...]:
        """Each rank's guard pid, on its own node (rank 0 first); () when none runs."""
        return self.process.rank_pids if isinstance(self.process, Gang) else ()

    async def _spawn(self) -> None:
        secret = worker_secret()
        grace = self._timings.stop_grace
        self.launch, self.process = await start_gang(
            self.slot, secret, self._cluster, self.log_path, grace
        )

    async def _end_process(self, why: Outcome) -> None:
        gang = self.process
        if isinstance(gang, Gang):
            self._last_logs = await asyncio.to_thread(gang.log_tails, KEPT_LOG_LINES)
        await super()._end_process(why)
        if isinstance(gang, Gang) and gang.reason:  # which rank ended it, before rank 0's log
            self.last_error = [gang.reason, *self.last_error][-LAST_ERROR_LINES:]

    async def _probe(self, full: bool) -> Probe:
        """`/health` and `/models` through rank 0, then one generated token. Before the key is
        sent, rank 0's actor checks on its node that the port is its engine's."""
        assert self.launch is not None
        timeout = max(self._timings.health_timeout, self.launch.health_timeout or 0)
        gang = self.process
        owner = None
        if isinstance(gang, Gang):
            url = httpx.URL(self.launch.base_url)
            owner = partial(gang.owns_port, url.host, url.port or 80)
        answer = await probe(self.client, self.launch, owner, timeout, full=True)
        if not answer.ok:
            return answer
        return await generate_one_token(self.client, self.launch, timeout)


async def generate_one_token(client: httpx.AsyncClient, launch: Launch, timeout: float) -> Probe:
    url = f"{launch.base_url}/completions"
    body = {"model": launch.served_name, "prompt": "ping", "max_tokens": 1}
    headers = {"Authorization": f"Bearer {launch.api_key}"} if launch.api_key else {}
    try:
        resp = await client.post(url, json=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        return Probe("down", f"POST {url}: no token within {timeout:g} s")
    except httpx.TransportError as exc:
        return Probe("down", f"POST {url}: {type(exc).__name__} {exc}".rstrip())
    if resp.status_code != 200:
        return Probe("down", f"POST {url} answered {resp.status_code} {resp.text[:200]!r}")
    return OK


@dataclass(frozen=True)
class Rank:
    address: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path


class Gang:
    """One replica's ranks, seen by the supervisor as one engine (backends.process.Engine):
    it has ended as soon as any rank has, and stop() ends every rank."""

    def __init__(
        self, worker_id: str, group: Any, actors: list[Any], rank_pids: tuple[int, ...]
    ) -> None:
        self.worker_id = worker_id
        self.pid = rank_pids[0]  # rank 0's guard, on its node
        self.rank_pids = rank_pids
        self.reason = ""  # which rank ended and how, once one has
        self._group = group
        self._actors = actors
        self._returncode: int | None = None
        self._ended = asyncio.Event()
        self._watcher = asyncio.create_task(self._watch(), name=f"gang {worker_id}")

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int:
        await self._ended.wait()
        assert self._returncode is not None
        return self._returncode

    def pids(self) -> list[int]:
        return list(self.rank_pids)

    async def owns_port(self, address: str, port: int) -> bool:
        """Whether rank 0's engine listens on address:port, checked on its node."""
        import ray

        ref = self._actors[0].owns_port.remote(address, port)
        return bool(await asyncio.to_thread(ray.get, ref, timeout=CALL_TIMEOUT))

    def log_tail(self, rank: int, lines: int) -> list[str]:
        """The last `lines` of rank `rank`'s log, read on its node (blocking)."""
        import ray

        text = ray.get(self._actors[rank].log_tail.remote(lines), timeout=LOG_TIMEOUT)
        return str(text).splitlines()

    def log_tails(self, lines: int) -> dict[int, list[str]]:
        """Every rank's log tail that can still be read (blocking)."""
        tails = {}
        for rank in range(len(self._actors)):
            try:
                tails[rank] = self.log_tail(rank, lines)
            except Exception as exc:  # its actor or node is gone
                tails[rank] = [f"rank {rank}'s log could not be read on its node: {exc!r}"]
        return tails

    async def stop(self, grace: float) -> int:
        """SIGTERM to every rank at once (its guard SIGKILLs past `grace`), then the actors
        and the placement group go."""
        self._watcher.cancel()
        await asyncio.to_thread(self._stop_ranks, grace)
        return self._returncode if self._returncode is not None else 0

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception as exc:  # gone already, or its node
                log.info("gang %s: ray.kill: %r", self.worker_id, exc)
        try:
            remove_placement_group(self._group)
        except Exception as exc:
            log.warning("gang %s: placement group not removed: %r", self.worker_id, exc)

    def _stop_ranks(self, grace: float) -> None:
        import ray

        refs = [actor.stop.remote() for actor in self._actors]
        try:
            ray.get(refs, timeout=grace + CALL_TIMEOUT)
        except Exception as exc:  # a dead actor or node: ray.kill below ends what is left
            log.info("gang %s: stop: %r", self.worker_id, exc)
        self.kill()

    async def _watch(self) -> None:
        while self._returncode is None:
            ended = await asyncio.to_thread(self._first_ended)
            if ended is not None:
                self._returncode, self.reason = ended
                log.warning("worker %s: %s; the whole gang restarts", self.worker_id, self.reason)
                self._ended.set()
                return
            await asyncio.sleep(POLL_SECONDS)

    def _first_ended(self) -> tuple[int, str] | None:
        """(status, why) of the first rank found ended, or None while all run."""
        import ray

        refs = [actor.poll.remote() for actor in self._actors]
        for rank, ref in enumerate(refs):
            try:
                code = ray.get(ref, timeout=CALL_TIMEOUT)
            except ray.exceptions.GetTimeoutError:
                return -1, f"rank {rank}'s actor did not answer in {CALL_TIMEOUT:g} s"
            except ray.exceptions.RayError as exc:
                return -1, f"rank {rank}'s actor or its node is gone ({type(exc).__name__})"
            if code is not None:
                return int(code), f"rank {rank}'s engine exited with status {code}"
        return None


async def start_gang(
    slot: Slot, secret: str, cluster: ClusterSpec, log_path: Path, grace: float
) -> tuple[Launch, Gang]:
    """Place the replica, start every rank; (how to reach rank 0, the gang)."""
    launch, group, actors, pids = await asyncio.to_thread(
        _start_sync, slot, secret, cluster, log_path, grace
    )
    return launch, Gang(slot.worker_id, group, actors, pids)


def _start_sync(
    slot: Slot, secret: str, cluster: ClusterSpec, log_path: Path, grace: float
) -> tuple[Launch, Any, list[Any], tuple[int, ...]]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    spec = slot.model
    gpus, cpus = need(spec)
    bundle = {"GPU": float(gpus)} if gpus else {"CPU": float(cpus)}
    strategy = "PACK" if spec.nodes == 1 else "STRICT_SPREAD"
    group = placement_group([bundle] * spec.nodes, strategy=strategy)
    actors: list[Any] = []
    try:
        if not group.wait(cluster.start_timeout):
            raise NoRoom(
                f"placement group of {slot.worker_id} ({spec.nodes} x {bundle}, {strategy}) "
                f"not placed in {cluster.start_timeout:g} s: the cluster lacks the nodes or "
                "resources (enginegate plan shows them)"
            )
        addresses = _bundle_addresses(group)
        adapter = ADAPTERS[spec.backend]
        count = 2 + adapter.side_ports(spec)  # HTTP, rendezvous, the engine's side ports
        find_ports = _on_bundle(ray.remote(num_cpus=0)(free_ports), group, 0)
        ports = ray.get(find_ports.remote(count), timeout=CALL_TIMEOUT)
        launch = adapter.launch(slot, ports[0], secret, tuple(ports[2:]), host=addresses[0])
        launch = replace(launch, health_timeout=max(launch.health_timeout or 0, GENERATION_TIMEOUT))
        ranks = plan_ranks(slot, launch, addresses, ports[1], cluster, log_path)
        host_class = _host_class()
        for index, rank in enumerate(ranks):
            options = _on_bundle(host_class, group, index, num_gpus=gpus)
            actors.append(options.remote(rank.argv, rank.env, str(rank.log_path), grace))
        pids = tuple(ray.get([actor.pid.remote() for actor in actors], timeout=CALL_TIMEOUT))
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)
        raise
    log.info(
        "worker %s: %d ranks on %s, HTTP on %s",
        slot.worker_id, len(ranks), ", ".join(addresses), launch.base_url,
    )  # fmt: skip
    return launch, group, actors, pids


def plan_ranks(
    slot: Slot,
    launch: Launch,
    addresses: list[str],
    rendezvous_port: int,
    cluster: ClusterSpec,
    log_path: Path,
) -> list[Rank]:
    """Each rank's argv and env: the adapter's, the multi-node flags, the node's settings.

    Env: the launch's (the worker key included) on top of the node's own environment; no
    CUDA_VISIBLE_DEVICES (Ray sets it for the actor's GPUs on its node); VLLM_HOST_IP the
    node's cluster address, for vLLM's side channels; then `cluster.node_env` of that node.
    A CPU rank binds its share of the slot's cores unless the node's env says otherwise.
    """
    spec = slot.model
    per_node = spec.ranks_per_node
    ranks = []
    for index, address in enumerate(addresses):
        argv = list(launch.argv)
        if spec.nodes > 1:
            argv += node_flags(spec, str(index), addresses[0], rendezvous_port)
        env = {k: v for k, v in launch.env.items() if k != "CUDA_VISIBLE_DEVICES"}
        if spec.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
            cores = slot.cpu_ranks[index * per_node : (index + 1) * per_node]
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(cores) or "auto"
        if spec.backend == "vllm":
            env["VLLM_HOST_IP"] = address
        env.update(cluster.node_env.get(address, {}))
        path = log_path if index == 0 else log_path.with_name(f"{slot.worker_id}.rank{index}.log")
        ranks.append(Rank(address, argv, env, path))
    return ranks


def free_ports(count: int) -> list[int]:
    """Run on a node (a Ray task): `count` TCP ports free on its cluster address now."""
    import ray

    host = ray.util.get_node_ip_address()
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _bundle_addresses(group: Any) -> list[str]:
    """The cluster address of the node each bundle was placed on, bundle 0 first."""
    import ray
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(group)
    address = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    placed = table["bundles_to_node_id"]
    return [str(address[placed[index]]) for index in range(len(table["bundles"]))]


def _on_bundle(remote: Any, group: Any, index: int, **resources: Any) -> Any:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
    return remote.options(scheduling_strategy=strategy, **resources)


def _host_class() -> Any:
    from backends.ray_worker import remote_class

    return remote_class()
