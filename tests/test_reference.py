"""The reference backend against the float64 oracle: forward (out, LSE) and gradients.

Forward: oracle.attention (NumPy float64 brute force). Gradients: jax.vjp of a float64 dense masked
implementation built from the oracle's mask (helpers.dense_reference), itself checked against the
oracle and against finite differences below.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import jax_na
import oracle
from helpers import Case

CASES = helpers.edge_cases()


def _random_cases(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        rank = int(rng.integers(1, 4))
        maxlen = {1: 23, 2: 11, 3: 7}[rank]
        S, ks, ss, ds, cs = [], [], [], [], []
        for _ in range(rank):
            L = int(rng.integers(2, maxlen + 1))
            k = int(rng.integers(2, L + 1))
            d = int(rng.integers(1, L // k + 1))
            s = int(rng.integers(1, k + 1))
            S.append(L); ks.append(k); ds.append(d); ss.append(s); cs.append(bool(rng.integers(0, 2)))
        Hkv = int(rng.integers(1, 3))
        H = Hkv * int(rng.integers(1, 3))
        out.append(Case(tuple(S), tuple(ks), tuple(ss), tuple(ds), tuple(cs), B=int(rng.integers(1, 3)),
                        H=H, Hkv=Hkv, D=int(rng.integers(1, 9)), Dv=int(rng.integers(1, 9)),
                        Na=int(rng.choice([0, 0, 1, 3]))))
    return out


RANDOM = _random_cases(14, seed=1234)


def _call(case, inputs, dtype, **extra):
    q, k, v, ak, av = (None if x is None else jnp.asarray(x, dtype) for x in inputs)
    return helpers.na_fn(case.rank)(q, k, v, additional_keys=ak, additional_values=av,
                                    scale=case.scale, return_lse=True, backend="reference",
                                    **case.kwargs(), **extra)


def _check_forward(case, dtype):
    inputs = helpers.rand_inputs(case, np.float64, seed=helpers.seed_of(case))
    out, lse = _call(case, inputs, dtype)
    assert out.dtype == jnp.dtype(dtype)
    assert out.shape == (case.B, *case.spatial, case.H, case.Dv)
    assert lse.shape == (case.B, *case.spatial, case.H)
    want_lse_dtype = jnp.float64 if dtype == np.float64 else jnp.float32
    assert lse.dtype == want_lse_dtype
    # the oracle gets exactly the rounded inputs the package saw
    rounded = [None if x is None else np.asarray(jnp.asarray(x, dtype), np.float64) for x in inputs]
    ref_out, ref_lse = oracle.attention(*rounded[:3], **case.kwargs(), scale=case.scale,
                                        add_k=rounded[3], add_v=rounded[4])
    tol = helpers.tol_for(dtype)
    oracle.assert_close(out, ref_out, tol, f"out {case.id}")
    oracle.assert_close(lse, ref_lse, tol, f"lse {case.id}")


@pytest.mark.parametrize("case", CASES + RANDOM, ids=lambda c: c.id)
def test_forward_float32(case):
    _check_forward(case, np.float32)


@pytest.mark.parametrize("case", CASES + RANDOM, ids=lambda c: c.id)
def test_forward_float64(case):
    _check_forward(case, np.float64)


def _check_grads(case, dtype):
    seed = helpers.seed_of(case)
    inputs = helpers.rand_inputs(case, np.float64, seed=seed)
    rounded = [None if x is None else np.asarray(jnp.asarray(x, dtype), np.float64) for x in inputs]
    ct_out = helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), seed + 1)
    ct_lse = helpers.rand_like((case.B, *case.spatial, case.H), seed + 2)
    ref_out, ref_lse, ref_grads = helpers.dense_reference(case, rounded, (ct_out, ct_lse))

    args = [jnp.asarray(x, dtype) for x in inputs if x is not None]
    fn = helpers.na_fn(case.rank)

    def f(*a):
        extra = dict(additional_keys=a[3], additional_values=a[4]) if len(a) == 5 else {}
        return fn(*a[:3], **case.kwargs(), scale=case.scale, return_lse=True, backend="reference",
                  **extra)

    (out, lse), vjp = jax.vjp(f, *args)
    grads = vjp((jnp.asarray(ct_out, dtype), jnp.asarray(ct_lse, lse.dtype)))
    tol = helpers.tol_for(dtype)
    oracle.assert_close(out, ref_out, tol, "out")
    oracle.assert_close(lse, ref_lse, tol, "lse")
    names = ["dq", "dk", "dv", "d_additional_keys", "d_additional_values"]
    assert len(grads) == len(ref_grads)
    for name, g, rg, a in zip(names, grads, ref_grads, args):
        assert g.shape == a.shape and g.dtype == a.dtype, name
        oracle.assert_close(g, rg, tol, f"{name} {case.id}")


@pytest.mark.parametrize("case", CASES + RANDOM[:6], ids=lambda c: c.id)
def test_grads_float64(case):
    _check_grads(case, np.float64)


@pytest.mark.parametrize("case", CASES[::3] + RANDOM[6:10], ids=lambda c: c.id)
def test_grads_float32(case):
    _check_grads(case, np.float32)


def test_grad_only_out_and_only_lse():
    """Cotangent on out only (lse unused) and on lse only: each path alone is right."""
    case = Case((9, 7), (3, 4), stride=(2, 1), dilation=(2, 1), is_causal=(False, True), H=4, Hkv=2,
                D=5, Dv=3, Na=2)
    inputs = helpers.rand_inputs(case, np.float64, seed=5)
    m = oracle.mask(case.spatial, case.kernel_size, case.stride, case.dilation, case.is_causal)
    args = [jnp.asarray(x) for x in inputs]
    scale = case.D ** -0.5

    def pkg(which):
        def f(*a):
            out, lse = jax_na_fn(*a)
            return jnp.sum(jnp.sin(out)) if which == "out" else jnp.sum(jnp.cos(lse))
        return f

    def jax_na_fn(q, k, v, ak, av):
        return helpers.na_fn(2)(q, k, v, **case.kwargs(), additional_keys=ak, additional_values=av,
                                return_lse=True, backend="reference")

    def dense(which):
        def f(*a):
            out, lse = helpers.dense_attention(*a, m, scale)
            return jnp.sum(jnp.sin(out)) if which == "out" else jnp.sum(jnp.cos(lse))
        return f

    for which in ("out", "lse"):
        g = jax.grad(pkg(which), argnums=(0, 1, 2, 3, 4))(*args)
        rg = jax.grad(dense(which), argnums=(0, 1, 2, 3, 4))(*args)
        for a, b in zip(g, rg):
            oracle.assert_close(a, b, 1e-10, which)
        if which == "lse":  # lse does not depend on v
            assert float(jnp.abs(g[2]).max()) == 0.0 and float(jnp.abs(g[4]).max()) == 0.0


def test_dense_reference_matches_oracle_and_finite_differences():
    """The gradient oracle itself: forward equals the NumPy oracle; VJP equals central differences."""
    case = Case((6, 5), (3, 2), stride=(2, 1), dilation=(2, 1), is_causal=(True, False), H=2, Hkv=1,
                D=3, Dv=2, Na=1)
    inputs = helpers.rand_inputs(case, np.float64, seed=11)
    ct = (helpers.rand_like((1, 6, 5, 2, 2), 12), helpers.rand_like((1, 6, 5, 2), 13))
    out, lse, grads = helpers.dense_reference(case, inputs, ct)
    ref_out, ref_lse = oracle.attention(*inputs[:3], **case.kwargs(), add_k=inputs[3], add_v=inputs[4])
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-13)
    # analytic NumPy gradients == jax.vjp of the dense masked JAX implementation
    m = oracle.mask(case.spatial, case.kernel_size, case.stride, case.dilation, case.is_causal)
    _, vjp = jax.vjp(lambda *a: helpers.dense_attention(*a, m, case.D ** -0.5),
                     *(jnp.asarray(x) for x in inputs))
    for g, jg in zip(grads, vjp(tuple(jnp.asarray(c) for c in ct))):
        np.testing.assert_allclose(g, np.asarray(jg), rtol=1e-10, atol=1e-12)

    def loss(xs):
        o, l = oracle.attention(*xs[:3], **case.kwargs(), add_k=xs[3], add_v=xs[4])
        return float(np.sum(o * ct[0]) + np.sum(l * ct[1]))

    rng = np.random.default_rng(14)
    eps = 1e-6
    for which in range(5):
        for _ in range(4):
            idx = tuple(int(rng.integers(0, n)) for n in inputs[which].shape)
            xp = [x.copy() for x in inputs]
            xm = [x.copy() for x in inputs]
            xp[which][idx] += eps
            xm[which][idx] -= eps
            fd = (loss(xp) - loss(xm)) / (2 * eps)
            assert abs(fd - grads[which][idx]) <= 1e-6 * max(1.0, abs(fd)), (which, idx, fd,
                                                                              grads[which][idx])


def test_default_scale_and_explicit_scale():
    case = Case((10,), 3, H=2, Hkv=2, D=16, Dv=4)
    q, k, v, _, _ = helpers.rand_inputs(case, np.float64, seed=3)
    out_default = helpers.na_fn(1)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 3, backend="reference")
    out_explicit = helpers.na_fn(1)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 3, scale=0.25,
                                    backend="reference")
    ref, _ = oracle.attention(q, k, v, 3, scale=0.25)
    oracle.assert_close(out_default, ref, 1e-12)
    oracle.assert_close(out_explicit, ref, 1e-12)
    out2 = helpers.na_fn(1)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 3, scale=1.7,
                            backend="reference")
    oracle.assert_close(out2, oracle.attention(q, k, v, 3, scale=1.7)[0], 1e-12)
    assert oracle.rel_err(out2, ref) > 1e-3


@pytest.mark.parametrize("backend", [None, "auto"])
def test_auto_backend_equals_reference_on_cpu(backend):
    case = Case((6, 7), (3, 5), stride=(1, 2), is_causal=(True, False), H=4, Hkv=2, Na=2)
    inputs = helpers.rand_inputs(case, np.float32, seed=9)
    a = [None if x is None else jnp.asarray(x) for x in inputs]
    kw = dict(**case.kwargs(), additional_keys=a[3], additional_values=a[4], return_lse=True)
    out, lse = helpers.na_fn(2)(*a[:3], **kw, backend=backend)
    out_r, lse_r = helpers.na_fn(2)(*a[:3], **kw, backend="reference")
    ref, ref_lse = oracle.attention(*inputs[:3], **case.kwargs(), add_k=inputs[3], add_v=inputs[4])
    oracle.assert_close(out, ref, 1e-5)
    oracle.assert_close(lse, ref_lse, 1e-5)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(np.asarray(out), np.asarray(out_r))


def test_available_backends():
    import jax_na
    b = jax_na.available_backends()
    assert isinstance(b, list) and "reference" in b
    assert all(x in ("reference", "naive", "gemm", "fused") for x in b)
    if jax.default_backend() == "cpu":
        assert "naive" not in b  # the naive backend needs a GPU


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_reference(dtype):
    """fp16/bf16 inputs: float32 softmax, output in the input dtype, LSE float32."""
    case = Case((5, 6), (3, 4), is_causal=(False, True), H=2, Hkv=1, D=16, Dv=8, Na=2)
    inputs = helpers.rand_inputs(case, np.float64, seed=21)
    out, lse = _call(case, inputs, dtype)
    assert out.dtype == jnp.dtype(dtype) and lse.dtype == jnp.float32
    rounded = [np.asarray(jnp.asarray(x, dtype), np.float64) for x in inputs]
    ref, ref_lse = oracle.attention(*rounded[:3], **case.kwargs(), add_k=rounded[3], add_v=rounded[4])
    tol = helpers.tol_for(dtype)
    oracle.assert_close(out, ref, tol, "out")
    oracle.assert_close(lse, ref_lse, 1e-5, "lse (float32)")


def test_large_magnitude_scores_are_stable():
    """Scores of +-1e3 must not overflow: the softmax subtracts the row max."""
    case = Case((12,), 5, is_causal=True, H=1, Hkv=1, D=4, Dv=4, Na=1)
    q, k, v, ak, av = helpers.rand_inputs(case, np.float64, seed=4)
    q = q * 300.0
    out, lse = helpers.na_fn(1)(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), 5, is_causal=True,
                                additional_keys=jnp.asarray(ak, jnp.float32),
                                additional_values=jnp.asarray(av, jnp.float32), return_lse=True)
    r = [np.asarray(np.float32(x), np.float64) for x in (q, k, v, ak, av)]
    ref, ref_lse = oracle.attention(*r[:3], 5, is_causal=True, add_k=r[3], add_v=r[4])
    assert np.abs(ref_lse).max() > 100
    oracle.assert_close(out, ref, 1e-5)
    oracle.assert_close(lse, ref_lse, 1e-5)


def test_first_causal_query_sees_only_itself():
    """Causal on every axis: query (0, 0) sees exactly key (0, 0), so its output is v[0, 0]."""
    case = Case((4, 5), (3, 3), is_causal=True, H=2, Hkv=2)
    q, k, v, _, _ = helpers.rand_inputs(case, np.float64, seed=8)
    out, lse = helpers.na_fn(2)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 3, is_causal=True,
                                return_lse=True)
    np.testing.assert_allclose(np.asarray(out)[0, 0, 0], v[0, 0, 0], rtol=1e-12)
    s00 = np.einsum("hd,hd->h", q[0, 0, 0], k[0, 0, 0]) * case.D ** -0.5
    np.testing.assert_allclose(np.asarray(lse)[0, 0, 0], s00, rtol=1e-12)


def test_k_equals_L_is_full_self_attention():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 4, 5, 3, 8)) for _ in range(3))
    out = helpers.na_fn(2)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), (4, 5), backend="reference")
    s = np.einsum("bnhd,bmhd->bhnm", q.reshape(2, 20, 3, 8), k.reshape(2, 20, 3, 8)) / math.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    full = np.einsum("bhnm,bmhd->bnhd", p, v.reshape(2, 20, 3, 8)).reshape(2, 4, 5, 3, 8)
    oracle.assert_close(out, full, 1e-12)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_empty_batch(rank):
    """A zero batch gives empty results of the right shapes (forward, unfused ops, gradients)."""
    S, W = (6,) * rank, 3 ** rank
    q = jnp.zeros((0, *S, 2, 4))
    na, qk, av = (getattr(jax_na, f"na{rank}d{s}") for s in ("", "_qk", "_av"))
    assert na(q, q, q, 3).shape == q.shape
    assert qk(q, q, 3).shape == (0, *S, 2, W)
    assert av(jnp.zeros((0, *S, 2, W)), q, 3).shape == q.shape
    g = jax.grad(lambda q: jnp.sum(na(q, q, q, 3)) + jnp.sum(qk(q, q, 3)))(q)
    assert g.shape == q.shape
