"""Does the routing policy make the engines' prefix caches hit? Two real vLLM CPU replicas.

    python -m bench.routing                    both policies, full workload (~10 min here)
    python -m bench.routing --smoke            2 tenants x 3 questions (still minutes: engines)

For each policy (`least_outstanding`, `prefix_affinity`) a fresh enginegate starts two vLLM CPU
replicas of the tiny model (`bash deploy/setup-cpu-engine.sh` provides engine and model), so
every policy starts with cold caches. The workload: several tenants, each with its own long
system prompt, ask many short questions, interleaved at random (seeded), a few at a time.

Figures per policy: the prefix-cache hit rate from vLLM's own counters
(`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`, in tokens, summed over the
workers' /metrics, read through each worker's Unix socket from GET /admin/workers), requests
per worker, and time to first token p50/p99 as the client sees it. `--kv-blocks N` caps each
engine's KV cache (`num-gpu-blocks-override`) so that one replica cannot hold every tenant's
prompt, which is where the policies part ways; without it both end up with everything cached
everywhere.
"""

import argparse
import asyncio
import datetime
import json
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.contenders import ADMIN_KEY, API_KEY, free_port
from bench.load import percentiles
from bench.procs import Process, commit, machine

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
POLICIES = ("least_outstanding", "prefix_affinity")
COUNTERS = ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries", "vllm:request_success")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()


def engine_env() -> dict[str, str]:
    """ENGINE_PYTHON and TINY_MODEL from the setup script's KEY=VALUE lines (installs once)."""
    script = REPO / "deploy" / "setup-cpu-engine.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
    pairs = (line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def workload(tenants: int, questions: int, prompt_chars: int, seed: int) -> list[list[dict]]:
    """Chat messages for every request, tenants interleaved at random (seeded: the same list
    for every policy). tests/gpu/test_layouts_gpu.py drives the same workload on GPUs."""
    rng = random.Random(seed)
    prompts = []
    for t in range(tenants):
        words = [rng.choice(WORDS) for _ in range(prompt_chars // 5)]
        prompts.append(f"You are the assistant of tenant {t}. " + " ".join(words)[:prompt_chars])
    requests = [
        [
            {"role": "system", "content": prompts[t]},
            {"role": "user", "content": f"Question {q} from tenant {t}: {rng.choice(WORDS)}?"},
        ]
        for t in range(tenants)
        for q in range(questions)
    ]
    rng.shuffle(requests)
    return requests


def gateway_config(env: dict[str, str], policy: str, port: int, state: Path, kv_blocks: int | None
                   ) -> dict[str, Any]:  # fmt: skip
    engine_args: dict[str, Any] = {"max-model-len": 2048, "enforce-eager": True}
    if kv_blocks:
        engine_args["num-gpu-blocks-override"] = kv_blocks
    return {
        "gateway": {
            "host": "127.0.0.1",
            "port": port,
            "api_keys": [API_KEY],
            "admin_keys": [ADMIN_KEY],
            "state_dir": str(state),
        },  # fmt: skip
        "models": [
            {
                "name": "tiny",
                "backend": "vllm",
                "model": env["TINY_MODEL"],
                "device": "cpu",
                "replicas": 2,
                "routing": policy,
                "command": [env["ENGINE_PYTHON"], "-m", "vllm.entrypoints.openai.api_server"],
                "engine_args": engine_args,
            }
        ],  # fmt: skip
    }


def worker_counters(base: str) -> dict[str, dict[str, float]]:
    """worker id → the counters above, read from each worker's own /metrics."""
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    workers = httpx.get(f"{base}/admin/workers", headers=admin, timeout=10).json()["data"]
    out = {}
    for worker in workers:
        text = engine_metrics(worker)
        values = dict.fromkeys(COUNTERS, 0.0)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name.removesuffix("_total")
                if name in values and sample.name.endswith("_total"):
                    values[name] += sample.value
        out[worker["id"]] = values
    return out


def engine_metrics(worker: dict[str, Any]) -> str:
    """The engine's own /metrics (vLLM's needs no key), through its Unix socket: vLLM workers
    listen on no TCP port."""
    transport = httpx.HTTPTransport(uds=worker["socket"])
    with httpx.Client(transport=transport, timeout=10, trust_env=False) as client:
        return client.get("http://localhost/metrics").text


async def drive(base: str, requests: list[list[dict]], concurrency: int) -> list[float]:
    """Stream every request (max 4 tokens); the time to the first content chunk of each."""
    headers = {"authorization": f"Bearer {API_KEY}"}
    queue: asyncio.Queue[list[dict]] = asyncio.Queue()
    for messages in requests:
        queue.put_nowait(messages)
    ttfts: list[float] = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=300) as client:

        async def worker() -> None:
            while not queue.empty():
                messages = queue.get_nowait()
                body = {
                    "model": "tiny",
                    "messages": messages,
                    "max_tokens": 4,
                    "stream": True,
                    "temperature": 0,
                }
                start = time.perf_counter()
                first = None
                async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                    answer.raise_for_status()
                    async for line in answer.aiter_lines():
                        if first is None and line.startswith("data: {"):
                            first = time.perf_counter() - start
                if first is not None:
                    ttfts.append(first)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts


def run_policy(env: dict[str, str], policy: str, args: argparse.Namespace, tmp: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = gateway_config(env, policy, port, tmp / policy, args.kv_blocks)
    path = tmp / f"{policy}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "gateway", "serve", "-c", str(path)]
    gateway = Process(policy, argv, {"PYTHONUNBUFFERED": "1"}, None, tmp / f"{policy}.log")
    try:
        started = time.monotonic()
        while not _is_ready(base):
            if gateway.popen.poll() is not None or time.monotonic() - started > args.ready_timeout:
                raise RuntimeError(f"gateway not ready: {gateway.tail()}")
            time.sleep(1)
        ready_s = time.monotonic() - started
        requests = workload(args.tenants, args.questions, args.prompt_chars, args.seed)
        before = worker_counters(base)
        start = time.perf_counter()
        ttfts = asyncio.run(drive(base, requests, args.concurrency))
        elapsed = time.perf_counter() - start
        after = worker_counters(base)
    finally:
        gateway.stop()
    deltas = {w: {k: after[w][k] - before[w][k] for k in COUNTERS} for w in after}
    hits = sum(d["vllm:prefix_cache_hits"] for d in deltas.values())
    queries = sum(d["vllm:prefix_cache_queries"] for d in deltas.values())
    return {
        "ready_s": round(ready_s, 1),
        "requests": len(requests),
        "elapsed_s": round(elapsed, 2),
        "hit_rate": hits / queries if queries else None,
        "hit_tokens": hits,
        "query_tokens": queries,
        "requests_per_worker": {w: d["vllm:request_success"] for w, d in deltas.items()},
        "ttft_ms": percentiles(ttfts),
    }


def _is_ready(base: str) -> bool:
    """Every worker ready (the gateway's /ready is 200 as soon as one replica per model is)."""
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    try:
        workers = httpx.get(f"{base}/admin/workers", headers=admin, timeout=5).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return bool(workers) and all(w["state"] == "ready" for w in workers)


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"{report['date']}, commit {report['commit']}, {report['machine']['cpu']} "
        f"({report['machine']['cores']} cores); {s['tenants']} tenants x {s['questions']} "
        f"questions, system prompts of {s['prompt_chars']} chars, concurrency {s['concurrency']}"
        + (f", KV cache capped at {s['kv_blocks']} blocks" if s["kv_blocks"] else ""),
        "",
        "| policy | prefix-cache hit rate | requests per worker | TTFT p50 ms | TTFT p99 ms |",
        "|---|---:|---|---:|---:|",
    ]
    for policy, r in report["policies"].items():
        if "error" in r:
            lines.append(f"| {policy} | failed: {r['error'][:200]} | | | |")
            continue
        spread = " / ".join(f"{v:.0f}" for v in r["requests_per_worker"].values())
        rate = f"{r['hit_rate']:.1%}" if r["hit_rate"] is not None else "-"
        ttft = r["ttft_ms"] or {}
        p50, p99 = ttft.get("p50", 0), ttft.get("p99", 0)
        lines.append(f"| {policy} | {rate} | {spread} | {p50:.1f} | {p99:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 tenants x 3 questions")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--prompt-chars", type=int, default=1500, help="system prompt length")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--kv-blocks", type=int, help="cap each engine's KV cache (blocks)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--ready-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.tenants, args.questions = 2, 3
    env = engine_env()
    settings = {
        k: getattr(args, k)
        for k in ("tenants", "questions", "prompt_chars", "concurrency", "kv_blocks", "seed")
    }
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "settings": settings,
        "policies": {},
    }
    with tempfile.TemporaryDirectory(prefix="enginegate-routing-") as tmp:
        for policy in args.policies:
            print(f"{policy}: starting 2 vLLM CPU replicas", file=sys.stderr, flush=True)
            try:
                report["policies"][policy] = run_policy(env, policy, args, Path(tmp))
            except (RuntimeError, httpx.HTTPError) as exc:
                frames = traceback.extract_tb(exc.__traceback__)
                where = [f for f in frames if f.filename == __file__][-1]
                error = f"{type(exc).__name__}: {exc} (at {where.name}:{where.lineno})"
                report["policies"][policy] = {"error": error}
            print(f"  {report['policies'][policy]}", file=sys.stderr, flush=True)
    suffix = "-smoke" if args.smoke else ""
    out = args.out or RESULTS / f"routing-{report['date'][:10]}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(render(report))
    print(f"\nJSON: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
