"""The `reasoning:` setting: one spelling in enginegate.yaml, each engine's own on its argv.

The engines name the same parser differently (`deepseek_r1` in vLLM, `deepseek-r1` in SGLang;
LMDeploy 0.18 folded its R1/QwQ parsers into one called `default` and keeps `deepseek-r1` only
as a deprecated alias). Names read from vllm `reasoning/__init__.py`, sglang
`srt/parser/reasoning_parser_names.py` and lmdeploy `serve/parsers/reasoning_parser/` (see
ENGINES.md section 0).

`think_tags` is for an engine (or an external server) with no parser for the model: the engine
gets no flag and the gateway splits `<think>…</think>` out of the text itself (gateway/think.py).
"""

from typing import Literal

Reasoning = Literal["deepseek_r1", "deepseek_v3", "qwen3", "think_tags"]
GATEWAY_SPLIT = "think_tags"

PARSERS: dict[str, dict[str, str]] = {
    "deepseek_r1": {"vllm": "deepseek_r1", "sglang": "deepseek-r1", "lmdeploy": "default"},
    "deepseek_v3": {"vllm": "deepseek_v3", "sglang": "deepseek-v3", "lmdeploy": "deepseek-v3"},
    "qwen3": {"vllm": "qwen3", "sglang": "qwen3", "lmdeploy": "default"},
}


def parser_name(reasoning: str | None, engine: str) -> str | None:
    """The `--reasoning-parser` value for this engine; None when the engine parses nothing."""
    if reasoning is None or reasoning == GATEWAY_SPLIT:
        return None
    return PARSERS[reasoning][engine]


def is_split_by_gateway(reasoning: str | None) -> bool:
    """Whether the gateway, not the engine, separates reasoning from content."""
    return reasoning == GATEWAY_SPLIT
