"""Health checks: a missed probe is tolerated, several in a row take a worker out of rotation.

An `external` worker (probed on /v1/models) against an httpx.MockTransport that can fail; no
process is started.
"""

import asyncio
from pathlib import Path

import httpx

from backends.supervisor import Supervisor, Timings, WorkerState
from gateway.config import Config, plan_workers

FAST = Timings(startup_poll=0.01, health_interval=0.01, health_timeout=1, unhealthy_after=3)


async def test_one_missed_probe_keeps_a_worker_in_rotation(tmp_path: Path) -> None:
    failing = {"left": 0}
    seen: list[WorkerState] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        if failing["left"] > 0:
            failing["left"] -= 1
            return httpx.Response(503)
        return httpx.Response(200, json={"object": "list", "data": [{"id": "remote"}]})

    config = Config.model_validate(
        {
            "gateway": {"state_dir": str(tmp_path), "api_keys": ["sk-test"]},
            "models": [
                {
                    "name": "remote",
                    "backend": "external",
                    "url": "http://up.test/v1",
                }
            ],
        }
    )
    slots = plan_workers(config, "test.yaml", gpu_count=0, cpu_cores=[0])
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    supervisor = Supervisor(
        slots, tmp_path, client, on_change=lambda w: seen.append(w.state), timings=FAST
    )
    await supervisor.start()
    try:
        assert await supervisor.wait_ready(timeout=5)
        worker = supervisor.workers[0]

        failing["left"] = 2  # two misses in a row: still ready
        while failing["left"]:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert WorkerState.UNHEALTHY not in seen
        assert worker.state is WorkerState.READY

        failing["left"] = 3  # three in a row: out of rotation, back once it answers again
        while failing["left"]:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert WorkerState.UNHEALTHY in seen
        assert worker.state is WorkerState.READY
    finally:
        await supervisor.stop()
        await client.aclose()
