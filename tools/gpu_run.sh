#!/usr/bin/env bash
# One call on a GPU machine: build + install jax_na against the local jaxlib, run the GPU test suite,
# run the benchmarks; logs and JSON under $OUT.
# Usage: bash tools/gpu_run.sh [tests|bench|models|all] [args for jax_na.profile or benchmarks/models.py]
# Environment: PYTEST_MARK (default "gpu"; e.g. "gpu and not large"), PYTEST_ARGS (pytest arguments, default -q;
# e.g. "-v -n 12"),
# PYTEST_K (a -k expression, spaces allowed), PYTEST_PATHS (default: the whole tests/ folder),
# JNA_CUDA_FLAGS (extra nvcc flags for kernel experiments, e.g. "-DJNA_SOFTMAX_RESCALE_SLACK=0"),
# JNA_WHEEL (a jax_na wheel built elsewhere for this machine's Python and jaxlib, e.g. carried in
# .carry/: installed instead of building here, which saves the build's minutes of GPU time).
# (bench: python -m jax_na.profile on the whole problem set, with --clocks; models: benchmarks/models.py;
# all: tests + bench)
set -uo pipefail
cd "$(dirname "$0")/.."; REPO=$PWD
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
what=${1:-all}; shift || true
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

t0=$(date +%s)
# The fused kernels need the CUTLASS/CuTe headers, found at build time with `import cutlass_library`.
# This machine has no network and no nvidia-cutlass: install the wheel shipped in .whl/ (if any) into a
# side directory on PYTHONPATH (the build below runs without isolation, so it sees it).
cutlass_whl=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
if [ -n "$cutlass_whl" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$cutlass_whl" \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import cutlass_library" 2>/dev/null; then
  echo "WARNING: no nvidia-cutlass (no .whl/nvidia_cutlass-*.whl): the fused kernels will not be built"
fi
# --no-build-isolation: build against this machine's jaxlib (the one it runs with); no network here.
# Only sm_90a: this is an H100/H200. Resource usage (registers, stack, spills) per kernel in the log.
if [ -n "${JNA_WHEEL:-}" ]; then
  if ! "$PY" -m pip install --no-deps --no-index --force-reinstall $JNA_WHEEL > "$OUT/build.log" 2>&1; then
    tail -20 "$OUT/build.log"; echo "INSTALL FAILED"; exit 1
  fi
elif ! "$PY" -m pip install --no-build-isolation --no-deps -v . \
      -Ccmake.define.JAX_NA_CUDA_ARCHS=90a -Ccmake.define.JAX_NA_ENABLE_CUDA=ON \
      -Ccmake.define.JAX_NA_CUDA_RESOURCE_USAGE=ON ${JNA_CUDA_FLAGS:+"-Ccmake.define.CMAKE_CUDA_FLAGS=$JNA_CUDA_FLAGS"} \
      -Cbuild-dir=/tmp/jax_na_build > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build+install: $(( $(date +%s) - t0 )) s"
grep -E "CUTLASS headers|fused kernels" "$OUT/build.log" | head -5
# resources.txt: the fused kernels' entries (ptxas -v "Compiling entry function"/"Used N registers" or
# nvcc --resource-usage "Function ..."/"REG:"), then a summary of every spill/stack line.
{
  echo "# fused kernels"
  awk '/(entry function|Function)/ { show = ($0 ~ /fused/) }
       show && /(entry function|Function|registers|REG:|spill|stack)/ { print substr($0, 1, 400) }' "$OUT/build.log"
  echo "# every kernel: spill/stack lines (count)"
  grep -E "ptxas info|spill|bytes stack" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20
} > "$OUT/resources.txt"
cd /tmp  # import the installed package, not the source tree
"$PY" -c "import jax, jax_na, jax_na._ext as e; print(jax.__version__, jax.devices(), e.has_cuda_kernels(), e.cuda_archs(), jax_na.available_backends())"

rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  t0=$(date +%s)
  # Poisoned outputs: the handlers fill every result with NaN bytes before their kernels run.
  # PYTEST_MARK selects (default: every GPU test; "gpu and not large" leaves out the >2^31-element one).
  JAX_NA_POISON_OUTPUTS=1 "$PY" -m pytest -p no:cacheprovider --durations=15 -m "${PYTEST_MARK:-gpu}" ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_ARGS:--q} ${PYTEST_PATHS:-"$REPO/tests"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
  rc=${PIPESTATUS[0]}
  echo "gpu tests: rc=$rc, $(( $(date +%s) - t0 )) s"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  "$PY" -m jax_na.profile --problem all --clocks --json "$OUT/bench.json" --plot "$OUT/bench.png" "$@" \
    2> "$OUT/bench_progress.log" | tee "$OUT/bench.txt"
fi
if [ "$what" = models ]; then
  "$PY" "$REPO/benchmarks/models.py" --json "$OUT/models.json" "$@" 2> "$OUT/models_stderr.log" | tee "$OUT/models.txt"
fi
exit $rc
