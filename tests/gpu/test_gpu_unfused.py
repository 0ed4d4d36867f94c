"""GPU: unfused na*d_qk / na*d_av (+ rpb) of every kernel backend that has them (not "fused") vs the
float64 reference, forward and backward, poisoned and twice (bitwise deterministic)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from gpu_common import (DTYPES, backends_under_test, check_unfused, rel, to64, unfused_inputs,
                        unfused_kw)
from helpers import Case

pytestmark = pytest.mark.gpu

CASES = [c for c in helpers.edge_cases() if c.stride == 1 and not c.Na] + [
    Case((9,), 4, dilation=2, is_causal=True, H=4, Hkv=2, D=5),
    Case((7, 8), (3, 4), dilation=(2, 2), is_causal=(True, False), H=3, Hkv=1, D=4, Dv=6),
    Case((4, 6, 5), (3, 3, 2), dilation=(1, 2, 2), is_causal=(False, True, True), H=2, Hkv=1, D=3, Dv=5),
    Case((24, 24), 7, dilation=(1, 3), B=16, H=4, Hkv=2, D=32, Dv=32),     # many blocks
]


@pytest.mark.parametrize("with_rpb", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", backends_under_test(unfused=True))
def test_unfused(backend, case, dtype, with_rpb):
    check_unfused(case, backend, dtype, with_rpb, helpers.seed_of(case))


@pytest.mark.parametrize("backend", backends_under_test(unfused=True))
def test_av_ignores_masked_entries(backend):
    """Masked window entries of the weights are never read: inf/NaN there changes nothing."""
    case = Case((6, 7), (3, 4), is_causal=(True, True), H=2, Hkv=1, D=4, Dv=5)
    (q, k, rpb, v, w, _, _), valid = unfused_inputs(case, jnp.float32, 3)
    vmask = valid.reshape(6, 7, 1, 12)[None]
    av = helpers.av_fn(2)
    ref = av(to64(jnp.where(vmask, w, 0)), to64(v), **unfused_kw(case), backend="reference")
    for bad in (-np.inf, np.inf, np.nan):
        got = jax.jit(lambda w, v: av(w, v, **unfused_kw(case), backend=backend))(jnp.where(vmask, w, bad), v)
        rel(got, ref, 1e-5, f"av with {bad} at masked entries")
