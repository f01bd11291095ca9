"""The `reasoning:` setting: one spelling in enginegate.yaml, each engine's own on its argv.

The engines name the same parser differently (`deepseek_r1` in vLLM, `deepseek-r1` in SGLang,
`default` in LMDeploy 0.18): each adapter maps our spelling to its engine's in its
`reasoning_parsers` (read from the engines' sources, see ENGINES.md section 0).

`think_tags` is for an engine (or an external server) with no parser for the model: the engine
gets no flag and the gateway splits `<think>…</think>` out of the text itself (gateway/think.py).
"""

from collections.abc import Mapping
from typing import Literal

Reasoning = Literal["deepseek_r1", "deepseek_v3", "qwen3", "think_tags"]
GATEWAY_SPLIT = "think_tags"


def parser_flag(reasoning: str | None, parsers: Mapping[str, str]) -> list[str]:
    """`--reasoning-parser NAME` with the engine's spelling from `parsers` (its adapter's);
    nothing when the engine parses nothing."""
    if reasoning is None or reasoning == GATEWAY_SPLIT:
        return []
    return ["--reasoning-parser", parsers[reasoning]]


def is_split_by_gateway(reasoning: str | None) -> bool:
    """Whether the gateway, not the engine, separates reasoning from content."""
    return reasoning == GATEWAY_SPLIT
