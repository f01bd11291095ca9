"""A real two-node Ray cluster: `enginegate plan` with `cluster: {ray: ...}`, and an engine
started on a node by a Ray actor under the guard (backends/ray_worker.py).

The cluster (tests/fakes/ray_cluster.py) runs on this host: the head on 127.0.0.2 with 2 GPUs
and a second node on 127.0.0.3 with 4, GPUs that exist as Ray resources only. One cluster
for the module: Ray on two cores is heavy.
"""

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fakes.ray_cluster import HEAD_IP, SECOND_IP, RayCluster, leftovers, ray_cluster

ENGINEGATE = str(Path(sys.executable).parent / "enginegate")
FAKE_ENGINE = Path(__file__).parents[1] / "fakes" / "engine.py"


def free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with ray_cluster(head_gpus=2, second_gpus=4) as running:
        yield running
    assert leftovers(running.logs) == []


def write_config(tmp_path: Path, cluster: RayCluster, models: str) -> Path:
    path = tmp_path / "enginegate.yaml"
    path.write_text(
        "gateway: {allow_unauthenticated: true}\n"
        f"cluster: {{ray: '{cluster.address}', node_ip: '{cluster.node_ip}'}}\n"
        "models:\n" + models
    )
    return path


def plan(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [ENGINEGATE, "plan", "-c", str(config), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180)


def ranks(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return list(json.loads(result.stdout)["ranks"])


def test_every_rank_gets_a_node_and_gpus_from_the_clusters_resources(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """1. A two-node replica: one bundle on each node (STRICT_SPREAD), GPU 0 of each.
    2. A tp=3 replica: packed on the one node that still has 3 GPUs (the second).
    3. A tp=1 replica: the head's GPU left over. External models take nothing."""
    config = write_config(
        tmp_path,
        cluster,
        "  - {name: big, backend: vllm, model: /m, tp: 2, nodes: 2}\n"
        "  - {name: mid, backend: sglang, model: /m, tp: 3}\n"
        "  - {name: one, backend: vllm, model: /m}\n"
        "  - {name: far, backend: external, url: 'http://127.0.0.1:9/v1'}\n",
    )
    result = plan(config, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    nodes = [(n["address"], n["gpus"], n["cpus"]) for n in document["nodes"]]
    assert sorted(nodes) == [(HEAD_IP, 2, 1), (SECOND_IP, 4, 1)]
    first, second = nodes[0][0], nodes[1][0]  # in the order Ray lists them
    placed = [
        (r["worker"], r["strategy"], r["node_rank"], r["address"], r["gpus"]) for r in ranks(result)
    ]
    assert placed == [
        ("big-0", "STRICT_SPREAD", 0, first, [0]),
        ("big-0", "STRICT_SPREAD", 1, second, [0]),
        ("mid-0", "PACK", 0, SECOND_IP, [1, 2, 3]),
        ("one-0", "PACK", 0, HEAD_IP, [1]),
    ]
    assert document["fits"] is True


def test_a_replica_that_does_not_fit_is_named_before_anything_starts(
    cluster: RayCluster, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        cluster,
        "  - {name: ok, backend: vllm, model: /m}\n"
        "  - {name: wide, backend: vllm, model: /m, tp: 3, nodes: 3}\n"
        "  - {name: fat, backend: vllm, model: /m, tp: 8}\n",
    )
    result = plan(config)
    assert result.returncode == 1
    assert "DOES NOT FIT" in result.stdout
    assert f"{config}: models[1] (wide-0): does not fit: needs 3 different nodes" in result.stderr
    assert f"{config}: models[2] (fat-0): does not fit: needs a node with 8 GPUs" in result.stderr
    assert "models[0]" not in result.stderr
    assert "ok-0" in result.stdout and "PACK" in result.stdout


@pytest.fixture
def driver(cluster: RayCluster) -> Iterator[Any]:
    """This test process as a Ray driver of the cluster."""
    import ray

    ray.init(
        address=cluster.address,
        _node_ip_address=cluster.node_ip,
        logging_level="ERROR",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def start_engine(ray: Any, tmp_path: Path, name: str) -> tuple[Any, int, int]:
    """A fake engine (tests/fakes/engine.py) under the guard, by an actor on the second node
    holding one of its GPUs; (actor, guard pid, HTTP port)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from backends.ray_worker import remote_class

    (node,) = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == SECOND_IP]
    port = free_port(SECOND_IP)
    argv = [sys.executable, str(FAKE_ENGINE), "--host", SECOND_IP, "--port", str(port)]
    argv += ["--served-model-name", name]
    on_second = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
    actor = (
        remote_class()
        .options(num_gpus=1, scheduling_strategy=on_second)
        .remote(argv, {}, str(tmp_path / f"{name}.log"), 5.0)
    )
    guard = ray.get(actor.pid.remote(), timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{SECOND_IP}:{port}/health", timeout=2).status_code == 200:
                return actor, guard, port
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"engine not up: {ray.get(actor.log_tail.remote())}")


def gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids
        ):
            return True
        time.sleep(0.2)
    return False


def test_an_actor_runs_the_engine_on_its_node_under_the_guard(driver: Any, tmp_path: Path) -> None:
    """1. The engine serves on the second node's address, with the GPU Ray gave the actor.
    2. stop(): SIGTERM through the guard; the engine's tree is gone, its status returned."""
    actor, guard, _ = start_engine(driver, tmp_path, "tiny")
    (engine,) = psutil.Process(guard).children()
    assert engine.environ()["CUDA_VISIBLE_DEVICES"] == "0"  # Ray's pick on that node
    assert f"fake engine tiny on {SECOND_IP}" in driver.get(actor.log_tail.remote())
    assert driver.get(actor.stop.remote(), timeout=60) in (0, 128 + 15, -15)
    assert gone([guard, engine.pid])


def test_the_engine_dies_with_its_actor(driver: Any, tmp_path: Path) -> None:
    """ray.kill of the actor (as when its driver or node goes): the guard kills the engine."""
    actor, guard, _ = start_engine(driver, tmp_path, "orphan")
    (engine,) = psutil.Process(guard).children()
    driver.kill(actor)
    assert gone([guard, engine.pid]), "engine outlived its actor"
