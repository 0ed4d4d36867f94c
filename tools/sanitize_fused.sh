#!/usr/bin/env bash
# Build cuda/fused/sanitize_fused.cu with the fused kernels (sm_90a) and run it under compute-sanitizer
# memcheck, racecheck and synccheck on a GPU machine. Logs under $OUT (default ./out).
#   bash tools/sanitize_fused.sh [cutlass include dir]     # build (JOBS parallel compiles, default 16) and run
#   bash tools/sanitize_fused.sh build [cutlass include]   # build only (where nvcc is, e.g. a machine without GPU)
#   bash tools/sanitize_fused.sh run                       # run the binary built before (B: its folder)
# JNA_CUDA_FLAGS: extra nvcc flags of the build (experiment knobs, e.g. "-DJNA_SM90_Q_GATHER").
set -uo pipefail
cd "$(dirname "$0")/.."
what=all
case "${1:-}" in build|run) what=$1; shift ;; esac
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
B=${B:-/tmp/jna_sanitize}; mkdir -p "$B"
if [ "$what" != run ]; then
  CUTLASS=${1:-$(python3 -c "import os, cutlass_library as c; print(os.path.join(os.path.dirname(c.__file__), 'source', 'include'))")}
  FLAGS="-std=c++17 -O2 --expt-relaxed-constexpr -lineinfo -Icuda -isystem $CUTLASS -gencode=arch=compute_90a,code=sm_90a -DJNA_FUSED_WITH_SM90=1 ${JNA_CUDA_FLAGS:-}"
  # Every fused kernel, the Hopper ones included (the driver runs both kernel sets in each direction).
  rm -f "$B"/*.o "$B/sanitize_fused"  # no object of an older tree gets linked
  ls cuda/fused/fwd_*.cu cuda/fused/hopper/fwd_*.cu cuda/fused/bwd_*.cu cuda/fused/hopper/bwd_*.cu cuda/fused/dispatch.cu cuda/fused/sanitize_fused.cu |
    xargs -P "${JOBS:-16}" -I{} sh -c 'nvcc '"$FLAGS"' -c {} -o '"$B"'/$(echo {} | tr / _).o' || { echo "BUILD FAILED"; exit 1; }
  nvcc $FLAGS "$B"/*.o -o "$B/sanitize_fused" || { echo "LINK FAILED"; exit 1; }
  [ "$what" = build ] && { echo "built $B/sanitize_fused"; exit 0; }
fi
[ -x "$B/sanitize_fused" ] || { echo "no $B/sanitize_fused: run 'bash tools/sanitize_fused.sh build' first" >&2; exit 1; }
rc=0
for tool in memcheck racecheck synccheck; do
  # Two persistent CTAs in the Hopper forward: each walks many query tiles of these small problems;
  # the warp-specialized backward orders its key tiles for two resident CTAs (not raster on some).
  JAX_NA_PERSISTENT_CTAS=2 compute-sanitizer --tool $tool --print-limit 10 --error-exitcode 9 "$B/sanitize_fused" \
    > "$OUT/sanitize_$tool.log" 2>&1
  r=$?; [ $r -ne 0 ] && rc=$r
  echo "$tool: exit $r; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|bad cases' "$OUT/sanitize_$tool.log" | tr '\n' ' ')"
done
exit $rc
