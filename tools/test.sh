#!/usr/bin/env bash
# Set up a virtual environment, build and install jax_na (with its CUDA kernels when nvcc is
# found), then run the test suite. GPU tests run only where a GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/install.sh test
# When nvcc is here the install must have compiled the kernels; a test asserts it.
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then export JAX_NA_EXPECT_CUDA=1; fi
# Run from tests/ so that the installed package (with its compiled module) is imported, not ./jax_na.
# Workers (pytest-xdist): one per core, 2 to 4 (the suite is XLA compiling small programs, one at a
# time per process; where there is a GPU the workers share it). JAX_NA_TEST_WORKERS overrides.
# --dist load: consecutive tests (similar programs) mostly land on one worker; --dist loadgroup,
# which sends them one at a time, measured 12% slower (test_flax + test_unfused, 2 cores).
cores=$(nproc 2>/dev/null || echo 2)
workers=${JAX_NA_TEST_WORKERS:-$(( cores < 2 ? 2 : (cores > 4 ? 4 : cores) ))}
cd tests
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "$workers" --dist load "$@" .
