#!/usr/bin/env bash
# On the offline GPU machine: join the parts that prepare-wheels.sh made, install the wheels into
# a directory of their own, and print the line that puts it on PYTHONPATH.
#
#   eval "$(bash deploy/gpu/install-wheels.sh [ENGINE])"       (default: vllm)
#
#   PARTS_DIR  where the parts ENGINE.tar.part-NN were copied (default: /tmp/parts)
#   TARGET     install directory (default: /tmp/enginegate-site/ENGINE)
#
# pip runs with --no-index --no-deps --no-compile --target: nothing is fetched, nothing in the
# image is replaced (its torch, transformers, numpy stay what they are; the engine's own version
# pins on them are broken on purpose) and the target can be thrown away. Idempotent: an
# install of the same parts is not redone. stdout is the export line alone; the rest is stderr.
set -euo pipefail
engine=${1:-vllm}
parts_dir=${PARTS_DIR:-/tmp/parts}
target=${TARGET:-/tmp/enginegate-site/$engine}
python=${PYTHON:-python3}

shopt -s nullglob
parts=("$parts_dir/$engine.tar.part-"*)
[ ${#parts[@]} -gt 0 ] || { echo "install: no $parts_dir/$engine.tar.part-* here" >&2; exit 2; }
# The parts' names and sizes identify the set (prepare-wheels.sh packs reproducibly).
stamp=$(ls -l "${parts[@]}" | awk '{print $5, $NF}' | sha1sum | cut -c1-16)

if [ ! -f "$target/.installed-$stamp" ]; then
  started=$(date +%s)
  unpacked=$(mktemp -d "${TMPDIR:-/tmp}/enginegate-wheels.XXXXXX")
  cat "${parts[@]}" | tar -xf - -C "$unpacked"
  count=$(ls "$unpacked"/*.whl | wc -l)
  if ls "$unpacked" | grep -qiE '^(torch|nvidia_(cublas|cuda_runtime|cudnn_cu|nccl))-'; then
    echo "install: the set carries torch or its CUDA libraries; refusing to shadow the image's" >&2
    exit 1
  fi
  rm -rf "$target"
  mkdir -p "$target"
  PIP_ROOT_USER_ACTION=ignore "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$target" "$unpacked"/*.whl >&2
  # Files prepare-wheels.sh carried compressed beside their wheel (PATH.zst, `/` written `%`),
  # decompressed with the set's own zstandard module (the image has no zstd binary).
  for zst in "$unpacked"/*.zst; do
    inner=$(basename "${zst%.zst}")
    PYTHONPATH=$target "$python" - "$zst" "$target/${inner//%//}" <<'EOF'
import sys, zstandard

with open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as dst:
    zstandard.ZstdDecompressor(max_window_size=2**31).copy_stream(src, dst)
EOF
  done
  rm -rf "$unpacked"
  touch "$target/.installed-$stamp"
  echo "install: $count wheels into $target in $(($(date +%s) - started)) s" >&2
fi
echo "export PYTHONPATH=$target\${PYTHONPATH:+:\$PYTHONPATH}"
