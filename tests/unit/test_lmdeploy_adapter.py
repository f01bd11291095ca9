"""LMDeploy adapter: exact argv and env per slot; what LMDeploy cannot do is refused in the spec."""

from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from backends.base import UNSAFE_ENV, Slot
from backends.lmdeploy import LmdeployAdapter
from backends.placement import plan
from backends.ports import PortAllocator
from backends.spec import ModelSpec
from backends.supervisor import Worker
from gateway.config import ConfigError, load_config

KEY = "per-worker-secret-Lp90"
PORT, MASTER = 8123, 29555


def lmdeploy(name: str = "r1", **fields: Any) -> ModelSpec:
    return ModelSpec(**{"name": name, "backend": "lmdeploy", "model": "/models/r1", **fields})


def slots(*specs: ModelSpec, gpu_count: int = 8) -> list[Slot]:
    return plan(list(specs), gpu_count, [0, 1])


def head(tp: int = 1) -> list[str]:
    return [
        "lmdeploy", "serve", "api_server", "/models/r1",
        "--model-name", "r1",
        "--server-name", "127.0.0.1",
        "--server-port", str(PORT),
        "--api-keys", KEY,
        "--tp", str(tp),
    ]  # fmt: skip


def test_tp1_default_backend_argv_env_and_health() -> None:
    (slot,) = slots(lmdeploy())
    adapter = LmdeployAdapter()
    assert adapter.side_ports(slot.model) == 0
    launch = adapter.launch(slot, PORT, KEY)
    assert launch.argv == head()  # no --backend: LMDeploy's own default (turbomind, fallback)
    assert launch.env == {"CUDA_VISIBLE_DEVICES": "0"}
    assert launch.health_url == f"http://127.0.0.1:{PORT}/health"
    assert launch.metrics_url == f"http://127.0.0.1:{PORT}/metrics"
    assert launch.base_url == f"http://127.0.0.1:{PORT}/v1"
    assert (launch.served_name, launch.api_key) == ("r1", KEY)
    # An inherited MASTER_ADDR/MASTER_PORT/RAY_ADDRESS would make instances share a store.
    assert {"MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS"} <= set(launch.remove_env)
    assert launch.remove_env == UNSAFE_ENV


def test_pytorch_tp8_uses_mp_executor_and_its_own_master_port() -> None:
    (slot,) = slots(lmdeploy(tp=8, lmdeploy_backend="pytorch"))
    adapter = LmdeployAdapter()
    assert adapter.side_ports(slot.model) == 1
    launch = adapter.launch(slot, PORT, KEY, (MASTER,))
    assert launch.argv == [*head(tp=8), "--backend", "pytorch"]
    assert launch.env == {
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
        "LMDEPLOY_EXECUTOR_BACKEND": "mp",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(MASTER),
    }


@pytest.mark.parametrize(
    ("backend", "tp", "side_ports"),
    [("turbomind", 4, 0), (None, 4, 1), ("pytorch", 1, 0), ("pytorch", 2, 1)],
)
def test_master_port_only_where_pytorch_may_run_tp(
    backend: str | None, tp: int, side_ports: int
) -> None:
    spec = lmdeploy(tp=tp, lmdeploy_backend=backend)
    assert LmdeployAdapter().side_ports(spec) == side_ports


@pytest.mark.parametrize(
    ("tp", "replicas", "gpus", "expected"),
    [
        (1, 2, None, ["0", "1"]),
        (4, 2, None, ["0,1,2,3", "4,5,6,7"]),
        (2, 2, [6, 7, 0, 1], ["6,7", "0,1"]),
    ],
)
def test_layout_matrix(tp: int, replicas: int, gpus: list[int] | None, expected: list[str]) -> None:
    adapter = LmdeployAdapter()
    placed = slots(lmdeploy(tp=tp, replicas=replicas, gpus=gpus, lmdeploy_backend="turbomind"))
    launches = [adapter.launch(slot, PORT, KEY) for slot in placed]
    assert [launch.env["CUDA_VISIBLE_DEVICES"] for launch in launches] == expected
    assert all(launch.argv == [*head(tp), "--backend", "turbomind"] for launch in launches)


def test_reasoning_maps_to_lmdeploy_default_parser() -> None:
    # lmdeploy 0.18 keeps `deepseek-r1` only as a deprecated alias of `default`.
    spec = lmdeploy(reasoning="deepseek_r1", engine_args={"session_len": 8192})
    (slot,) = slots(spec)
    argv = LmdeployAdapter().launch(slot, PORT, KEY).argv
    assert argv[len(head()) :] == ["--reasoning-parser", "default", "--session-len", "8192"]


async def test_two_pytorch_tp2_workers_share_no_port_and_no_gpu(tmp_path: Path) -> None:
    """1. Two LMDeploy PyTorch TP2 models on one 4-GPU host.
    2. Both plan their launch from the supervisor's one allocator.
    3. Four distinct ports (HTTP and MASTER_PORT each); disjoint GPU lists."""
    specs = [lmdeploy(n, tp=2, lmdeploy_backend="pytorch") for n in ("a", "b")]
    ports = PortAllocator()
    async with httpx.AsyncClient() as client:
        workers = [Worker(slot, ports, client, tmp_path) for slot in slots(*specs, gpu_count=4)]
        launches = [worker.plan_launch() for worker in workers]
    http = [launch.argv[launch.argv.index("--server-port") + 1] for launch in launches]
    master = [launch.env["MASTER_PORT"] for launch in launches]
    assert len({*http, *master}) == 4
    assert http == [str(w.port) for w in workers]
    assert [launch.env["CUDA_VISIBLE_DEVICES"] for launch in launches] == ["0,1", "2,3"]


def test_pipeline_parallel_is_refused_at_models_i_pp(tmp_path: Path) -> None:
    file = tmp_path / "enginegate.yaml"
    file.write_text(
        "gateway: {allow_unauthenticated: true}\n"
        "models:\n"
        "  - {name: ok, backend: vllm, model: /m}\n"
        "  - {name: r1, backend: lmdeploy, model: /m, tp: 2, pp: 2}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    (problem,) = caught.value.problems
    assert problem.startswith("models[1].pp: LMDeploy has no pipeline parallelism")


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"nnodes": 2}, "nnodes"),
        ({"engine_args": {"backend": "pytorch"}}, "engine_args"),
        ({"engine_args": {"api_keys": "x"}}, "engine_args"),
        ({"lmdeploy_backend": "vllm"}, "lmdeploy_backend"),
        ({"device": "cpu"}, "device"),
    ],
)
def test_spec_refusals(fields: dict[str, Any], key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        lmdeploy(**fields)
    assert caught.value.errors()[0]["loc"] == (key,)
