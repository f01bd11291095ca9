"""SGLang adapter: exact argv and env per slot, side ports from the supervisor's allocator."""

from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from backends.base import UNSAFE_ENV, Slot
from backends.placement import plan
from backends.ports import PortAllocator
from backends.sglang import SglangAdapter
from backends.spec import ModelSpec
from backends.supervisor import Worker

KEY = "per-worker-secret-Qm27"
PORT, NCCL = 8123, 24001


def sglang(name: str = "r1", **fields: Any) -> ModelSpec:
    return ModelSpec(**{"name": name, "backend": "sglang", "model": "/models/r1", **fields})


def slots(*specs: ModelSpec, gpu_count: int = 8) -> list[Slot]:
    return plan(list(specs), gpu_count, [0, 1])


def head(tp: int = 1, pp: int = 1, nccl: int = NCCL) -> list[str]:
    return [
        "python3", "-m", "sglang.launch_server",
        "--model-path", "/models/r1",
        "--served-model-name", "r1",
        "--host", "127.0.0.1",
        "--port", str(PORT),
        "--api-key", KEY,
        "--tp-size", str(tp),
        "--pp-size", str(pp),
        "--nccl-port", str(nccl),
        "--enable-metrics",
    ]  # fmt: skip


def test_tp8_argv_env_and_health_endpoint() -> None:
    (slot,) = slots(sglang(tp=8))
    launch = SglangAdapter().launch(slot, PORT, KEY, (NCCL,))
    assert launch.argv == head(tp=8)
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert launch.base_url == f"http://127.0.0.1:{PORT}/v1"
    # 0.5.17 has no /ready (401 behind the key); /health is in every release, and its
    # one-token generation needs longer than the supervisor's default probe timeout.
    assert launch.health_url == f"http://127.0.0.1:{PORT}/health"
    assert launch.health_timeout is not None and launch.health_timeout > 20
    assert launch.metrics_url == f"http://127.0.0.1:{PORT}/metrics"
    assert (launch.served_name, launch.api_key) == ("r1", KEY)
    assert launch.remove_env == UNSAFE_ENV


@pytest.mark.parametrize(
    ("tp", "pp", "replicas", "gpus", "expected"),
    [
        (1, 1, 1, None, ["0"]),
        (2, 1, 2, None, ["0,1", "2,3"]),
        (2, 2, 1, None, ["0,1,2,3"]),
        (1, 4, 2, None, ["0,1,2,3", "4,5,6,7"]),
        (2, 1, 2, [7, 6, 5, 4], ["7,6", "5,4"]),
    ],
)
def test_layout_matrix(
    tp: int, pp: int, replicas: int, gpus: list[int] | None, expected: list[str]
) -> None:
    adapter = SglangAdapter()
    placed = slots(sglang(tp=tp, pp=pp, replicas=replicas, gpus=gpus))
    launches = [adapter.launch(s, PORT, KEY, (NCCL + s.replica,)) for s in placed]
    assert [launch.env["CUDA_VISIBLE_DEVICES"] for launch in launches] == expected
    for replica, launch in enumerate(launches):
        assert launch.argv == head(tp=tp, pp=pp, nccl=NCCL + replica)


def test_reasoning_is_spelled_with_a_hyphen_and_engine_args_come_last() -> None:
    spec = sglang(
        reasoning="deepseek_r1", engine_args={"context_length": 32768, "trust_remote_code": True}
    )
    (slot,) = slots(spec)
    argv = SglangAdapter().launch(slot, PORT, KEY, (NCCL,)).argv
    assert argv[len(head()) :] == [
        "--reasoning-parser", "deepseek-r1", "--context-length", "32768", "--trust-remote-code",
    ]  # fmt: skip


def test_command_and_env_from_the_spec() -> None:
    spec = sglang(command=["/opt/sgl/bin/sglang", "serve"], env={"SGL_FORCE_SHUTDOWN": "1"})
    (slot,) = slots(spec)
    launch = SglangAdapter().launch(slot, PORT, KEY, (NCCL,))
    assert launch.argv[:3] == ["/opt/sgl/bin/sglang", "serve", "--model-path"]
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "0", "SGL_FORCE_SHUTDOWN": "1"}


def test_launch_without_its_side_port_is_a_programming_error() -> None:
    (slot,) = slots(sglang())
    with pytest.raises(ValueError, match="side port"):
        SglangAdapter().launch(slot, PORT, KEY)


async def test_two_workers_on_one_host_share_no_port_and_no_gpu(tmp_path: Path) -> None:
    """1. Two SGLang models, TP2 each, placed on one 4-GPU host.
    2. Each worker plans its launch from the supervisor's one allocator, as run() does.
    3. HTTP and NCCL ports are four distinct ports; GPU lists are disjoint."""
    placed = slots(sglang("a", tp=2), sglang("b", tp=2), gpu_count=4)
    ports = PortAllocator()
    async with httpx.AsyncClient() as client:
        workers = [Worker(slot, ports, client, tmp_path) for slot in placed]
        launches = [worker.plan_launch() for worker in workers]
    used = [(w.port, *w.side_ports) for w in workers]
    assert all(len(p) == 2 for p in used)
    flat = [port for pair in used for port in pair]
    assert len(set(flat)) == 4
    for launch, (port, nccl) in zip(launches, used, strict=True):
        assert launch.argv[launch.argv.index("--port") + 1] == str(port)
        assert launch.argv[launch.argv.index("--nccl-port") + 1] == str(nccl)
    assert [launch.env["CUDA_VISIBLE_DEVICES"] for launch in launches] == ["0,1", "2,3"]


async def test_a_restart_hands_back_the_old_ports(tmp_path: Path) -> None:
    (slot,) = slots(sglang())
    ports = PortAllocator()
    async with httpx.AsyncClient() as client:
        worker = Worker(slot, ports, client, tmp_path)
        worker.plan_launch()
        first = {worker.port, *worker.side_ports}
        worker.plan_launch()
    assert not first & ports._handed_out  # released, so the allocator holds only the new pair
    assert len(ports._handed_out) == 2


@pytest.mark.parametrize(
    ("fields", "key", "message"),
    [
        ({"nnodes": 2}, "nnodes", "multi-node is not supported yet"),
        ({"node_rank": 1}, "node_rank", "multi-node is not supported yet"),
        ({"dist_init_addr": "10.0.0.1:5000"}, "dist_init_addr", "multi-node"),
        ({"engine_args": {"dist-init-addr": "h:1"}}, "engine_args", "multi-node"),
        ({"engine_args": {"nccl_port": 1}}, "engine_args", "set by enginegate"),
        ({"engine_args": {"reasoning-parser": "x"}}, "engine_args", "reasoning:"),
        ({"device": "cpu"}, "device", "need GPUs"),
        ({"lmdeploy_backend": "pytorch"}, "lmdeploy_backend", "lmdeploy' only"),
    ],
)
def test_spec_refusals_name_the_key(fields: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        sglang(**fields)
    (error,) = caught.value.errors()
    assert error["loc"] == (key,)
    assert message in error["msg"]
