# Sourced by test.sh and demo.sh: create (or reuse) the virtual environment and pip-install this
# checkout with the extras given as $1 (the CUDA kernels are compiled when nvcc is found).
# Sets VENV to the environment's absolute path. JAX_NA_VENV (relative or absolute) overrides .venv.
PY=${PYTHON:-python3}
VENV=${JAX_NA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q ".[$1]"
