"""Each rank's argv and env on a Ray cluster (backends/ray_launch.py plan_ranks), and the
one-token generation probe; pure, no cluster."""

import asyncio
import json
from pathlib import Path

import httpx

from backends.adapters import ADAPTERS
from backends.base import Slot
from backends.cluster import ClusterSpec
from backends.ray_launch import generate_one_token, plan_ranks
from backends.spec import ModelSpec

HEAD, SECOND = "10.0.0.1", "10.0.0.2"


def two_node_slot(**fields: object) -> Slot:
    spec = ModelSpec.model_validate(
        {"name": "m", "backend": "vllm", "model": "/m", "tp": 2, "nodes": 2, **fields}
    )
    cores = ("0", "1") if spec.device == "cpu" else ()
    return Slot("m-0", spec, 0, cpu_ranks=cores)


def ranks(slot: Slot, cluster: ClusterSpec | None = None) -> list:  # type: ignore[type-arg]
    launch = ADAPTERS["vllm"].launch(slot, 8000, "sekrit", host=HEAD)
    cluster = cluster or ClusterSpec(ray=f"{HEAD}:6379")
    return plan_ranks(slot, launch, [HEAD, SECOND], 29600, cluster, Path("/s/logs/m-0.log"))


def test_vllm_ranks_get_the_multi_node_flags_and_the_follower_runs_headless() -> None:
    head, follower = ranks(two_node_slot(device="cpu"))
    common = ["--nnodes", "2", "--master-addr", HEAD, "--master-port", "29600"]
    assert head.argv[-8:] == ["--nnodes", "2", "--node-rank", "0", *common[2:]]
    assert follower.argv[-9:] == ["--nnodes", "2", "--node-rank", "1", *common[2:], "--headless"]
    # rank 0 serves HTTP on its node's cluster address, never 0.0.0.0
    assert head.argv[head.argv.index("--host") + 1] == HEAD
    assert "0.0.0.0" not in head.argv + follower.argv
    assert "--uds" not in head.argv
    assert (head.address, follower.address) == (HEAD, SECOND)
    assert (head.log_path, follower.log_path) == (
        Path("/s/logs/m-0.log"),
        Path("/s/logs/m-0.rank1.log"),
    )


def test_each_cpu_rank_binds_its_own_cores_and_knows_its_node_address() -> None:
    head, follower = ranks(two_node_slot(device="cpu"))
    assert head.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert follower.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert (head.env["VLLM_HOST_IP"], follower.env["VLLM_HOST_IP"]) == (HEAD, SECOND)
    assert head.env["VLLM_API_KEY"] == follower.env["VLLM_API_KEY"] == "sekrit"
    assert "sekrit" not in " ".join(head.argv + follower.argv)


def test_node_env_is_applied_on_its_node_only() -> None:
    cluster = ClusterSpec(
        ray=f"{HEAD}:6379",
        node_env={SECOND: {"GLOO_SOCKET_IFNAME": "ib0", "VLLM_CPU_OMP_THREADS_BIND": "4-7"}},
    )
    head, follower = ranks(two_node_slot(device="cpu"), cluster)
    assert follower.env["GLOO_SOCKET_IFNAME"] == "ib0"
    assert follower.env["VLLM_CPU_OMP_THREADS_BIND"] == "4-7"
    assert "GLOO_SOCKET_IFNAME" not in head.env


def test_gpu_ranks_leave_their_devices_to_ray() -> None:
    head, follower = ranks(two_node_slot(tp=16))
    assert "CUDA_VISIBLE_DEVICES" not in head.env | follower.env
    assert "--tensor-parallel-size" in head.argv
    assert head.argv[head.argv.index("--tensor-parallel-size") + 1] == "16"


def test_the_generation_probe_passes_only_on_a_generated_answer() -> None:
    seen: list[dict[str, object]] = []

    def answer(status: int) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            seen.append({"auth": request.headers["authorization"], **json.loads(request.content)})
            return httpx.Response(status, json={"choices": [{"text": "x"}]})

        return httpx.MockTransport(handle)

    launch = ADAPTERS["vllm"].launch(two_node_slot(device="cpu"), 8000, "sekrit", host=HEAD)

    async def run(status: int) -> tuple[bool, str]:
        async with httpx.AsyncClient(transport=answer(status)) as client:
            result = await generate_one_token(client, launch, 5)
            return result.ok, result.cause

    assert asyncio.run(run(200)) == (True, "")
    ok, cause = asyncio.run(run(500))
    assert not ok and f"POST http://{HEAD}:8000/v1/completions answered 500" in cause
    assert seen[0] == {"auth": "Bearer sekrit", "model": "m", "prompt": "ping", "max_tokens": 1}
