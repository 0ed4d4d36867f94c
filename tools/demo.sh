#!/usr/bin/env bash
# Set up a virtual environment, build and install jax_na with the example dependencies, run the demo:
# train the DiNAT example briefly on scikit-learn's digits (best backend here), then print the
# profiler table for one problem. Extra arguments go to examples/demo.py (e.g. --steps 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/install.sh examples
# Run from examples/ with the installed package (and its compiled kernels), not ./jax_na.
cd examples
exec "$VENV/bin/python" demo.py "$@"
