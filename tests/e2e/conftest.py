"""The e2e tier: one real gateway with real vLLM CPU workers, shared by the session.

`bash deploy/setup-cpu-engine.sh` provides the engine venv and the models: tiny random-weight
ones and SmolLM2-135M-Instruct (it installs them on first use). The shared gateway serves two
workers, `tiny` (tp=1) and `tiny-tp2` (tp=2); tests that need a gateway of their own start
one with `GatewayProcess`. Whatever happens in a test, teardown ends every process a gateway
started.

Timings measured on the way (start → ready, restart after kill -9, ...) are printed in the
terminal summary.
"""

import re
import secrets
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from fakes import gateway_process
from fakes.gateway_process import REPO, STOP_GRACE

API_KEY = f"sk-e2e-{secrets.token_hex(8)}"
ADMIN_KEY = f"sk-e2e-admin-{secrets.token_hex(8)}"  # /admin, /ui
METRICS_TOKEN = f"e2e-metrics-{secrets.token_hex(8)}"  # /metrics, /metrics/workers
READY_TIMEOUT = 420.0  # two CPU engines starting side by side on two cores

# Runs after every other test of the session: it stops the shared gateway.
ENDS_GATEWAY = "e2e_ends_gateway"

TIMINGS: dict[str, float] = {}
RESULTS: dict[str, str] = {}  # measurements other than timings, e.g. prefix-cache hit rates


@dataclass(frozen=True)
class Engine:
    python: str
    model: str
    r1_model: str = ""  # DeepSeek-R1 style chat template (tests/e2e/test_clients.py)
    embed_model: str = ""  # a BERT for /v1/embeddings
    ds_model: str = ""  # random DeepseekV3ForCausalLM (MLA + MoE), R1 template
    smollm2_model: str = ""  # SmolLM2-135M-Instruct, real weights (tests/e2e/test_real_model.py)
    terse_model: str = ""  # answers "Hello!" and stops, 128k context (tests/e2e/test_agent_clis.py)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{ENDS_GATEWAY}: stops the shared e2e gateway, so it runs last"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the tests that stop the shared gateway to the end, whatever the file order."""
    last = [item for item in items if item.get_closest_marker(ENDS_GATEWAY)]
    if last:
        items[:] = [item for item in items if item not in last] + last


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("e2e timings")
        for what, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{what}: {seconds:.1f} s")
    if RESULTS:
        terminalreporter.section("e2e results")
        for what, value in RESULTS.items():
            terminalreporter.write_line(f"{what}: {value}")


def record_timing(what: str, seconds: float) -> None:
    TIMINGS[what] = seconds
    print(f"\n[e2e timing] {what}: {seconds:.1f} s", flush=True)


def record_result(what: str, value: str) -> None:
    RESULTS[what] = value
    print(f"\n[e2e result] {what}: {value}", flush=True)


class GatewayProcess(gateway_process.GatewayProcess):
    """The shared harness with this tier's keys and token; `gateway` and `env` as there."""

    def __init__(
        self,
        workdir: Path,
        models: list[dict[str, Any]],
        stop_grace: float = STOP_GRACE,
        **options: Any,
    ) -> None:
        keys = {"api_key": API_KEY, "admin_key": ADMIN_KEY, "metrics_token": METRICS_TOKEN}
        options = {**keys, **options}
        super().__init__(workdir, models, stop_grace=stop_grace, **options)


def cpu_worker(engine: Engine, name: str, tp: int = 1) -> dict:
    """A `models:` entry for one vLLM CPU worker of the tiny model."""
    return {
        "name": name,
        "backend": "vllm",
        "model": engine.model,
        "device": "cpu",
        "tp": tp,
        "command": [engine.python, "-m", "vllm.entrypoints.openai.api_server"],
        "engine_args": {"max-model-len": 512, "enforce-eager": True},
        "startup_timeout": READY_TIMEOUT,
    }


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The vLLM CPU venv and the tiny model, installed by the setup script if missing."""
    done = subprocess.run(
        ["bash", "deploy/setup-cpu-engine.sh"], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(
            f"deploy/setup-cpu-engine.sh failed with {done.returncode}:\n{done.stderr[-4000:]}"
        )
    values = dict(
        line.split("=", 1) for line in done.stdout.splitlines() if re.match(r"^[A-Z0-9_]+=", line)
    )
    return Engine(
        python=values["ENGINE_PYTHON"],
        model=values["TINY_MODEL"],
        r1_model=values.get("TINY_R1_MODEL", ""),
        embed_model=values.get("TINY_EMBED_MODEL", ""),
        ds_model=values.get("TINY_DS_MODEL", ""),
        smollm2_model=values.get("SMOLLM2_MODEL", ""),
        terse_model=values.get("TINY_TERSE_MODEL", ""),
    )


@pytest.fixture(scope="session")
def gateway(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The shared gateway: `tiny` (tp=1) and `tiny-tp2` (tp=2), both ready."""
    gw = GatewayProcess(
        tmp_path_factory.mktemp("gateway"),
        [cpu_worker(engine, "tiny"), cpu_worker(engine, "tiny-tp2", tp=2)],
    )
    gw.start()
    try:
        record_timing("shared gateway start -> ready (tiny + tiny-tp2)", gw.wait_ready())
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def running_gateway(gateway: GatewayProcess) -> GatewayProcess:
    """The shared gateway, failing clearly if a test already stopped it."""
    if not gateway.is_running:
        pytest.fail(f"the shared gateway has exited ({gateway.proc.returncode}); see its log")
    return gateway


@pytest.fixture
def client(running_gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with running_gateway.client() as sdk:
        yield sdk


@pytest.fixture
def start_gateway(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., GatewayProcess]]:
    """Start a gateway of the test's own with CPU workers given as (name, tp); not waited on.

    `models=[...]` adds other `models:` entries; other keywords go to `GatewayProcess`, e.g.
    `gateway={"drain_timeout": 5}` or `env={...}`. Every gateway started this way is stopped,
    and its tree ended, when the test ends.
    """
    started: list[GatewayProcess] = []

    def start(
        *workers: tuple[str, int], models: Sequence[dict[str, Any]] = (), **options: Any
    ) -> GatewayProcess:
        gw = GatewayProcess(
            tmp_path_factory.mktemp("own-gateway"),
            [*(cpu_worker(engine, name, tp) for name, tp in workers), *models],
            **options,
        )
        started.append(gw)
        gw.start()
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def timings() -> Callable[[str, float], None]:
    """record(what, seconds): shown in the terminal summary."""
    return record_timing
