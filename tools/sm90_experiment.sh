#!/usr/bin/env bash
# Variants of the Hopper (or portable) fused kernels, built as standalone test programs, then
# checked against float64 and timed on a GPU in one call. DIRECTION is fwd (cuda/fused/test_fused_fwd.cu
# with the Hopper forward, hopper/fwd_bf16_hd128.cu) or bwd (cuda/fused/test_fused_bwd.cu with the
# Hopper backward, hopper/bwd_bf16_hd128.cu); a variant whose flags hold -DJNA_TEST_PORTABLE_ONLY
# takes that direction's portable kernels instead (fwd_bf16_hd128.cu, bwd_bf16_hd128.cu): one kernel
# unit per variant, bfloat16, head dim $HD (default 128; e.g. HD=32 for the portable kernels on p4/p5).
# Build where nvcc is (this machine or the GPU one), run on the GPU machine.
#
#   bash tools/sm90_experiment.sh DIRECTION build DIR name="-DFLAG=1 ..." [name2="..."] ...
#   bash tools/sm90_experiment.sh DIRECTION run DIR [args for the test programs, e.g. --big, --timing]
#
# A variant named "head" compiles the kernel unit of the git revision in $HEAD_SRC (a checkout's
# root) instead of this tree's, for a before/after in the same run. Forward: a variant whose flags
# hold -DJNA_FWD_TRACE also prints per-CTA phase timings (run adds --trace for it); one with
# -DJNA_FWD_EXPERIMENT_NO_EXP (the softmax without its exponentials) or -DJNA_FWD_EXPERIMENT_NO_MASK (no
# mask arithmetic: every score of a visited tile counts) computes wrong results and is timed only. Backward: the
# -DJNA_BWD_EXPERIMENT_* knobs NO_DQ_KERNEL, NO_DKDV_KERNEL, ONE_UNIT (Hopper: with TWO_WARPGROUPS) and
# NO_EXP (cuda/fused/NOTES.md, sessions 30-32) leave parts of the work out; their checks would fail by
# design, so those variants run the timings only. The others (NO_UNIT_SKIP, UNIT_SKIP: the dK/dV units' skips off / on;
# TWO_WARPGROUPS: the Hopper backward's former 128-key / 128-query CTAs) compute everything and are
# checked. Run with --atomic, a backward binary takes the non-deterministic mode (the warp-specialized
# dK/dV/dQ kernel, hopper/mainloop_bwd.cuh); its knobs WS_NO_DQ (no dQ product) and WS_NO_REDUCE (no
# dQ reductions) leave parts out and are timed only; RASTER_ORDER (its key tiles in raster order, not
# tile_grid.h's pick) computes everything and is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
direction=$1 what=$2 dir=$3
shift 3
case "$direction" in
  fwd|bwd) ;;
  *) echo "DIRECTION must be fwd or bwd, not '$direction'" >&2; exit 2 ;;
esac
NVCC=${NVCC:-nvcc}
CUTLASS=${CUTLASS:-$(python3 -c "import os, cutlass_library as c; print(os.path.join(os.path.dirname(c.__file__), 'source', 'include'))" 2>/dev/null || echo .carry/cutlass_include)}
HD=${HD:-128}
FLAGS="-std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -gencode=arch=compute_90a,code=sm_90a -DJNA_TEST_BF16_ONLY -DJNA_TEST_HEAD_DIM=$HD"
mkdir -p "$dir"
if [ "$what" = build ]; then
  pids=()
  for spec in "$@"; do
    name=${spec%%=*} flags=${spec#*=}
    src=cuda
    [ "$name" = head ] && src=${HEAD_SRC:?HEAD_SRC: a checkout of the revision to compare with}/cuda
    unit="$src/fused/hopper/${direction}_bf16_hd$HD.cu" select=-DJNA_TEST_SM90_ONLY
    case "$flags" in *JNA_TEST_PORTABLE_ONLY*) unit="$src/fused/${direction}_bf16_hd$HD.cu" select= ;; esac
    # shellcheck disable=SC2086
    ( $NVCC $FLAGS $select $flags -I"$src" -Icuda -I"$CUTLASS" -Xptxas -v "$unit" \
        "cuda/fused/test_fused_${direction}.cu" -o "$dir/$name" > "$dir/$name.build.log" 2>&1 \
      && echo "$flags" > "$dir/$name.flags" && echo "built $name" || { echo "FAILED $name"; tail -5 "$dir/$name.build.log"; } ) &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  exit 0
fi
# run: every built variant (the check cases, then the timings), outputs in $OUT (or DIR), a table last.
res=${OUT:-$dir}
for bin in "$dir"/*.flags; do
  name=$(basename "$bin" .flags)
  extra=()
  grep -q JNA_FWD_TRACE "$bin" && extra=(--trace --timing)  # timings and the phase trace only
  grep -qE "JNA_BWD_EXPERIMENT_(NO_DQ_KERNEL|NO_DKDV_KERNEL|ONE_UNIT|NO_EXP|WS_NO_DQ|WS_NO_REDUCE)|JNA_FWD_EXPERIMENT_NO_(EXP|MASK)" "$bin" && extra=(--timing)  # parts left out
  [ "$name" = head ] && extra=(--timing)
  echo "=== $name: $(cat "$bin")"
  timeout "${VARIANT_TIMEOUT:-120}" "$dir/$name" "$@" "${extra[@]}" > "$res/$name.out" 2>&1 || echo "rc=$? ($name)"
  grep -E "FAIL|ALL PASS|SOME" "$res/$name.out" || true
done
echo "=== timings (median ms, eff TFLOP/s)"
for out in "$res"/*.out; do
  name=$(basename "$out" .out)
  printf "%-10s %s\n" "$name" "$(grep -c PASS "$out") pass, $(grep -c FAIL "$out") fail"
  grep "^TIME" "$out" | sed "s/^TIME /  /"
  grep "TRACE" "$out" | sed "s/^ */  /" || true
done
