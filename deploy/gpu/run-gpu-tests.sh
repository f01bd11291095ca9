#!/usr/bin/env bash
# On a GPU machine, from the repo root: install an engine's wheel set (ENGINE: vllm, the
# default, sglang or lmdeploy; parts in PARTS_DIR, default /tmp/parts), run tests/gpu with it
# (tests of the other engines skip; tests/gpu/test_engines_gpu.py runs for ENGINE), and leave
# what the run measured in OUT.
#
#   OUT=/some/folder [ENGINE=sglang] bash deploy/gpu/run-gpu-tests.sh [PYTEST ARGS...]
#
# OUT gets env.txt (versions, GPUs), results.json (the figures), nvidia-smi.txt (snapshots
# along the run) and logs.tgz (every gateway's config and log, every worker's log).
# GPU_TEST_DEADLINE (s from the start, default 540): pytest gets SIGINT then, so it still
# stops its gateways and prints its summary inside a 10-minute limit.
# GPU_TESTS (default tests/gpu): the modules to run, e.g. tests/gpu/test_layouts_gpu.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/enginegate-gpu-out}
work=${ENGINEGATE_GPU_WORKDIR:-/tmp/enginegate-gpu}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

started=$(date +%s)
engine=${ENGINE:-vllm}
exports=$(bash deploy/gpu/install-wheels.sh "$engine") || exit 1
eval "$exports"
export PYTHONPATH=$PWD:$PYTHONPATH
echo "run: wheels ready after $(($(date +%s) - started)) s"

{
  nvidia-smi
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv
  uname -r
  nproc
  python3 - <<'EOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "vllm", "sglang", "sglang-kernel", "flashinfer-python", "lmdeploy",
             "transformers", "tokenizers", "triton", "nvidia-ml-py",
             "pytest", "pytest-asyncio", "fastapi", "uvicorn", "pydantic", "openai", "httpx"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
import torch
print("torch.cuda", torch.version.cuda, "devices", torch.cuda.device_count(), torch.__file__)
EOF
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

export ENGINEGATE_GPU_RESULTS=$out ENGINEGATE_GPU_WORKDIR=$work ENGINEGATE_GPU_ENGINE=$engine
export ENGINEGATE_GPU_MODEL=${ENGINEGATE_GPU_MODEL:-$work/tiny-qwen2}
left=$((${GPU_TEST_DEADLINE:-540} - ($(date +%s) - started)))
# shellcheck disable=SC2086 # GPU_TESTS may name several paths
timeout -s INT "$left" python3 -m pytest ${GPU_TESTS:-tests/gpu} -m gpu -v -rA -s \
  -p no:cacheprovider "$@"
status=$?
tar -czf "$out/logs.tgz" -C "$work" --exclude=tiny-qwen2 . 2>/dev/null
echo "run: pytest exit $status after $(($(date +%s) - started)) s; results in $out"
exit $status
