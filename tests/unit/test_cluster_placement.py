"""Placement on a Ray cluster's nodes (backends/cluster.py): pure, from the nodes' totals."""

from pathlib import Path

import pytest

from backends.cluster import Node, place
from backends.spec import ModelSpec
from gateway.cli import main
from gateway.config import ConfigError, load_config

A, B, C = (
    Node("a" * 16, "10.0.0.1", 8, 16),
    Node("b" * 16, "10.0.0.2", 8, 16),
    Node("c" * 16, "10.0.0.3", 2, 4),
)


MODELS = "models: [{name: m, backend: vllm, model: /m}]\n"
OPEN = "gateway: {allow_unauthenticated: true}\n"


def spec(name: str, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "backend": "vllm", "model": "/m", **fields})


def placed(
    models: list[ModelSpec], nodes: list[Node]
) -> list[tuple[str, int, str | None, tuple[int, ...]]]:
    return [
        (b.worker_id, b.node_rank, b.node.address if b.node else None, b.gpus)
        for b in place(models, nodes)
    ]


def test_a_multi_node_replica_is_one_bundle_per_node_on_different_nodes() -> None:
    bundles = place([spec("r1", tp=8, pp=2, nodes=2)], [A, B])
    assert [(b.strategy, b.node_rank, b.node, b.gpus) for b in bundles] == [
        ("STRICT_SPREAD", 0, A, tuple(range(8))),
        ("STRICT_SPREAD", 1, B, tuple(range(8))),
    ]


def test_single_node_replicas_pack_first_fit_and_never_share_a_gpu() -> None:
    models = [spec("x", tp=4, replicas=3), spec("y", tp=2)]
    assert placed(models, [A, B, C]) == [
        ("x-0", 0, "10.0.0.1", (0, 1, 2, 3)),
        ("x-1", 0, "10.0.0.1", (4, 5, 6, 7)),
        ("x-2", 0, "10.0.0.2", (0, 1, 2, 3)),
        ("y-0", 0, "10.0.0.2", (4, 5)),
    ]


def test_strict_spread_cannot_put_two_ranks_on_one_node() -> None:
    """Two nodes with 16 GPUs free in all, but a 3-node replica needs 3 nodes."""
    (first, *_rest) = bundles = place([spec("w", tp=3, nodes=3), spec("after", tp=8)], [A, B])
    assert first.node is None
    assert first.problem is not None and first.problem.startswith("needs 3 different nodes")
    assert "aaaaaaaa (10.0.0.1): 8 GPUs, 16 CPUs" in first.problem
    assert bundles[-1].worker_id == "after-0" and bundles[-1].node == A  # nothing was taken


def test_cpu_models_take_cpus_and_external_ones_nothing() -> None:
    models = [
        spec("cpu", device="cpu", tp=2),
        ModelSpec(name="far", backend="external", url="http://h/v1"),
    ]
    (bundle,) = place(models, [C])
    assert (bundle.node, bundle.gpus, bundle.cpus) == (C, (), 2)


def test_no_node_fits_names_what_is_left() -> None:
    (bundle,) = place([spec("big", tp=4)], [C])
    assert (
        bundle.problem
        == "needs a node with 4 GPUs free each; left: cccccccc (10.0.0.3): 2 GPUs, 4 CPUs"
    )


def test_the_cluster_key_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(OPEN + "cluster: {ray: ''}\n" + MODELS)
    with pytest.raises(ConfigError, match=r"cluster\.ray: String should have at least 1"):
        load_config(path)
    path.write_text(OPEN + "cluster: {ray: 'h:6379', kube: x}\n" + MODELS)
    with pytest.raises(ConfigError, match=r"cluster\.kube: unknown key"):
        load_config(path)


def test_node_env_may_not_set_what_enginegate_sets(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        OPEN + "cluster: {ray: 'h:6379', node_env: {10.0.0.2: {VLLM_API_KEY: x}}}\n" + MODELS
    )
    with pytest.raises(ConfigError, match=r"cluster\.node_env: 10\.0\.0\.2: VLLM_API_KEY: set by"):
        load_config(path)


def test_a_model_on_several_nodes_needs_the_cluster_to_be_served(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(OPEN + "models: [{name: m, backend: vllm, model: /m, tp: 2, nodes: 2}]\n")
    with pytest.raises(SystemExit) as exited:
        main(["check", "-c", str(path)])
    assert "models[0].nodes: 2 hosts: without `cluster: {ray: ...}`" in str(exited.value.code)
