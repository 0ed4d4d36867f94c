"""Test configuration: float64 on, markers, GPU skipping.

- ``gpu``: needs a CUDA GPU visible to jax *and* jax_na's compiled CUDA kernels; skipped otherwise.
  Setting ``JAX_NA_TEST_GPU_ON_CPU=1`` runs the GPU tests' logic on CPU against the reference
  backend (to check the tests themselves; they then compare the reference with itself in low precision).
- ``slow``: long CPU tests (run by default; deselect with ``-m "not slow"``).
- ``large``: GPU tests that need tens of GB of device memory (deselect with ``-m "gpu and not large"``).
"""

import os
import sys

# Parallel workers (pytest -n) share one GPU: preallocating 75% of its memory in each would leave
# every worker but the first out of memory. An explicit setting in the environment wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _no_gpu_here() -> bool:
    # /dev/dxg: a WSL2 host's GPU (it has no /dev/nvidia* nodes)
    return not any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"))


# Without a GPU the suite's time is XLA compiling small CPU programs (their run time is negligible):
# its LLVM backend at optimization level 0 without the expensive passes took a quarter off the CPU
# suite (2 cores). Set before jax starts; inherited by the test subprocesses (sharding_checks.py);
# an XLA_FLAGS that already names the level wins; JAX_NA_TEST_FAST_COMPILE=0 keeps XLA's defaults.
if _no_gpu_here() and os.environ.get("JAX_NA_TEST_FAST_COMPILE", "1") != "0":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in _flags:
        os.environ["XLA_FLAGS"] = (f"{_flags} --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true").strip()

import jax  # noqa: E402 (after the allocator setting)
import pytest  # noqa: E402

# The oracle comparisons need float64 (fp32 results are compared against float64 evaluations).
jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.dirname(__file__))  # `import oracle`, `import helpers` from any rootdir


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and the compiled kernels (skipped elsewhere)")
    config.addinivalue_line("markers", "slow: long-running CPU test")
    config.addinivalue_line("markers", "large: needs tens of GB of device memory (GPU; deselect with "
                                       "-m \"gpu and not large\")")


def gpu_available() -> bool:
    try:
        import jax_na._ext as ext
    except Exception:  # pragma: no cover
        return False
    return ext.has_cuda_kernels() and ext.has_cuda_device()


def gpu_on_cpu() -> bool:
    return os.environ.get("JAX_NA_TEST_GPU_ON_CPU") == "1"


def pytest_collection_modifyitems(config, items):
    if gpu_available() or gpu_on_cpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and jax_na's compiled CUDA kernels")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def pretend_kernels(monkeypatch):
    """Lowering for CUDA needs only the target names: ``pretend_kernels(hopper=True)`` pretends the
    fused kernels were built, and the Hopper ones present as ``hopper`` says; caches cleared around
    the test."""
    import jax_na._ext as ext

    def pretend(hopper=True):
        monkeypatch.setattr(ext, "has_cuda_kernels", lambda: True)
        monkeypatch.setattr(ext, "has_fused_kernels", lambda: True)
        monkeypatch.setattr(ext, "has_target", lambda name: True)
        monkeypatch.setattr(ext, "has_hopper_kernels", lambda: hopper)
        jax.clear_caches()

    yield pretend
    monkeypatch.undo()
    jax.clear_caches()


@pytest.fixture
def xla_deterministic_ops(monkeypatch):
    """XLA_FLAGS with ``--xla_gpu_deterministic_ops=true``: na*d's default ``deterministic_backward``
    (None) then resolves to True. For tests of the deterministic mode's tiles and lowering that call
    with the default; the non-deterministic mode is asked for by name there."""
    import os

    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true".strip())


@pytest.fixture
def any_gpu(monkeypatch):
    """Tile resolution only: a Hopper-only tile configuration resolves whatever GPU this machine has
    (on a GPU without the Hopper kernels it is refused; the tile tests' test_hopper_only_needs_hopper
    check that)."""
    import jax_na._ext as ext

    monkeypatch.setattr(ext, "has_hopper_kernels", lambda: True)
