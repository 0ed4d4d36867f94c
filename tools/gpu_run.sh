#!/usr/bin/env bash
# One call on a GPU machine: build + install jax_na against the local jaxlib, run the GPU test suite,
# run the benchmarks; logs and JSON under $OUT.
# Usage: bash tools/gpu_run.sh [tests|bench|models|all] [args for jax_na.profile or benchmarks/models.py]
# (bench: python -m jax_na.profile on the whole problem set; models: benchmarks/models.py; all: tests + bench)
set -uo pipefail
cd "$(dirname "$0")/.."; REPO=$PWD
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
what=${1:-all}; shift || true
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

t0=$(date +%s)
# --no-build-isolation: build against this machine's jaxlib (the one it runs with); no network here.
# Only sm_90a: this is an H100/H200.
if ! "$PY" -m pip install --no-build-isolation --no-deps -v . \
      -Ccmake.define.JAX_NA_CUDA_ARCHS=90a -Ccmake.define.JAX_NA_ENABLE_CUDA=ON \
      -Cbuild-dir=/tmp/jax_na_build > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build+install: $(( $(date +%s) - t0 )) s"
grep -E "ptxas info|spill|bytes stack" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20 > "$OUT/resources.txt"
cd /tmp  # import the installed package, not the source tree
"$PY" -c "import jax, jax_na, jax_na._ext as e; print(jax.__version__, jax.devices(), e.has_cuda_kernels(), e.cuda_archs(), jax_na.available_backends())"

rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  t0=$(date +%s)
  # Poisoned outputs: the handlers fill every result with NaN bytes before their kernels run.
  JAX_NA_POISON_OUTPUTS=1 "$PY" -m pytest -q -p no:cacheprovider --durations=15 -m gpu ${PYTEST_ARGS:-} "$REPO/tests" 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
  rc=${PIPESTATUS[0]}
  echo "gpu tests: rc=$rc, $(( $(date +%s) - t0 )) s"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  "$PY" -m jax_na.profile --problem all --json "$OUT/bench.json" --plot "$OUT/bench.png" "$@" \
    2> "$OUT/bench_progress.log" | tee "$OUT/bench.txt"
fi
if [ "$what" = models ]; then
  "$PY" "$REPO/benchmarks/models.py" --json "$OUT/models.json" "$@" 2> "$OUT/models_stderr.log" | tee "$OUT/models.txt"
fi
exit $rc
