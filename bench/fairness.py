"""Fairness between keys on a saturated model, with a real vLLM CPU worker.

    python -m bench.fairness [--requests 20] [--heavy-waiting 32] [--max-tokens 16]

A heavy key keeps `max_in_flight` (4) requests running and --heavy-waiting more in line, all
the time; a light key sends one streaming request at a time. Printed: the light key's time to
first token (p50, p99) alone, then beside the heavy key with `queueing: fifo` (first come,
first served) and with `queueing: fair` (weighted fair queueing, gateway/fair.py, and the
reserve of gateway/limits.py: a key with nothing in flight runs as one past max_in_flight,
so the light key's request goes straight to the engine as the fifth). Each mode
is its own gateway start (the line's policy is read at start), so the run takes minutes.
Needs `bash deploy/setup-cpu-engine.sh`; take the shared e2e lock around it on a shared
machine: `flock /tmp/enginegate-e2e.lock .venv/bin/python -m bench.fairness`.
"""

import argparse
import asyncio
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
HEAVY, LIGHT, ADMIN = "sk-bench-heavy-0001", "sk-bench-light-0002", "sk-bench-admin-0003"
MAX_IN_FLIGHT = 4


def engine() -> tuple[str, str]:
    """The engine's python and the tiny model, from the setup script (installs if missing)."""
    done = subprocess.run(
        ["bash", "deploy/setup-cpu-engine.sh"], cwd=REPO, capture_output=True, text=True, check=True
    )
    values = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", done.stdout, re.M))
    return values["ENGINE_PYTHON"], values["TINY_MODEL"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gateway:
    """`python -m gateway serve` with one vLLM CPU worker, in its own session."""

    def __init__(self, workdir: Path, queueing: str, python: str, model: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = {
            "gateway": {
                "port": self.port,
                "state_dir": str(workdir / "state"),
                "queueing": queueing,
                "admin_keys": [ADMIN],
                "api_keys": [{"name": "heavy", "key": HEAVY}, {"name": "light", "key": LIGHT}],
                "stop_grace": 10,
                "drain_timeout": 0,
            },
            "models": [
                {
                    "name": "tiny", "backend": "vllm", "model": model, "device": "cpu",
                    "command": [python, "-m", "vllm.entrypoints.openai.api_server"],
                    "engine_args": {
                        "max-model-len": 512, "enforce-eager": True,
                        "scheduling-policy": "priority",
                    },
                    "max_in_flight": MAX_IN_FLIGHT, "max_queue": 256, "queue_timeout": 600,
                    "startup_timeout": 600,
                }
            ],
        }  # fmt: skip
        path = workdir / "enginegate.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = (workdir / "gateway.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "-c", str(path)],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the gateway exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.base}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        sys.exit(f"not ready in {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


async def ttft(client: httpx.AsyncClient, key: str, max_tokens: int) -> float:
    """Seconds from sending a streaming request to its first content chunk."""
    body = {
        "model": "tiny", "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
    }  # fmt: skip
    started = time.perf_counter()
    first: float | None = None
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {") and '"content"' in line:
                first = time.perf_counter() - started
    assert first is not None, "no content chunk"
    return first


async def measure(base: str, requests: int, heavy_waiting: int, max_tokens: int) -> list[float]:
    """The light key's TTFTs, one request at a time, with the heavy key's flood if asked."""
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT + heavy_waiting + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        stop = asyncio.Event()

        async def flood() -> None:
            while not stop.is_set():
                await ttft(client, HEAVY, max_tokens)

        senders = MAX_IN_FLIGHT + heavy_waiting if heavy_waiting else 0
        heavy = [asyncio.create_task(flood()) for _ in range(senders)]
        if heavy:
            await asyncio.sleep(3)  # let the line fill
        try:
            await ttft(client, LIGHT, max_tokens)  # warm-up, not counted
            return [await ttft(client, LIGHT, max_tokens) for _ in range(requests)]
        finally:
            stop.set()
            for task in heavy:
                task.cancel()
            await asyncio.gather(*heavy, return_exceptions=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20, help="light-key requests per mode")
    parser.add_argument("--heavy-waiting", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    python, model = engine()
    rows = []
    for label, queueing, waiting in (
        ("alone", "fair", 0), ("fifo", "fifo", args.heavy_waiting),
        ("fair", "fair", args.heavy_waiting),
    ):  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="eg-fairness-") as tmp:
            gateway = Gateway(Path(tmp), queueing, python, model)
            try:
                gateway.wait_ready()
                times = asyncio.run(measure(gateway.base, args.requests, waiting, args.max_tokens))
            finally:
                gateway.stop()
        rows.append((label, percentile(times, 50), percentile(times, 99), statistics.mean(times)))
        print(f"{label}: done", file=sys.stderr, flush=True)
    alone = rows[0][1]
    print(
        f"light key TTFT, {args.requests} requests; heavy key: {MAX_IN_FLIGHT} in flight + "
        f"{args.heavy_waiting} waiting; max_tokens {args.max_tokens}; vLLM CPU, tiny model"
    )
    print(f"{'mode':<8}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'p50 / alone':>14}")
    for label, p50, p99, mean in rows:
        ms = f"{p50 * 1000:>10.0f}{p99 * 1000:>10.0f}{mean * 1000:>10.0f}"
        print(f"{label:<8}{ms}{p50 / alone:>14.1f}")


if __name__ == "__main__":
    main()
