"""`enginegate plan` with `cluster: {ray: ...}` against a real two-node Ray cluster.

The cluster (tests/fakes/ray_cluster.py) runs on this host: the head on 127.0.0.2 with 2 GPUs
and a second node on 127.0.0.3 with 4, GPUs that exist as Ray resources only. One cluster
for the module: Ray on two cores is heavy.
"""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.ray_cluster import HEAD_IP, SECOND_IP, RayCluster, leftovers, ray_cluster

ENGINEGATE = str(Path(sys.executable).parent / "enginegate")


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
