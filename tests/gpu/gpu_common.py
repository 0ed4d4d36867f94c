"""Shared pieces of the GPU tests: which backends to test, poisoning, float64 reference runs."""

import os

# The FFI handlers fill every result with NaN bytes before their kernels run when this is set (read once,
# at the first kernel call of the process): unwritten elements then fail the comparisons.
os.environ.setdefault("JAX_NA_POISON_OUTPUTS", "1")

import jax
import jax.numpy as jnp
import numpy as np

import jax_na
import oracle

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.float16): 2e-3, jnp.dtype(jnp.bfloat16): 1e-2}


def backends_under_test():
    """Every non-reference backend usable here; on CPU (JAX_NA_TEST_GPU_ON_CPU=1) the reference
    stands in so that the test logic itself can be checked."""
    if os.environ.get("JAX_NA_TEST_GPU_ON_CPU") == "1":
        return ["reference"]
    b = [x for x in jax_na.available_backends() if x != "reference"]
    return b or ["naive"]   # the gpu marker skips these tests where no kernel backend exists


def poison_device_memory(mib=256):
    """Fill a large allocation with NaN and free it: XLA's allocator hands the same memory to the next
    outputs/workspaces, so elements a kernel forgets to write show up as NaN (or as stale values)."""
    n = mib * 2**20 // 4
    x = jnp.full((n,), jnp.nan, jnp.float32)
    x.block_until_ready()
    del x


def to64(x):
    return None if x is None else jnp.asarray(x).astype(jnp.float64)


def rel(a, b, tol, what):
    """Relative Frobenius error of a (any dtype) vs float64 b, NaN/Inf never pass."""
    return oracle.assert_close(np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64), np.asarray(b), tol,
                               what)
