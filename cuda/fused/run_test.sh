#!/usr/bin/env bash
# Builds and runs test_fused_fwd on a GPU machine: correctness + timing (default config), then
# timing of an alternative config. Usage (repo root): cuda/fused/run_test.sh [cutlass include dir]
set -euo pipefail
CUTLASS=${1:-.carry/cutlass_include}
NVCC=${NVCC:-nvcc}
B=${BUILD_DIR:-/tmp/jna_fused_build}
mkdir -p "$B"
FLAGS="-std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -Icuda -I$CUTLASS -gencode=arch=compute_90a,code=sm_90a"
build() {  # $1: output name, $2: extra flags
  local out=$1; shift
  local pids=()
  for f in cuda/fused/fwd_*.cu cuda/fused/bwd_*.cu cuda/fused/dispatch.cu cuda/fused/test_fused_fwd.cu; do
    $NVCC $FLAGS "$@" -Xptxas -v -c "$f" -o "$B/$out.$(basename "$f" .cu).o" > "$B/$out.$(basename "$f" .cu).log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  $NVCC $FLAGS "$@" "$B"/$out.*.o -o "$B/$out"
  grep -h -E "Used|spill" "$B"/$out.fwd_bf16_hd128.log | paste - - | sed 's/ptxas info    : //' || true
}
t0=$(date +%s)
build main
echo "build main: $(( $(date +%s) - t0 )) s"
"$B/main" 2>&1 | tee "${OUT:-/tmp}/main.txt"
if [ "${VARIANT:-}" != "" ]; then
  t0=$(date +%s)
  build variant $VARIANT
  echo "build variant ($VARIANT): $(( $(date +%s) - t0 )) s"
  "$B/variant" --timing 2>&1 | tee "${OUT:-/tmp}/variant.txt"
fi
