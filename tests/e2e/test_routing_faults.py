"""Replicas, routing and failures against real vLLM CPU engines (issue 5).

One model, `tiny`, with two replicas (tp=1 each, enforce-eager). A CPU engine takes 40-90 s to
start and two cores carry two engines at most, so this module runs one gateway of its own at a
time (`Fleet`) and starts a second one only where the routing policy has to change, in the
middle of the prefix-cache test. The tests are ordered so that this happens once:

1. a `least_outstanding` gateway: load over both replicas, client disconnects, kill -9 of an
   engine, then the least_outstanding half of the prefix-cache test;
2. a `prefix_affinity` gateway: the other half of that test, then the drain on SIGTERM, which
   ends it.

Each test asks the fleet for the policy it needs (or for any), so a test run alone still works.
max-model-len is 2048, not 512: the kill, disconnect and SIGTERM tests need a stream that
lasts several seconds (1,900 tokens), and a 480-token one ends in about 1.5 s, no longer than
a scrape of /metrics takes while the other engine hogs both cores.

Engine counters come from vLLM's own /metrics, fetched through the gateway's
/metrics/workers, which labels every sample with the worker it came from.
"""

import json
import os
import random
import secrets
import select
import signal
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h11
import httpx
import psutil
import pytest
from fakes.metrics import samples

from .conftest import (
    Engine,
    GatewayProcess,
    cpu_worker,
    record_result,
    record_timing,
)

MODEL = "tiny"
LONG = 1900  # tokens: a stream of 5-15 s on two busy cores
RUNNING = "vllm:num_requests_running"
GENERATED = "vllm:generation_tokens_total"
SUCCEEDED = "vllm:request_success_total"
CACHE_HITS = "vllm:prefix_cache_hits_total"
CACHE_QUERIES = "vllm:prefix_cache_queries_total"
RESTART_TIMEOUT = 300.0
# Words the tiny model's tokenizer was trained on (deploy/tiny_model.py): ~1.4 tokens each.
WORDS = (
    "the quick brown fox jumps over lazy dog hello how are you today think step by step "
    "question answer model parallel tensor pipeline"
).split()


class Fleet:
    """At most one gateway of this module at a time: `tiny`, two replicas, one policy."""

    def __init__(self, engine: Engine, tmp: pytest.TempPathFactory) -> None:
        self.engine = engine
        self.tmp = tmp
        self.gateway: GatewayProcess | None = None
        self.policy = ""

    def get(self, policy: str | None = None) -> GatewayProcess:
        """A gateway routing by `policy` (any when None) with both replicas ready; stops the
        other one first."""
        gw = self.gateway
        if gw is not None and gw.is_running and policy in (None, self.policy):
            # A test before may have left a replica restarting (a failed kill -9 test once
            # left the prefix-cache test one replica).
            wait_for(lambda: all_ready(gw), RESTART_TIMEOUT, "both replicas ready")
            return gw
        self.stop()
        self.policy = policy or "least_outstanding"
        model = {
            **cpu_worker(self.engine, MODEL),
            "replicas": 2,
            "routing": self.policy,
            "engine_args": {"max-model-len": 2048, "enforce-eager": True},
        }
        self.gateway = gw = GatewayProcess(self.tmp.mktemp(self.policy), [model])
        gw.start()
        # /ready needs one replica per model; these tests need both (a CI run once sent all
        # 200 requests of the load test to the one that was up).
        ready = gw.wait_ready()
        ready += wait_for(lambda: all_ready(gw), RESTART_TIMEOUT, "both replicas ready")
        record_timing(f"{self.policy} gateway (tiny x2) start -> both replicas ready", ready)
        return gw

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None


@pytest.fixture(scope="module")
def fleet(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(engine, tmp_path_factory)
    try:
        yield fleet
    finally:
        fleet.stop()


def all_ready(gw: GatewayProcess) -> bool:
    """Every replica ready and idle (a failed test before may have left a stream running)."""
    return all(w["state"] == "ready" and w["in_flight"] == 0 for w in workers(gw).values())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(content: str, max_tokens: int, **fields: object) -> dict[str, object]:
    messages = [{"role": "user", "content": content}]
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, **fields}


def engine_totals(gw: GatewayProcess, name: str, **labels: str) -> dict[str, float]:
    """Samples `name` (with `labels`) of every ready engine's /metrics, summed per worker."""
    page = httpx.get(
        f"{gw.url}/metrics/workers", headers=bearer(gw.metrics_token), timeout=30, trust_env=False
    ).text
    totals: dict[str, float] = defaultdict(float)
    for sample in samples(page, name, **labels):
        totals[sample.labels["worker"]] += sample.value
    return dict(totals)


def engine_total(gw: GatewayProcess, name: str, **labels: str) -> float:
    return sum(engine_totals(gw, name, **labels).values())


def engines_running(gw: GatewayProcess) -> float | None:
    """Requests the engines are running, or None when one engine left the scrape out (a busy
    engine can miss the scrape's timeout, and its requests would look finished)."""
    running = engine_totals(gw, RUNNING)
    return sum(running.values()) if len(running) == len(workers(gw)) else None


def workers(gw: GatewayProcess) -> dict[str, dict]:
    """GET /admin/workers, by worker id."""
    listed = httpx.get(
        f"{gw.url}/admin/workers", headers=bearer(gw.admin_key), timeout=30, trust_env=False
    ).json()
    return {w["id"]: w for w in listed["data"]}


def wait_for(check, timeout: float, what: str, poll: float = 0.1) -> float:
    """Seconds until check() is true; fails naming `what` after `timeout`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(poll)
    return time.monotonic() - started


class RawCall:
    """One POST over a plain socket, so the test decides when the client hangs up."""

    def __init__(self, gw: GatewayProcess, body: dict[str, object]) -> None:
        content = json.dumps(body).encode()
        headers = [
            ("host", "127.0.0.1"),
            ("content-type", "application/json"),
            ("content-length", str(len(content))),
            *bearer(gw.api_key).items(),
        ]
        self.conn = h11.Connection(h11.CLIENT)
        self.sock = socket.create_connection(("127.0.0.1", gw.port), timeout=120)
        request = h11.Request(method="POST", target="/v1/chat/completions", headers=headers)
        parts = (request, h11.Data(data=content), h11.EndOfMessage())
        self.sock.sendall(b"".join(self.conn.send(part) or b"" for part in parts))
        self.status: int | None = None
        self.body = b""
        self.is_complete = False

    def read(self, until: bytes | None = None) -> bytes:
        """Read the response until `until` appears in the body, or to its end."""
        while not self.is_complete and (until is None or until not in self.body):
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                self.status = event.status_code
            elif isinstance(event, h11.Data):
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self.is_complete = True
        return self.body

    def has_answer(self) -> bool:
        """Whether the gateway has sent anything yet: it sends a whole answer in one piece,
        once the engine is done with it."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def close(self) -> None:
        self.sock.close()


class StreamReader(threading.Thread):
    """Reads one streamed chat completion to its end in the background."""

    def __init__(self, gw: GatewayProcess, body: dict[str, object]) -> None:
        super().__init__(daemon=True)
        self.url = f"{gw.url}/v1/chat/completions"
        self.headers = bearer(gw.api_key)
        self.body = body
        self.started = threading.Event()  # set at the first event (or on failure)
        self.status: int | None = None
        self.raw = b""
        self.failure: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", self.url, json=self.body, headers=self.headers, timeout=120, trust_env=False
            ) as response:
                self.status = response.status_code
                for chunk in response.iter_raw():
                    self.raw += chunk
                    if b"\n\n" in self.raw:
                        self.started.set()
        except httpx.HTTPError as exc:
            self.failure = exc
        finally:
            self.started.set()

    def events(self) -> list[bytes]:
        return [e.removeprefix(b"data: ") for e in self.raw.split(b"\n\n") if e]


def sse_error(events: list[bytes]) -> dict | None:
    """The OpenAI-shaped error event of a stream, if it has one."""
    for event in events:
        if event.startswith(b'{"error"'):
            return json.loads(event)["error"]
    return None


@pytest.mark.e2e
def test_two_replicas_answer_200_requests_from_20_clients(fleet: Fleet) -> None:
    """1. 20 clients send 10 requests each; 2. every one is answered 200; 3. each replica's own
    vLLM counted some of them, and the two counts add up to 200."""
    gw = fleet.get("least_outstanding")
    before = engine_totals(gw, SUCCEEDED)

    def client(number: int) -> list[int]:
        with httpx.Client(timeout=120, trust_env=False) as http:
            return [
                http.post(
                    f"{gw.url}/v1/chat/completions",
                    json=chat(f"Client {number} request {i}: hello", max_tokens=8),
                    headers=bearer(gw.api_key),
                ).status_code
                for i in range(10)
            ]

    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        statuses = Counter(s for batch in pool.map(client, range(20)) for s in batch)
    record_timing("200 requests from 20 clients over 2 replicas", time.monotonic() - started)

    assert statuses == {200: 200}
    after = engine_totals(gw, SUCCEEDED)
    served = {w: after[w] - before.get(w, 0) for w in after}
    record_result("requests per replica (200 from 20 clients)", str(served))
    assert set(served) == {"tiny-0", "tiny-1"}
    assert min(served.values()) > 0, served
    assert sum(served.values()) == 200, served


def settled_total(gw: GatewayProcess, name: str, **labels: str) -> float:
    """vLLM counts a finished request a moment after its answer went out (a CI run saw the
    previous test's last request land after the baseline): read until two reads agree."""
    last = engine_total(gw, name, **labels)
    for _ in range(20):
        time.sleep(0.5)
        now = engine_total(gw, name, **labels)
        if now == last:
            return now
        last = now
    return last


@pytest.mark.e2e
@pytest.mark.parametrize("is_stream", [True, False], ids=["stream", "whole"])
def test_client_disconnect_aborts_the_engine_request(fleet: Fleet, is_stream: bool) -> None:
    """1. Ask for LONG tokens; 2. hang up once the engine is generating (at the first event of
    a stream; a moment after sending for a whole answer, tried again at another moment if
    that was before the first token or after the last); 3. the
    engines' running gauge is back to 0 (within 10 s; the time is recorded); 4. the request was
    cut: fewer than LONG tokens were generated, and vLLM never counted it as finished by
    length."""
    gw = fleet.get()
    # A whole answer sends nothing until it is done, so the moment to hang up is picked by the
    # clock: while a CPU engine generates on two cores, a scrape of the engines' /metrics or
    # even the gateway's stalls for seconds (measured: 3.6 s of an 8 s answer), so no gauge
    # or counter shows the request running in time. A try that hung up before the first token
    # or after the last proves nothing and is made again at another moment; a gateway that
    # never aborts fails every try.
    tries = []
    for delay in (0.0,) if is_stream else (1.0, 0.5, 2.0, 0.25):
        tokens = settled_total(gw, GENERATED)
        finished = settled_total(gw, SUCCEEDED, finished_reason="length")
        call = RawCall(gw, chat("Tell me a long story", LONG, ignore_eos=True, stream=is_stream))
        try:
            if is_stream:
                call.read(until=b"\n\n")
                assert call.status == 200, call.body
            else:
                time.sleep(delay)
                if call.has_answer():
                    tries.append(f"{delay} s: answered whole first")
                    continue
        finally:
            call.close()
        back_to_0 = wait_for(lambda: engines_running(gw) == 0, 10, "running gauge back to 0")
        generated = settled_total(gw, GENERATED) - tokens
        if is_stream or 0 < generated < LONG:
            break
        tries.append(f"{delay} s: {generated:g} of {LONG} tokens generated")
    else:
        pytest.fail(f"no try was cut while the engine generated: {tries}")

    kind = "stream" if is_stream else "whole answer"
    record_timing(f"client hangs up ({kind}) -> vllm:num_requests_running 0", back_to_0)
    record_result(f"client hangs up ({kind}): tokens generated of {LONG}", f"{generated:g}")
    # Cut short, not finished: how early depends on how long this 2-core machine stalls while
    # the engine generates (1490 of 1900 tokens once in CI), so it is recorded, not asserted.
    assert generated < LONG, generated
    assert engine_total(gw, SUCCEEDED, finished_reason="length") == finished


@pytest.mark.e2e
def test_kill_9_of_one_engine_loses_no_request(fleet: Fleet) -> None:
    """1. Start one long stream on each replica; 2. kill -9 the engine (API server) of the
    victim (tiny-0, or the replica whose stream still runs); 3. eight clients send requests
    in a loop for 5 s; 4. every one is answered 200, those sent to the victim by a retry on
    the other replica (counted); 5. the victim's stream ends with an error event and [DONE],
    the other stream ends whole; 6. the victim comes back and answers requests again."""
    gw = fleet.get()
    metric = "enginegate_retries_total"
    retries = gw.metric(metric, model=MODEL) or 0.0

    # One stream per replica: least outstanding sends the second to the idle replica. On a
    # busy 2-core machine one stream (~2-4 s) has at times ended before the other sent its
    # first token; the victim is then the replica whose stream still runs, and the one that
    # ended must have ended whole. Tried up to 3 times.
    for _ in range(3):
        wait_for(lambda: all_ready(gw), 180, "both replicas ready and idle")
        streams = [
            StreamReader(gw, chat(f"Stream {i}", LONG, ignore_eos=True, stream=True))
            for i in (0, 1)
        ]
        for stream in streams:
            stream.start()
        for i, stream in enumerate(streams):
            assert stream.started.wait(60), f"stream {i} sent nothing in 60 s"
        placed = {w["id"]: w["in_flight"] for w in workers(gw).values()}
        if sorted(placed.values()) in ([0, 1], [1, 1]):
            break
        for stream in streams:
            stream.join(120)
    assert sorted(placed.values()) in ([0, 1], [1, 1]), [
        (placed, s.status, s.failure, s.raw[:300]) for s in streams
    ]
    victim_id = next(w for w, n in placed.items() if n == 1)
    victim = workers(gw)[victim_id]
    guard = psutil.Process(victim["pid"])
    engine = min(guard.children(), key=lambda p: p.create_time())

    stop = threading.Event()
    statuses: Counter[int] = Counter()

    def client(number: int) -> None:
        with httpx.Client(timeout=120, trust_env=False) as http:
            for i in range(10_000):
                if stop.is_set():
                    return
                body = chat(f"Client {number} request {i}", max_tokens=16)
                url = f"{gw.url}/v1/chat/completions"
                statuses[http.post(url, json=body, headers=bearer(gw.api_key)).status_code] += 1

    # At once: a LONG stream can end within 2 s on a quiet engine, and once it has ended the
    # kill cannot cut it. The supervisor notices the dead engine only when its guard exits
    # (up to 5 s later), so the flood still finds the victim "ready" and refusing connections.
    alive = [s.is_alive() for s in streams]
    os.kill(engine.pid, signal.SIGKILL)
    killed = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        flood = [pool.submit(client, n) for n in range(8)]
        time.sleep(5)  # traffic goes on while the victim is down
        stop.set()
        for future in flood:
            future.result()
    for stream in streams:
        stream.join(120)
    assert any(alive), (
        "both streams ended before the kill: the test proved nothing",
        [(s.status, s.failure, len(s.events()), s.raw[-200:]) for s in streams],
    )

    retried = (gw.metric(metric, model=MODEL) or 0.0) - retries
    record_result(f"kill -9 of {victim_id}: non-streaming requests answered", str(dict(statuses)))
    record_result(f"kill -9 of {victim_id}: requests retried on the other", f"{retried:.0f}")
    assert set(statuses) == {200}, statuses
    assert retried >= 1, "no request was caught on the killed engine: the test proved nothing"
    endings = sorted((sse_error(s.events()) is not None, s.events()[-1]) for s in streams)
    assert endings == [(False, b"[DONE]"), (True, b"[DONE]")], [s.events()[-3:] for s in streams]
    cut = next(s for s in streams if sse_error(s.events()))
    assert sse_error(cut.events())["type"] == "upstream_error"
    whole = next(s for s in streams if not sse_error(s.events()))
    assert b'"finish_reason":"length"' in whole.raw

    def is_back(worker: dict) -> bool:  # restarted, not merely not noticed dead yet
        return worker["restarts"] == victim["restarts"] + 1 and worker["state"] == "ready"

    wait_for(lambda: is_back(workers(gw)[victim_id]), RESTART_TIMEOUT, f"{victim_id} restarted")
    record_timing(f"kill -9 of {victim_id}'s engine -> ready again", time.monotonic() - killed)
    url = f"{gw.url}/v1/chat/completions"
    with httpx.Client(timeout=120, trust_env=False, headers=bearer(gw.api_key)) as http:
        for i in range(6):  # idle replicas take turns
            reply = http.post(url, json=chat(f"After the restart {i}", max_tokens=4))
            assert reply.status_code == 200, reply.text
    assert engine_totals(gw, SUCCEEDED).get(victim_id, 0) >= 1, f"{victim_id} takes no traffic"


def prefix_workload(gw: GatewayProcess, run: str) -> float:
    """4 groups of 4 requests, one group after the other; in a group the requests share a
    system prompt of ~420 tokens (3 of vLLM's 128-token CPU blocks, far over the policy's
    512 characters) and differ in a short question. Returns the engines' prefix-cache hit
    rate over the run. `run` starts every prompt, so no run can hit another's cache."""
    rng = random.Random(run)
    hits, queries = engine_total(gw, CACHE_HITS), engine_total(gw, CACHE_QUERIES)
    with httpx.Client(timeout=120, trust_env=False) as http:
        for group in range(4):
            system = f"Run {run}, group {group}. " + " ".join(rng.choices(WORDS, k=290))
            for question in range(4):
                messages = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Question {question}?"},
                ]
                body = {"model": MODEL, "messages": messages, "max_tokens": 1}
                reply = http.post(
                    f"{gw.url}/v1/chat/completions", json=body, headers=bearer(gw.api_key)
                )
                assert reply.status_code == 200, reply.text
    hits, queries = engine_total(gw, CACHE_HITS) - hits, engine_total(gw, CACHE_QUERIES) - queries
    assert queries > 16 * 384, queries  # every prompt is longer than three blocks
    return hits / queries


@pytest.mark.e2e
def test_prefix_affinity_raises_the_prefix_cache_hit_rate(fleet: Fleet) -> None:
    """1. The same workload (fresh prompts each run) through least_outstanding, then through
    prefix_affinity; 2. vLLM's hit rate, summed over both replicas, is clearly higher with
    prefix_affinity. least_outstanding hands an idle pair of replicas requests in turn, so each
    group's prefix is computed once per replica; prefix_affinity computes it once."""
    least = prefix_workload(fleet.get("least_outstanding"), secrets.token_hex(4))
    affine = prefix_workload(fleet.get("prefix_affinity"), secrets.token_hex(4))
    record_result("prefix-cache hit rate, least_outstanding", f"{least:.1%}")
    record_result("prefix-cache hit rate, prefix_affinity", f"{affine:.1%}")
    assert affine > least + 0.1, (least, affine)


@pytest.mark.e2e
def test_sigterm_lets_a_stream_finish_refuses_new_requests_and_exits_0(fleet: Fleet) -> None:
    """1. Start a long stream; 2. SIGTERM the gateway at its first event; 3. /ready and a new
    request get 503 at once; 4. the stream runs to its end and [DONE]; 5. the gateway exits
    with status 0. Ends this module's gateway."""
    gw = fleet.get()
    call = RawCall(gw, chat("A long story, please", LONG, ignore_eos=True, stream=True))
    call.read(until=b"\n\n")
    gw.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    with httpx.Client(timeout=30, trust_env=False) as http:
        ready = http.get(f"{gw.url}/ready")
        refused = http.post(
            f"{gw.url}/v1/chat/completions", json=chat("hi", 4), headers=bearer(gw.api_key)
        )
    assert ready.status_code == 503, ready.text
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert gw.is_running, "the gateway did not wait for the stream"

    body = call.read()
    record_timing("SIGTERM -> the stream in flight finished", time.monotonic() - signalled)
    events = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and sse_error(events) is None, events[-3:]
    assert b'"finish_reason":"length"' in body
    call.close()
    try:
        code = gw.proc.wait(gw.stop_grace + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gateway still running {gw.stop_grace + 30:.0f} s after SIGTERM\n{gw.logs()}")
    record_timing("SIGTERM -> gateway exited", time.monotonic() - signalled)
    assert code == 0, f"gateway exited with {code}\n{gw.logs()}"
    assert "Traceback" not in Path(gw.log_path).read_text(), gw.logs()
