"""A worker puts its engine to sleep and wakes it with vLLM's sleep-mode routes (POST /sleep,
/wake_up), with the worker key; an upstream that refuses leaves the state as it was."""

from pathlib import Path

import httpx
import pytest

from backends.base import Launch, Slot
from backends.ports import PortAllocator
from backends.spec import ModelSpec
from backends.supervisor import Worker, WorkerState


def worker(tmp_path: Path, answer: int, seen: list[httpx.Request]) -> Worker:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(answer, json={})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    spec = ModelSpec(name="m", backend="vllm", model="/models/m", device="cpu")
    w = Worker(Slot("m-0", spec, 0, cpu_ranks=("0",)), PortAllocator(), client, tmp_path)
    w.launch = Launch([], {}, "http://localhost/v1", None, "m", api_key="k")
    w.state = WorkerState.READY
    return w


async def test_sleep_then_wake(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []
    w = worker(tmp_path, 200, seen)
    assert await w.sleep()
    assert w.state is WorkerState.SLEEPING and not w.is_ready
    assert await w.wake()
    assert w.state is WorkerState.READY
    assert [(r.method, r.url.path, r.url.query) for r in seen] == [
        ("POST", "/sleep", b"level=1"),
        ("POST", "/wake_up", b""),
    ]
    assert {r.headers["authorization"] for r in seen} == {"Bearer k"}


@pytest.mark.parametrize("answer", [404, 500])
async def test_a_refused_sleep_leaves_the_worker_ready(tmp_path: Path, answer: int) -> None:
    w = worker(tmp_path, answer, [])
    assert not await w.sleep()
    assert w.state is WorkerState.READY
