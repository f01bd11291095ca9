"""Claude Code (`claude -p`) and the Codex CLI (`codex exec`) each complete one turn through the
gateway against a vLLM CPU worker; deploy/setup-agent-clis.sh installs them (npm).

1. One gateway serves the module, with one worker of tiny-terse (deploy/tiny_model.py
   --terse): a bigram model that answers "Hello!" and stops, greedy or sampled, with a 128k
   context. Agents send a system prompt and tools of tens of thousands of tokens, and wait for
   the end of a turn, which random weights never reach before the CLI's token limit.
2. Each CLI runs with a home of its own (no login, no user config), pointed at the gateway.
3. Each must exit 0 with the model's reply as its answer, and the gateway must have answered
   and counted its requests (metrics and the usage store), with the agent's long prompt.
"""

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes.gateway_process import bearer

from .conftest import (
    ADMIN_KEY,
    API_KEY,
    REPO,
    Engine,
    GatewayProcess,
    cpu_worker,
    record_result,
    record_timing,
)

MODEL = "coder"
REPLY = "Hello!"  # what tiny-terse answers to everything
CONTEXT = 131072
AGENT_PROMPT = 20000  # tokens at least: each CLI's system prompt, tools and context
CLI_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def clis() -> dict[str, str]:
    """CLAUDE and CODEX: the agent CLIs' executables."""
    done = subprocess.run(
        ["bash", "deploy/setup-agent-clis.sh"], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode == 3:
        pytest.skip(f"agent CLIs not installed: {done.stderr.strip()}")
    assert done.returncode == 0, f"deploy/setup-agent-clis.sh failed:\n{done.stderr[-3000:]}"
    return dict(re.findall(r"^([A-Z]+)=(.+)$", done.stdout, re.MULTILINE))


@pytest.fixture(scope="module")
def gateway(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    coder = cpu_worker(engine, MODEL)
    coder["model"] = engine.terse_model
    coder["engine_args"] = {
        **coder["engine_args"],
        "max-model-len": CONTEXT,
        # Both CLIs send tools with tool_choice auto, which vLLM takes only with a parser.
        "enable-auto-tool-choice": True,
        "tool-call-parser": "pythonic",
    }
    gw = GatewayProcess(tmp_path_factory.mktemp("agent-clis"), [coder])
    gw.start()
    try:
        record_timing("agent CLIs gateway start -> ready", gw.wait_ready())
        yield gw
    finally:
        gw.stop()


class Tally:
    """What the gateway counted for MODEL: requests answered 200 (metrics), prompt tokens
    (metrics), and the usage store's requests and prompt tokens."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.start = self.read()

    def read(self) -> dict[str, float]:
        gw = self.gateway
        usage = httpx.get(
            f"{gw.url}/admin/usage", params={"model": MODEL}, headers=bearer(ADMIN_KEY), timeout=10
        )
        usage.raise_for_status()
        rows = usage.json()["data"]
        return {
            "answered": gw.metric("enginegate_requests_total", model=MODEL, status="200") or 0,
            "prompt_tokens": gw.metric("enginegate_tokens_total", model=MODEL, kind="prompt") or 0,
            "usage_requests": sum(row["requests"] for row in rows),
            "usage_prompt_tokens": sum(row["prompt_tokens"] for row in rows),
        }

    def since_start(self) -> dict[str, float]:
        """The counts' growth since the tally began, once the usage store has the requests
        the metrics count (it is written in batches, every half second)."""
        deadline = time.monotonic() + 10
        while True:
            now = self.read()
            grown = {name: now[name] - self.start[name] for name in now}
            if grown["usage_requests"] >= grown["answered"] or time.monotonic() > deadline:
                return grown
            time.sleep(0.5)


def routes(gateway: GatewayProcess) -> list[str]:
    """The POSTs the worker answered, in order, from its access log ("POST /v1/messages")."""
    logs = sorted((gateway.state_dir / "logs").glob("*.log"))
    text = "".join(path.read_text(errors="replace") for path in logs)
    return re.findall(r'"(POST /v1/[^ ?"]+)[^"]*" 200', text)


def run_cli(argv: list[str], env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    """The CLI with a home of its own (no user config, no login), no stdin."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TERM")}
    started = time.monotonic()
    done = subprocess.run(
        argv,
        cwd=home,
        env={**keep, "HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    record_timing(f"{Path(argv[0]).name} {argv[1]}: one turn", time.monotonic() - started)
    return done


def check_counted(tally: Tally, client: str, seen_before: int) -> None:
    """The gateway answered and counted the client's requests, the agent's long prompt too."""
    grown = tally.since_start()
    sent = routes(tally.gateway)[seen_before:]
    record_result(f"{client}: worker answered", json.dumps(sent))
    record_result(f"{client}: gateway counted", json.dumps(grown))
    assert grown["answered"] >= 1, grown
    assert grown["usage_requests"] == grown["answered"], grown
    assert grown["prompt_tokens"] >= AGENT_PROMPT, grown
    assert grown["usage_prompt_tokens"] == grown["prompt_tokens"], grown
    assert len(sent) == grown["answered"], (sent, grown)


def test_claude_code_completes_a_turn(
    clis: dict[str, str], gateway: GatewayProcess, tmp_path: Path
) -> None:
    tally, seen = Tally(gateway), len(routes(gateway))
    env = {
        "ANTHROPIC_BASE_URL": gateway.url,
        "ANTHROPIC_API_KEY": API_KEY,
        "ANTHROPIC_MODEL": MODEL,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": MODEL,
        "ANTHROPIC_SMALL_FAST_MODEL": MODEL,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    argv = [clis["CLAUDE"], "-p", "Say hello.", "--output-format", "json", "--max-turns", "1"]
    done = run_cli(argv, env, tmp_path)
    assert done.returncode == 0, f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    result = json.loads(done.stdout)
    record_result("claude -p result", json.dumps(pick(result, "subtype", "result", "usage")))
    assert result["type"] == "result" and result["is_error"] is False, result
    assert result["result"] == REPLY, result
    assert all(route == "POST /v1/messages" for route in routes(gateway)[seen:])
    check_counted(tally, "claude -p", seen)


def test_codex_exec_completes_a_turn(
    clis: dict[str, str], gateway: GatewayProcess, tmp_path: Path
) -> None:
    tally, seen = Tally(gateway), len(routes(gateway))
    codex_home = tmp_path / "codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(
        f"""model = "{MODEL}"
model_provider = "enginegate"
model_context_window = {CONTEXT}

[model_providers.enginegate]
name = "enginegate"
base_url = "{gateway.url}/v1"
env_key = "ENGINEGATE_API_KEY"
wire_api = "responses"
"""
    )
    env = {"CODEX_HOME": str(codex_home), "ENGINEGATE_API_KEY": API_KEY}
    argv = [clis["CODEX"], "exec", "--skip-git-repo-check", "--json", "Say hello."]
    done = run_cli(argv, env, tmp_path)
    assert done.returncode == 0, f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    record_result("codex exec events", json.dumps([event.get("type") for event in events]))
    ended = [event for event in events if event.get("type") == "turn.completed"]
    assert len(ended) == 1, events
    record_result("codex exec turn.completed", json.dumps(ended[0])[:300])
    said = [
        event["item"].get("text")
        for event in events
        if event.get("type") == "item.completed" and event["item"].get("type") == "agent_message"
    ]
    assert said == [REPLY], events
    assert all(route == "POST /v1/responses" for route in routes(gateway)[seen:])
    check_counted(tally, "codex exec", seen)


def pick(mapping: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: mapping.get(key) for key in keys}
