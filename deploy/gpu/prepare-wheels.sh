#!/usr/bin/env bash
# Download, here, the wheels an engine needs on the offline GPU machines, and pack them into
# parts of at most 60 MiB that can be carried there one at a time.
#
#   bash deploy/gpu/prepare-wheels.sh [ENGINE...]        (default: vllm)
#
# ENGINE names a list deploy/gpu/wheels-ENGINE.txt (`name==version` lines) written for the GPU
# image (torch 2.11.0+cu130, CUDA 13.0, Python 3.12): only what that image lacks. Each set also
# gets enginegate's own needs (wheels-enginegate.txt) where the engine's list lacks them.
# `models` is a set too: what deploy/real_model.py needs to build SmolLM2 there.
# Wheels whose big optional kernels the tests do not need are repacked without them (below).
#
# Result, in WHEELS_DIR (default: wheels/gpu in the repo, ignored by git):
#   ENGINE/download/   the wheels as downloaded       ENGINE/set/   the set that gets packed
#   parts/ENGINE.tar.part-00, -01, ...                ENGINE.tar of ENGINE/set/, split at 60 MiB
# On the GPU machine: bash deploy/gpu/install-wheels.sh (it joins the parts and installs them).
# Idempotent: wheels already downloaded are kept, and the parts are rebuilt only when the set
# changed. Prints one line per part.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${WHEELS_DIR:-$repo/wheels/gpu}
python=${PYTHON:-python3}
part_size=${PART_SIZE:-60M}
engines=("$@")
[ ${#engines[@]} -gt 0 ] || engines=(vllm)

# Files dropped from a wheel (prefixes inside it), per distribution:
#  - vllm: FlashAttention 2 kernels (124 MiB). vLLM uses FA3 on Hopper; FA2 serves only ALiBi
#    models and GPUs older than Hopper.
#  - lmdeploy: the TurboMind library (347 MiB), built against CUDA 12; the pytorch backend does
#    not load it.
declare -A DROP=(
  [vllm]="vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"
  [lmdeploy]="lmdeploy/turbomind/_turbomind"
)
# Files taken out of a wheel but still needed: they travel beside the set, zstd-compressed
# (`zstd -19 --long=27`, one-time cost of minutes here), and install-wheels.sh puts them back.
#  - sglang_kernel: the FA3 kernels SGLang uses by default on Hopper (flash_ops.abi3.so,
#    1.07 GB unpacked, 326 MiB in the wheel, 135 MiB compressed): 8 parts instead of 11.
declare -A SQUEEZE=(
  [sglang_kernel]="sgl_kernel/flash_ops.abi3.so"
)

# pip matches each manylinux tag exactly: name every glibc level the image (24.04, 2.39) runs.
platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 5 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done

pins() { grep -v '^\s*#' "$1" | sed 's/\s*#.*//' | grep -v '^\s*$'; }
norm() { echo "$1" | tr 'A-Z-.' 'a-z__'; } # wheel file names use `_` for `-` and `.`

# index DIR: fill WHEEL[name==version] (name normalised) with the wheel files found in DIR.
declare -A WHEEL=()
index() {
  WHEEL=()
  local f base name rest
  for f in "$1"/*.whl; do
    [ -e "$f" ] || continue
    base=$(basename "$f")
    name=${base%%-*}
    rest=${base#*-}
    WHEEL["$(norm "$name")==${rest%%-*}"]=$f
  done
}
# The wheel file for a pin `name==version`, or nothing.
find_wheel() { echo "${WHEEL["$(norm "${1%%==*}")==${1##*==}"]:-}"; }

# repack SRC DST PREFIX...: copy a wheel without the files under PREFIX (and their RECORD rows).
repack() {
  "$python" - "$@" <<'EOF'
import sys, zipfile

src, dst, *prefixes = sys.argv[1:]
dropped = 0
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename.startswith(tuple(prefixes)):
            dropped += info.file_size
            continue
        data = zin.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            rows = [r for r in data.decode().splitlines() if r and not r.startswith(tuple(prefixes))]
            data = ("\n".join(rows) + "\n").encode()
        zout.writestr(info, data)
print(f"repacked {src.rsplit('/', 1)[-1]}: dropped {dropped / 2**20:.0f} MiB uncompressed")
EOF
}

for engine in "${engines[@]}"; do
  list=$here/wheels-$engine.txt
  [ -f "$list" ] || { echo "no wheel list $list" >&2; exit 2; }
  download=$out/$engine/download
  set_dir=$out/$engine/set
  mkdir -p "$download" "$out/parts"

  # The set: the engine's pins, then enginegate's where the engine has no such name (one
  # version of each: two would stop the install).
  declare -A seen=()
  wanted=()
  for pin in $(pins "$list") $(pins "$here/wheels-enginegate.txt"); do
    name=$(norm "${pin%%==*}")
    [ -z "${seen[$name]:-}" ] || continue
    seen[$name]=1
    wanted+=("$pin")
  done
  unset seen

  # 1. Download what is missing, in one pip call.
  index "$download"
  missing=()
  for pin in "${wanted[@]}"; do
    [ -n "$(find_wheel "$pin")" ] || missing+=("$pin")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "prepare: downloading ${#missing[@]} wheels for $engine" >&2
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${platforms[@]}" -d "$download" "${missing[@]}" \
      2> >(grep -v '^WARNING: Location' >&2) >&2 # this machine's pip names absent local indexes
  fi
  index "$download"

  # 2. Link the set's wheels together, repacking those with parts to drop.
  rm -rf "$set_dir.new"
  mkdir -p "$set_dir.new"
  for pin in "${wanted[@]}"; do
    name=$(norm "${pin%%==*}")
    wheel=$(find_wheel "$pin")
    [ -n "$wheel" ] || { echo "prepare: $pin was not downloaded" >&2; exit 1; }
    squeeze=${SQUEEZE[$name]:-}
    drop="${DROP[$name]:-} $squeeze"
    if [ -n "${drop// /}" ]; then
      repacked=$out/$engine/repacked/$(basename "$wheel")
      if [ ! -f "$repacked" ] || [ "$repacked" -ot "$wheel" ]; then
        mkdir -p "$(dirname "$repacked")"
        # shellcheck disable=SC2086
        repack "$wheel" "$repacked.tmp" $drop >&2
        mv "$repacked.tmp" "$repacked"
      fi
      wheel=$repacked
    fi
    ln "$wheel" "$set_dir.new/" 2>/dev/null || cp "$wheel" "$set_dir.new/"
    # Each squeezed file as PATH.zst with `/` written `%` (install-wheels.sh reverses it).
    for inner in $squeeze; do
      original=$(find_wheel "$pin")
      zst=$out/$engine/squeezed/${inner//\//%}.zst
      if [ ! -f "$zst" ] || [ "$zst" -ot "$original" ]; then
        mkdir -p "$(dirname "$zst")"
        echo "prepare: compressing $inner (zstd -19 --long=27; minutes)" >&2
        unzip -p "$original" "$inner" | zstd -q -19 --long=27 -T0 -o "$zst.tmp"
        mv "$zst.tmp" "$zst"
      fi
      ln "$zst" "$set_dir.new/" 2>/dev/null || cp "$zst" "$set_dir.new/"
    done
  done

  # 3. Pack, unless the parts already hold exactly this set.
  manifest=$(cd "$set_dir.new" && ls -l --time-style=+ . | awk 'NR>1 {print $5, $NF}' | sort)
  stamp=$out/parts/$engine.manifest
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$manifest" ] && [ -e "$out/parts/$engine.tar.part-00" ]; then
    rm -rf "$set_dir.new"
  else
    rm -rf "$set_dir"
    mv "$set_dir.new" "$set_dir"
    rm -f "$out/parts/$engine.tar.part-"* "$stamp"
    # Fixed order, owner and dates: the same set gives the same bytes.
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - -C "$set_dir" . |
      split -b "$part_size" -d -a 2 - "$out/parts/$engine.tar.part-"
    echo "$manifest" >"$stamp"
  fi
  count=$(echo "$manifest" | wc -l)
  total=$(echo "$manifest" | awk '{s += $1} END {printf "%.0f", s / 2^20}')
  echo "prepare: $engine: $count wheels, $total MiB" >&2
  for part in "$out/parts/$engine.tar.part-"*; do
    echo "$(du -m "$part" | cut -f1) MiB ${part#"$repo"/}"
  done
done
