"""Adapters are pure: exact argv and env for a slot, socket path (or port) and per-worker key."""

from typing import Any

import pytest

from backends.base import UNSAFE_ENV, Launch, Slot
from backends.external import ExternalAdapter
from backends.placement import plan
from backends.spec import ModelSpec
from backends.vllm import VllmAdapter

KEY = "per-worker-secret-Zx81"
PORT = 8123
SOCKET = "/state/run/tiny-0.sock"


def only_slot(gpu_count: int = 0, cores: list[int] | None = None, **fields: Any) -> Slot:
    spec = ModelSpec(**{"name": "tiny", "backend": "vllm", "model": "/models/tiny", **fields})
    (slot,) = plan([spec], gpu_count, cores if cores is not None else [0, 1])
    return slot


def vllm_launch(slot: Slot) -> Launch:
    return VllmAdapter().launch(slot, PORT, KEY, socket_path=SOCKET)


def head(tp: int = 1, pp: int = 1, command: tuple[str, ...] = ("vllm", "serve")) -> list[str]:
    """The flags every vLLM worker gets, before engine_args."""
    return [
        *command,
        "--model", "/models/tiny",
        "--served-model-name", "tiny",
        "--uds", SOCKET,
        "--tensor-parallel-size", str(tp),
        "--pipeline-parallel-size", str(pp),
    ]  # fmt: skip


def test_cpu_tp1_single_rank_gets_every_core() -> None:
    launch = vllm_launch(only_slot(device="cpu"))
    assert launch.argv == head()
    assert launch.env == {
        "VLLM_API_KEY": KEY,
        "CUDA_VISIBLE_DEVICES": "",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    # Reached through the socket: the host of the URLs means nothing, and no port is used.
    assert launch.socket_path == SOCKET
    assert launch.base_url == "http://localhost/v1"
    assert launch.health_url == "http://localhost/health"
    assert launch.metrics_url == "http://localhost/metrics"
    assert (launch.served_name, launch.api_key, launch.has_process) == ("tiny", KEY, True)
    assert launch.remove_env == UNSAFE_ENV


def test_cpu_tp2_adds_mp_executor_and_one_core_list_per_rank() -> None:
    launch = vllm_launch(only_slot(device="cpu", tp=2))
    assert launch.argv == [*head(tp=2), "--distributed-executor-backend", "mp"]
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert launch.env["CUDA_VISIBLE_DEVICES"] == ""


def test_cpu_pp2_adds_mp_executor() -> None:
    slot = only_slot(device="cpu", pp=2, cores=[0, 1, 2, 3], kv_cache_gib=2.5)
    launch = vllm_launch(slot)
    assert launch.argv == [*head(pp=2), "--distributed-executor-backend", "mp"]
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1|2-3"
    assert launch.env["VLLM_CPU_KVCACHE_SPACE"] == "2.5"


def test_cpu_user_executor_choice_is_kept() -> None:
    slot = only_slot(device="cpu", tp=2, engine_args={"distributed_executor_backend": "ray"})
    launch = vllm_launch(slot)
    assert launch.argv == [*head(tp=2), "--distributed-executor-backend", "ray"]


def test_cuda_tp2_sees_only_its_gpus() -> None:
    slot = only_slot(gpu_count=4, tp=2, gpus=[2, 3])
    launch = vllm_launch(slot)
    assert launch.argv == head(tp=2)  # GPUs need no executor flag: vLLM picks its own
    assert launch.env == {"VLLM_API_KEY": KEY, "CUDA_VISIBLE_DEVICES": "2,3"}


def test_cuda_auto_placed_replicas_get_disjoint_devices() -> None:
    spec = ModelSpec(name="tiny", backend="vllm", model="/models/tiny", tp=2, replicas=2)
    first, second = plan([spec], 4, [0])
    assert vllm_launch(first).env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert vllm_launch(second).env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_custom_command_replaces_vllm_serve() -> None:
    command = ["/opt/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    launch = vllm_launch(only_slot(device="cpu", command=command))
    assert launch.argv == head(command=tuple(command))


def test_engine_args_flags_values_and_spelling() -> None:
    engine_args = {
        "max_model_len": 1024,
        "--enforce-eager": True,
        "disable-log-stats": False,
        "seed": None,
        "gpu_memory_utilization": 0.5,
        "dtype": "bfloat16",
    }
    launch = vllm_launch(only_slot(device="cpu", engine_args=engine_args))
    assert launch.argv[len(head()) :] == [
        "--max-model-len", "1024",
        "--enforce-eager",
        "--gpu-memory-utilization", "0.5",
        "--dtype", "bfloat16",
    ]  # fmt: skip


def test_model_env_is_added_on_top() -> None:
    slot = only_slot(device="cpu", env={"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "8"})
    env = vllm_launch(slot).env
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "8"


def test_key_travels_in_env_never_in_argv() -> None:
    slot = only_slot(device="cpu", tp=2, engine_args={"enforce_eager": True})
    launch = vllm_launch(slot)
    assert launch.env["VLLM_API_KEY"] == KEY
    assert not any(KEY in arg for arg in launch.argv)


def test_external_has_no_process_and_uses_the_configured_url_and_key() -> None:
    spec = ModelSpec(
        name="gpt",
        backend="external",
        url="https://api.example.com/v1/",
        api_key="sk-upstream",
        upstream_model="gpt-4o-mini",
    )
    (slot,) = plan([spec], 0, [0])
    launch = ExternalAdapter().launch(slot, 0, KEY)
    assert launch.argv == [] and launch.env == {}
    assert not launch.has_process and not ExternalAdapter.has_process
    assert launch.base_url == "https://api.example.com/v1"
    assert launch.health_url is None and launch.metrics_url is None
    assert (launch.served_name, launch.api_key) == ("gpt-4o-mini", "sk-upstream")


def test_external_defaults_to_the_model_name_and_no_key() -> None:
    spec = ModelSpec(name="local", backend="external", url="http://10.0.0.5:8000/v1", api_key="")
    launch = ExternalAdapter().launch(Slot("local-0", spec, 0), 0, KEY)
    assert (launch.served_name, launch.api_key) == ("local", None)
    assert KEY not in repr(launch)  # the per-worker secret is for engines we start


def test_vllm_never_listens_on_a_port() -> None:
    """Finding 19: vLLM's key guards only /v1, /v2, /inference and /cohere, so on a loopback
    port /invocations ran inference for any local user. It serves on a socket, or not at all."""
    assert VllmAdapter.listens_on_socket
    argv = vllm_launch(only_slot(device="cpu")).argv
    assert "--port" not in argv and "--host" not in argv and str(PORT) not in argv
    with pytest.raises(ValueError, match="socket_path"):
        VllmAdapter().launch(only_slot(device="cpu"), PORT, KEY)
