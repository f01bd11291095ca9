"""`enginegate serve` with `cluster: {ray: ...}`: workers placed on a real two-node Ray cluster
(tests/fakes/ray_cluster.py: head 127.0.0.2, second node 127.0.0.3, GPUs as Ray resources
only), each rank started by an actor under the guard, the ranks of a replica one gang.

The engine is the scripted one (tests/fakes/engine.py: `--headless` serves nothing, as vLLM's
follower rank); tests/e2e/test_ray_serve.py runs the same with vLLM CPU over two nodes. One
cluster and one gateway for the module, in the order the tests are written.
"""

import json
import os
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from fakes.gateway_process import GatewayProcess, flag
from fakes.ray_cluster import (
    HEAD_IP,
    SECOND_IP,
    RayCluster,
    leftovers,
    ray_cluster,
    second_node_again,
)

FAKE_ENGINE = str(Path(__file__).parents[1] / "fakes" / "engine.py")
API_KEY = f"sk-int-{secrets.token_hex(8)}"
ADMIN_KEY = f"sk-int-admin-{secrets.token_hex(8)}"
SUFFIX = secrets.token_hex(3)  # other engineers' tests may run fake engines on this host too
BIG, SMALL, PAIR = f"big-{SUFFIX}", f"small-{SUFFIX}", f"pair-{SUFFIX}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """5 GPUs a node: `pair`'s two replicas (3 GPUs each) never fit on one node, and whatever
    order Ray places the gateway's replicas in, all fit (`big` 1 + 1, `small` 1)."""
    with ray_cluster(head_gpus=5, second_gpus=5) as running:
        yield running
    assert leftovers(running.logs) == []


def fake_model(name: str, **fields: object) -> dict[str, object]:
    return {
        "name": name,
        "backend": "vllm",
        "model": "/m",
        "command": [sys.executable, FAKE_ENGINE],
        "startup_timeout": 60,
        **fields,
    }


# An engine that forks a child of its own and leaves it in its process group, as vLLM's
# resource trackers: it must end with the rest, whoever dies first.
FORKING = ["sh", "-c", 'sleep 86400 & exec "$0" "$@"', sys.executable, FAKE_ENGINE]


@pytest.fixture(scope="module")
def gateway(
    cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """`big`: tp=2 over both nodes (one GPU each); `small`: tp=1, wherever Ray puts it;
    `pair`: tp=3, two single-node replicas, one on each node as neither holds 6 GPUs."""
    models = [fake_model(BIG, tp=2, nodes=2, command=FORKING), fake_model(SMALL)]
    models.append(fake_model(PAIR, tp=3, replicas=2))
    gw = GatewayProcess(
        tmp_path_factory.mktemp("ray-gateway"),
        models,
        api_key=API_KEY,
        admin_key=ADMIN_KEY,
        stop_grace=5,
    )
    gw.config["cluster"] = {"ray": cluster.address, "node_ip": cluster.node_ip}
    gw.config_path.write_text(yaml.safe_dump(gw.config, sort_keys=False))
    gw.start()
    try:
        gw.wait_ready(timeout=180)  # /ready: one replica of each model
        deadline = time.monotonic() + 120
        while {w["state"] for w in gw.workers()} != {"ready"} and time.monotonic() < deadline:
            time.sleep(0.5)
        assert {w["id"]: w["state"] for w in gw.workers()} == dict.fromkeys(
            [f"{BIG}-0", f"{SMALL}-0", f"{PAIR}-0", f"{PAIR}-1"], "ready"
        )
        yield gw
    finally:
        gw.stop()


def guards(name: str) -> dict[int, psutil.Process]:
    """node rank -> the guard running that rank of model `name` (of one replica)."""
    found = {}
    for proc in guards_of(name):
        argv = proc.cmdline()
        rank = argv[argv.index("--node-rank") + 1] if "--node-rank" in argv else "0"
        found[int(rank)] = proc
    return found


def guards_of(name: str) -> list[psutil.Process]:
    """Every guard running a rank of model `name`, found on this host."""
    found = []
    for proc in psutil.process_iter():
        try:
            argv = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "backends.guard" in argv and name in argv:
            found.append(proc)
    return found


def tree(guard: psutil.Process) -> set[int]:
    return {guard.pid, *(child.pid for child in guard.children(recursive=True))}


def complete(gw: GatewayProcess, model: str) -> httpx.Response:
    with httpx.Client(timeout=30, trust_env=False) as client:
        return client.post(
            f"{gw.url}/v1/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"model": model, "prompt": "hi", "max_tokens": 1},
        )


def gone(pids: set[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_a_two_node_replica_runs_one_rank_per_node_and_serves_through_rank_0(
    gateway: GatewayProcess,
) -> None:
    """1. Two ranks of `big`, on the two nodes: rank 0 serves HTTP on its node's address with
    the worker key (a request without it is refused), rank 1 is headless.
    2. The gateway routes to rank 0; `small` runs too."""
    ranks = guards(BIG)
    assert sorted(ranks) == [0, 1]
    head_argv, follower_argv = ranks[0].cmdline(), ranks[1].cmdline()
    host = head_argv[head_argv.index("--host") + 1]
    port = head_argv[head_argv.index("--port") + 1]
    master = head_argv[head_argv.index("--master-addr") + 1]
    assert host == master
    assert host in (HEAD_IP, SECOND_IP)
    assert "--headless" in follower_argv and "--headless" not in head_argv
    (head_engine,) = ranks[0].children()
    (follower_engine,) = ranks[1].children()
    assert head_engine.environ()["VLLM_HOST_IP"] == host
    assert follower_engine.environ()["VLLM_HOST_IP"] == ({HEAD_IP, SECOND_IP} - {host}).pop()
    no_key = httpx.get(f"http://{host}:{port}/v1/models", timeout=5)
    assert no_key.status_code == 401
    worker = gateway.worker(f"{BIG}-0")
    assert worker["state"] == "ready"
    assert worker["url"] == f"http://{host}:{port}/v1"
    assert complete(gateway, BIG).status_code == 200
    assert complete(gateway, SMALL).status_code == 200
    # Each rank's log, read on its node by its actor, through the admin API.
    logs = {rank: rank_log(gateway, f"{BIG}-0", rank) for rank in (0, 1, 2)}
    assert logs[0].status_code == 200 and f"fake engine {BIG} on" in logs[0].text
    assert logs[1].status_code == 200 and f"fake engine {BIG}: a headless rank" in logs[1].text
    assert logs[2].status_code == 404 and "ranks 0 to 1" in logs[2].text


def rank_log(gw: GatewayProcess, worker_id: str, rank: int) -> httpx.Response:
    return httpx.get(
        f"{gw.url}/admin/workers/{worker_id}/log?rank={rank}",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
        trust_env=False,
    )


def test_single_node_replicas_run_one_on_each_node_and_requests_go_to_both(
    gateway: GatewayProcess,
) -> None:
    """1. `pair`'s two replicas, each ready on its own node (its HTTP address, and its
    engine's three Ray GPUs and VLLM_HOST_IP, are that node's).
    2. Six requests to `pair` through the gateway: three answered by the engine on each node
    (the scripted engine names its pid in `system_fingerprint`; least_outstanding takes turns
    between idle replicas)."""
    node_of = {}  # engine pid -> the node address it serves on
    for replica in (f"{PAIR}-0", f"{PAIR}-1"):
        worker = gateway.worker(replica)
        assert worker["state"] == "ready", worker
        engine = engine_on(worker["url"])
        env = engine.environ()
        assert env["VLLM_HOST_IP"] == httpx.URL(worker["url"]).host
        assert len(env["CUDA_VISIBLE_DEVICES"].split(",")) == 3
        node_of[engine.pid] = env["VLLM_HOST_IP"]
    assert sorted(node_of.values()) == [HEAD_IP, SECOND_IP]
    answers = [complete(gateway, PAIR) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 6
    served = Counter(node_of[int(a.json()["system_fingerprint"][4:])] for a in answers)
    assert served == {HEAD_IP: 3, SECOND_IP: 3}


def engine_on(url: str) -> psutil.Process:
    """The scripted engine listening on the host and port of `url` (a worker's base URL)."""
    where = httpx.URL(url)
    for guard in guards_of(PAIR):
        (engine,) = guard.children()
        argv = engine.cmdline()
        if (flag(argv, "--host"), flag(argv, "--port")) == (where.host, str(where.port)):
            return engine
    raise AssertionError(f"no engine of {PAIR} serves {url}")


def test_a_rank_that_exits_restarts_the_whole_gang_while_other_models_serve(
    gateway: GatewayProcess,
) -> None:
    """1. SIGKILL of the follower rank's engine (by pid).
    2. Every rank of `big` ends, rank 0 included, and a new gang becomes ready.
    3. `small` answers all along."""
    before = guards(BIG)
    old = tree(before[0]) | tree(before[1])
    (follower_engine,) = before[1].children()
    follower_engine.kill()
    killed = time.monotonic()
    assert gone(old, 60), "a rank of the broken gang lived on"
    answers = []
    while time.monotonic() - killed < 120:
        answers.append(complete(gateway, SMALL).status_code)
        if gateway.worker(f"{BIG}-0")["state"] == "ready":
            break
        time.sleep(0.5)
    worker = gateway.worker(f"{BIG}-0")
    assert worker["state"] == "ready", worker
    assert worker["restarts"] >= 1
    assert "rank 1's engine exited with status 137" in worker["last_error"][0]
    assert "a headless rank" in rank_log(gateway, f"{BIG}-0", 1).text  # the new gang's rank 1
    assert set(answers) == {200}
    after = guards(BIG)
    assert sorted(after) == [0, 1]
    assert not (tree(after[0]) | tree(after[1])) & old
    assert complete(gateway, BIG).status_code == 200


def test_sigkill_of_the_gateway_leaves_no_engine_on_any_node(gateway: GatewayProcess) -> None:
    """The gateway is Ray's driver: its actors end with it, and their guards end the engines."""
    pids = set()
    for name in (BIG, SMALL, PAIR):
        for guard in guards_of(name):
            pids |= tree(guard)
    assert len(pids) >= 12  # 5 guards, their engines, and big's two forked children
    os.kill(gateway.pid, signal.SIGKILL)
    gateway.proc.wait()  # type: ignore[union-attr]
    assert gone(pids, 90), f"left: {[p for p in pids if psutil.pid_exists(p)]}"


class Squatter(ThreadingHTTPServer):
    """Another user of rank 0's node, bound to the port rank 0 was given before its engine
    binds it; answers /health and /v1/models as the engine would and keeps what it was sent."""

    def __init__(self, address: str, port: int, served_name: str) -> None:
        self.heads: list[str] = []
        self.models = json.dumps({"object": "list", "data": [{"id": served_name}]}).encode()
        super().__init__((address, port), SquatterAnswer)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class SquatterAnswer(BaseHTTPRequestHandler):
    server: Squatter

    def do_GET(self) -> None:
        self.server.heads.append(f"{self.requestline}\n{self.headers}")
        body = self.server.models if self.path.endswith("/models") else b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_squatter_on_rank_0s_port_is_never_sent_the_key(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """Rank 0's port is in its engine's argv, on a node the gateway cannot look into.
    1. A gateway of its own (the module's is gone) with one model whose engine binds 4 s late;
    2. as soon as /admin/workers shows rank 0's URL, this test binds that address and port
    and answers /health and /v1/models; 3. the worker is never ready there and the squatter
    never sees an Authorization header: rank 0's actor, asked on its node, says the socket is
    not the engine's; 4. the worker starts again on new ports and is ready with its engine."""
    name = f"squat-{SUFFIX}"
    model = fake_model(name, env={"FAKE_ENGINE_BIND_DELAY": "4"})
    gw = GatewayProcess(tmp_path, [model], api_key=API_KEY, admin_key=ADMIN_KEY, stop_grace=5)
    gw.config["cluster"] = {"ray": cluster.address, "node_ip": cluster.node_ip}
    gw.config_path.write_text(yaml.safe_dump(gw.config, sort_keys=False))
    gw.start()
    squatter = None
    try:
        deadline = time.monotonic() + 120
        while squatter is None and time.monotonic() < deadline:
            try:
                url = gw.worker(f"{name}-0")["url"]
            except httpx.TransportError:  # the gateway is not listening yet
                url = None
            if url:
                squatted = httpx.URL(url)
                squatter = Squatter(squatted.host, squatted.port or 80, name)
            time.sleep(0.05)
        assert squatter is not None, "rank 0's URL never shown"
        gw.wait_ready(timeout=120)
        ready = httpx.URL(gw.worker(f"{name}-0")["url"])
        assert complete(gw, name).status_code == 200
    finally:
        gw.stop()
        if squatter is not None:
            squatter.shutdown()
            squatter.server_close()
    assert squatter.heads, "the squatter was never asked: the test proved nothing"
    assert not [h for h in squatter.heads if "authorization" in h.lower()], squatter.heads
    assert ready.port != squatted.port
    assert "another process holds the port" in gw.log()


def test_a_node_leaving_stops_its_gang_which_waits_for_room_and_comes_back(
    tmp_path: Path,
) -> None:
    """A cluster and gateway of its own: 1. `big` ready over both nodes; 2. the second node's
    Ray stops; 3. every rank of `big` ends, and while no second node is there its placement
    group cannot be placed: the worker says so and keeps trying, never `failed` (more tries
    than max_failures pass), as a pending replica waits; 4. the second node joins again:
    `big` is ready again and answers."""
    with ray_cluster(head_gpus=2, second_gpus=2) as alone:
        gw = GatewayProcess(
            tmp_path, [fake_model(BIG, tp=2, nodes=2)], api_key=API_KEY, admin_key=ADMIN_KEY
        )
        gw.config["cluster"] = {"ray": alone.address, "node_ip": alone.node_ip, "start_timeout": 3}
        gw.config_path.write_text(yaml.safe_dump(gw.config, sort_keys=False))
        gw.start()
        try:
            gw.wait_ready(timeout=180)
            ranks = guards(BIG)
            pids = tree(ranks[0]) | tree(ranks[1])
            (second,) = [p for p in psutil.process_iter() if is_second_node(p, alone)]
            second.send_signal(signal.SIGTERM)
            assert gone(pids, 60), "a rank outlived its gang"
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline and not is_unplaced(gw.worker(f"{BIG}-0")):
                time.sleep(1)
            assert is_unplaced(gw.worker(f"{BIG}-0")), gw.worker(f"{BIG}-0")
            time.sleep(30)  # 5 failures would fail it: each try takes 3 s + 1 s
            worker = gw.worker(f"{BIG}-0")
            assert worker["state"] in ("starting", "restarting"), worker
            with second_node_again(alone, gpus=2):
                deadline = time.monotonic() + 120
                while gw.worker(f"{BIG}-0")["state"] != "ready":
                    assert time.monotonic() < deadline, gw.worker(f"{BIG}-0")
                    time.sleep(0.5)
                assert complete(gw, BIG).status_code == 200
                assert len(guards(BIG)) == 2
                gw.stop()  # before the node it runs on
        finally:
            gw.stop()


def is_unplaced(worker: dict) -> bool:  # type: ignore[type-arg]
    return "not placed in 3 s" in "\n".join(worker["last_error"])


def is_second_node(proc: psutil.Process, cluster: RayCluster) -> bool:
    """The second node's `ray start --address HEAD ...` (tests/fakes/ray_cluster.py)."""
    try:
        argv = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "start" in argv and argv[argv.index("start") + 1 :][:2] == ["--address", cluster.address]
