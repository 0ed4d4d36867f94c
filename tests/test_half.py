"""Half precision (fp16/bf16) on the reference backend: float32 softmax and accumulation, so forward
and gradients meet SEMANTICS.md's bounds (fp16 <= 2e-3, bf16 <= 1e-2) against float64 on the same
(rounded) inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import oracle
from helpers import Case

DTYPES = [jnp.float16, jnp.bfloat16]
CASES = [
    Case((13,), 5, stride=2, dilation=2, is_causal=True, H=4, Hkv=2, D=16, Dv=8, Na=2),
    Case((9, 11), (3, 2), dilation=(3, 5), is_causal=(True, False), H=2, Hkv=1, D=16, Dv=16),
    Case((4, 5, 6), (4, 5, 6), H=2, Hkv=2, D=8, Dv=8),                       # k = L: long windows
    Case((5, 6, 7), (2, 3, 4), stride=(1, 2, 3), is_causal=(False, True, True), H=2, Hkv=1, D=8, Dv=8, Na=3),
]


def _r(x, dt):
    return None if x is None else np.asarray(jnp.asarray(x, dt).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_na_half_forward_and_grads(case, dtype):
    seed = helpers.seed_of(case)
    inputs = [_r(x, dtype) for x in helpers.rand_inputs(case, np.float64, seed=seed)]
    ct_o = _r(helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), seed + 1), dtype)
    ct_l = helpers.rand_like((case.B, *case.spatial, case.H), seed + 2).astype(np.float32)
    ref_out, ref_lse, ref_grads = helpers.dense_reference(case, inputs, (ct_o, ct_l))
    fn = helpers.na_fn(case.rank)
    args = [jnp.asarray(x, dtype) for x in inputs if x is not None]

    def f(*a):
        extra = dict(additional_keys=a[3], additional_values=a[4]) if len(a) == 5 else {}
        return fn(*a[:3], **case.kwargs(), return_lse=True, backend="reference", **extra)

    (out, lse), vjp = jax.vjp(f, *args)
    assert out.dtype == jnp.dtype(dtype) and lse.dtype == jnp.float32
    grads = vjp((jnp.asarray(ct_o, dtype), jnp.asarray(ct_l)))
    tol = helpers.tol_for(dtype)
    oracle.assert_close(np.asarray(out.astype(jnp.float32)), ref_out, tol, "out")
    oracle.assert_close(lse, ref_lse, 1e-5, "lse (float32 softmax)")
    for name, g, rg in zip(["dq", "dk", "dv", "d_add_k", "d_add_v"], grads, ref_grads):
        assert g.dtype == jnp.dtype(dtype)
        oracle.assert_close(np.asarray(g.astype(jnp.float32)), rg, tol, f"{name} {case.id}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", [c for c in CASES if c.stride == 1 and not c.Na], ids=lambda c: c.id)
def test_unfused_half_forward_and_grads(case, dtype):
    seed = helpers.seed_of(case)
    q, k, v, _, _ = (_r(x, dtype) for x in helpers.rand_inputs(case, np.float64, seed=seed))
    ks = oracle._tup(case.kernel_size, case.rank)
    W = math.prod(ks)
    rpb = _r(helpers.rand_like((case.H, *(2 * x - 1 for x in ks)), seed + 1), dtype)
    tables = oracle.window_tables(case.spatial, case.kernel_size, case.dilation, case.is_causal)
    valid = tables[1].reshape(*case.spatial, 1, W)[None]
    ct = _r(np.where(valid, helpers.rand_like((case.B, *case.spatial, case.H, W), seed + 2), 0), dtype)
    w = _r(helpers.rand_like(ct.shape, seed + 3), dtype)
    dout = _r(helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), seed + 4), dtype)
    kw = dict(kernel_size=case.kernel_size, dilation=case.dilation, is_causal=case.is_causal)
    tol = helpers.tol_for(dtype)
    J = lambda x: jnp.asarray(x, dtype)

    s, vjp = jax.vjp(lambda q, k, b: helpers.qk_fn(case.rank)(q, k, **kw, rpb=b, backend="reference"),
                     J(q), J(k), J(rpb))
    got = vjp(J(ct))
    scale = case.D ** -0.5
    rs, rvjp = jax.vjp(lambda q, k, b: helpers.dense_qk(q, k, b, tables, scale), *map(jnp.asarray, (q, k, rpb)))
    want = rvjp(jnp.asarray(ct))
    vm = np.broadcast_to(valid, s.shape)
    oracle.assert_close(np.where(vm, np.asarray(s.astype(jnp.float32)), 0), np.asarray(rs), tol, "scores")
    for name, g, r in zip(("dq", "dk", "d_rpb"), got, want):
        oracle.assert_close(np.asarray(g.astype(jnp.float32)), r, tol, f"qk {name} {case.id}")

    o, vjp = jax.vjp(lambda w, v: helpers.av_fn(case.rank)(w, v, **kw, backend="reference"), J(w), J(v))
    got = vjp(J(dout))
    ro, rvjp = jax.vjp(lambda w, v: helpers.dense_av(w, v, tables), jnp.asarray(w), jnp.asarray(v))
    want = rvjp(jnp.asarray(dout))
    oracle.assert_close(np.asarray(o.astype(jnp.float32)), ro, tol, "av out")
    for name, g, r in zip(("d_weights", "dv"), got, want):
        oracle.assert_close(np.asarray(g.astype(jnp.float32)), r, tol, f"av {name} {case.id}")
