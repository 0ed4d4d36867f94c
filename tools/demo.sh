#!/usr/bin/env bash
# Set up a virtual environment, build and install jax_na with the example dependencies, run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${JAX_NA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q ".[examples]"
cd examples
exec "../$VENV/bin/python" demo.py "$@"
