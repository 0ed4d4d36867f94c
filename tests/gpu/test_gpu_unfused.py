"""GPU: unfused na*d_qk / na*d_av (+ rpb) of every kernel backend that has them (not "fused") vs the
float64 reference, forward and backward, poisoned and twice (bitwise deterministic)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import oracle
from gpu_common import DTYPES, TOL, backends_under_test, poison_device_memory, rel, to64
from helpers import Case

pytestmark = pytest.mark.gpu

CASES = [c for c in helpers.edge_cases() if c.stride == 1 and not c.Na] + [
    Case((9,), 4, dilation=2, is_causal=True, H=4, Hkv=2, D=5),
    Case((7, 8), (3, 4), dilation=(2, 2), is_causal=(True, False), H=3, Hkv=1, D=4, Dv=6),
    Case((4, 6, 5), (3, 3, 2), dilation=(1, 2, 2), is_causal=(False, True, True), H=2, Hkv=1, D=3, Dv=5),
    Case((24, 24), 7, dilation=(1, 3), B=16, H=4, Hkv=2, D=32, Dv=32),     # many blocks
]


def _kw(case):
    return dict(kernel_size=case.kernel_size, dilation=case.dilation, is_causal=case.is_causal)


@functools.lru_cache(maxsize=None)
def _fns(case, backend, with_rpb):
    qk, av = helpers.qk_fn(case.rank), helpers.av_fn(case.rank)

    def run(q, k, rpb, v, w, ct_s, ct_o):
        fq = lambda q, k, b: qk(q, k, **_kw(case), rpb=b, scale=case.scale, backend=backend)
        if with_rpb:
            s, vjp = jax.vjp(fq, q, k, rpb)
            dq, dk, drpb = vjp(ct_s)
        else:
            s, vjp = jax.vjp(lambda q, k: fq(q, k, None), q, k)
            (dq, dk), drpb = vjp(ct_s), None
        o, vjp = jax.vjp(lambda w, v: av(w, v, **_kw(case), backend=backend), w, v)
        dw, dv = vjp(ct_o)
        return s, dq, dk, drpb, o, dw, dv

    return jax.jit(run)


def _random(case, dtype, seed):
    W = math.prod(oracle._tup(case.kernel_size, case.rank))
    q, k, v, _, _ = helpers.rand_inputs(case, np.float32, seed=seed)
    rpb = helpers.rand_like((case.H, *(2 * k_ - 1 for k_ in oracle._tup(case.kernel_size, case.rank))), seed + 1)
    w = helpers.rand_like((case.B, *case.spatial, case.H, W), seed + 2)
    _, valid, _ = oracle.window_tables(case.spatial, case.kernel_size, case.dilation, case.is_causal)
    ct_s = helpers.rand_like(w.shape, seed + 3)
    ct_s = np.where(valid.reshape(*case.spatial, 1, W)[None], ct_s, 0.0)   # cotangent of -inf entries: 0
    ct_o = helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), seed + 4)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, rpb, v, w, ct_s, ct_o)), valid


@pytest.mark.parametrize("with_rpb", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", backends_under_test(unfused=True))
def test_unfused(backend, case, dtype, with_rpb):
    seed = helpers.seed_of(case)
    args, valid = _random(case, dtype, seed)
    run = _fns(case, backend, with_rpb)
    jax.block_until_ready(run(*_random(case, dtype, seed + 100)[0]))
    poison_device_memory()
    got = jax.block_until_ready(run(*args))
    poison_device_memory()
    again = jax.block_until_ready(run(*args))
    ref = _fns(case, "reference", with_rpb)(*(to64(a) for a in args))
    tol = TOL[jnp.dtype(dtype)]
    names = ["scores", "dq", "dk", "d_rpb", "av_out", "d_weights", "dv"]
    W = valid.shape[1]
    vmask = np.broadcast_to(valid.reshape(*case.spatial, 1, W)[None], got[0].shape)
    for name, g, r, g2 in zip(names, got, ref, again):
        if g is None:
            assert r is None and not with_rpb
            continue
        assert g.dtype == jnp.dtype(dtype), name
        ga = np.asarray(g.astype(jnp.float32), np.float64)
        ra = np.asarray(r)
        if name == "scores":
            np.testing.assert_array_equal(np.isneginf(ga), ~vmask, err_msg="-inf exactly at masked entries")
            ga, ra = np.where(vmask, ga, 0.0), np.where(vmask, ra, 0.0)
        if name == "d_weights":
            assert np.all(ga[~vmask] == 0), "d_weights must be 0 at masked entries"
        rel(ga, ra, tol, f"{name} {case.id}")
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(g2.astype(jnp.float32)),
                                      err_msg=f"{name} not deterministic")


@pytest.mark.parametrize("backend", backends_under_test(unfused=True))
def test_av_ignores_masked_entries(backend):
    """Masked window entries of the weights are never read: inf/NaN there changes nothing."""
    case = Case((6, 7), (3, 4), is_causal=(True, True), H=2, Hkv=1, D=4, Dv=5)
    (q, k, rpb, v, w, _, _), valid = _random(case, jnp.float32, 3)
    vmask = valid.reshape(6, 7, 1, 12)[None]
    av = helpers.av_fn(2)
    ref = av(to64(jnp.where(vmask, w, 0)), to64(v), **_kw(case), backend="reference")
    for bad in (-np.inf, np.inf, np.nan):
        got = jax.jit(lambda w, v: av(w, v, **_kw(case), backend=backend))(jnp.where(vmask, w, bad), v)
        rel(got, ref, 1e-5, f"av with {bad} at masked entries")
