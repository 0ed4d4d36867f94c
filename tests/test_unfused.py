"""Unfused na*d_qk / na*d_av (+ relative positional bias) on the reference backend vs the oracle."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import oracle
from helpers import Case

# Unfused ops have stride 1: the sweep's stride-1 cases plus a few dedicated ones.
CASES = [c for c in helpers.edge_cases() if c.stride == 1 and not c.Na] + [
    Case((9,), 4, dilation=2, is_causal=True, H=4, Hkv=2, D=5),
    Case((7, 8), (3, 4), dilation=(2, 2), is_causal=(True, False), H=3, Hkv=1, D=4, Dv=6),
    Case((4, 6, 5), (3, 3, 2), dilation=(1, 2, 2), is_causal=(False, True, True), H=2, Hkv=1, D=3, Dv=5),
]


def _rpb(case, dtype, seed):
    shape = (case.H, *(2 * k - 1 for k in oracle._tup(case.kernel_size, case.rank)))
    return helpers.rand_like(shape, seed).astype(dtype)


def _kw(case):
    return dict(kernel_size=case.kernel_size, dilation=case.dilation, is_causal=case.is_causal)


def _W(case):
    return math.prod(oracle._tup(case.kernel_size, case.rank))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_rpb", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_qk_forward(case, with_rpb, dtype):
    seed = helpers.seed_of(case)
    q, k, _, _, _ = helpers.rand_inputs(case, dtype, seed=seed)
    rpb = _rpb(case, dtype, seed + 1) if with_rpb else None
    got = helpers.qk_fn(case.rank)(jnp.asarray(q), jnp.asarray(k), **_kw(case),
                                   rpb=None if rpb is None else jnp.asarray(rpb), scale=case.scale,
                                   backend="reference")
    assert got.shape == (case.B, *case.spatial, case.H, _W(case)) and got.dtype == jnp.dtype(dtype)
    want = oracle.qk(q, k, **_kw(case), rpb=rpb, scale=case.scale)
    got = np.asarray(got, np.float64)
    masked = np.isneginf(want)
    np.testing.assert_array_equal(np.isneginf(got), masked, err_msg="-inf exactly at masked entries")
    if any(oracle._tup(case.is_causal, case.rank)):
        assert masked.any()
    else:
        assert not masked.any()
    oracle.assert_close(np.where(masked, 0, got), np.where(masked, 0, want), helpers.tol_for(dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_av_forward(case, dtype):
    seed = helpers.seed_of(case)
    _, _, v, _, _ = helpers.rand_inputs(case, dtype, seed=seed)
    tok, valid, _ = oracle.window_tables(case.spatial, case.kernel_size, case.dilation, case.is_causal)
    w = helpers.rand_like((case.B, *case.spatial, case.H, _W(case)), seed + 2)
    # garbage at masked entries must be ignored
    w = np.where(valid.reshape(*case.spatial, 1, -1)[None], w, 1e4).astype(dtype)
    got = helpers.av_fn(case.rank)(jnp.asarray(w), jnp.asarray(v), **_kw(case), backend="reference")
    assert got.shape == (case.B, *case.spatial, case.H, case.Dv) and got.dtype == jnp.dtype(dtype)
    oracle.assert_close(got, oracle.av(w, v, **_kw(case)), helpers.tol_for(dtype))


def test_av_ignores_non_finite_masked_entries():
    case = Case((6, 7), (3, 4), is_causal=(True, True), H=2, Hkv=1, D=4, Dv=5)
    _, _, v, _, _ = helpers.rand_inputs(case, np.float32, seed=3)
    tok, valid, _ = oracle.window_tables(case.spatial, case.kernel_size, 1, case.is_causal)
    w = helpers.rand_like((1, 6, 7, 2, 12), 4)
    vmask = valid.reshape(6, 7, 1, 12)[None]
    assert not vmask.all()
    for bad in (-np.inf, np.inf, np.nan):
        wb = np.where(vmask, w, bad).astype(np.float32)
        got = helpers.av_fn(2)(jnp.asarray(wb), jnp.asarray(v), **_kw(case), backend="reference")
        oracle.assert_close(got, oracle.av(np.where(vmask, w, 0).astype(np.float32), v, **_kw(case)), 1e-5)


def _grads_check(case, dtype, with_rpb):
    seed = helpers.seed_of(case) + 7
    q, k, v, _, _ = helpers.rand_inputs(case, np.float64, seed=seed)
    rpb = _rpb(case, np.float64, seed + 1) if with_rpb else None
    tables = oracle.window_tables(case.spatial, case.kernel_size, case.dilation, case.is_causal)
    scale = case.D ** -0.5 if case.scale is None else case.scale
    W = _W(case)
    ct = helpers.rand_like((case.B, *case.spatial, case.H, W), seed + 2)  # nonzero at masked entries too
    r = lambda x: None if x is None else np.asarray(jnp.asarray(x, dtype), np.float64)
    q64, k64, rpb64, ct64 = r(q), r(k), r(rpb), r(ct)

    # ---- qk
    qk = helpers.qk_fn(case.rank)
    if with_rpb:
        f = lambda q, k, b: qk(q, k, **_kw(case), rpb=b, scale=case.scale, backend="reference")
        args = (q, k, rpb)
        ref_f = lambda q, k, b: helpers.dense_qk(q, k, b, tables, scale)
    else:
        f = lambda q, k: qk(q, k, **_kw(case), scale=case.scale, backend="reference")
        args = (q, k)
        ref_f = lambda q, k: helpers.dense_qk(q, k, None, tables, scale)
    _, vjp = jax.vjp(f, *(jnp.asarray(a, dtype) for a in args))
    got = vjp(jnp.asarray(ct, dtype))
    _, rvjp = jax.vjp(ref_f, *(jnp.asarray(x) for x in (q64, k64, rpb64)[: len(args)]))
    want = rvjp(jnp.asarray(ct64))
    tol = helpers.tol_for(dtype)
    for name, g, w_, a in zip(("dq", "dk", "d_rpb"), got, want, args):
        assert g.shape == a.shape and g.dtype == jnp.dtype(dtype), name
        oracle.assert_close(g, w_, tol, f"qk {name}")

    # ---- av
    wts = helpers.rand_like((case.B, *case.spatial, case.H, W), seed + 3)
    dout = helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), seed + 4)
    av = helpers.av_fn(case.rank)
    _, vjp = jax.vjp(lambda a, v: av(a, v, **_kw(case), backend="reference"),
                     jnp.asarray(wts, dtype), jnp.asarray(v, dtype))
    d_w, d_v = vjp(jnp.asarray(dout, dtype))
    _, rvjp = jax.vjp(lambda a, v: helpers.dense_av(a, v, tables), jnp.asarray(r(wts)), jnp.asarray(r(v)))
    rd_w, rd_v = rvjp(jnp.asarray(r(dout)))
    valid = tables[1].reshape(*case.spatial, 1, W)[None]
    assert np.all(np.asarray(d_w)[np.broadcast_to(~valid, d_w.shape)] == 0), "d_weights must be 0 when masked"
    oracle.assert_close(d_w, rd_w, tol, "av d_weights")
    oracle.assert_close(d_v, rd_v, tol, "av dv")


@pytest.mark.parametrize("with_rpb", [False, True])
@pytest.mark.parametrize("case", CASES[::2], ids=lambda c: c.id)
def test_unfused_grads_float64(case, with_rpb):
    _grads_check(case, np.float64, with_rpb)


@pytest.mark.parametrize("case", CASES[1::3], ids=lambda c: c.id)
def test_unfused_grads_float32(case):
    _grads_check(case, np.float32, True)


def test_d_rpb_by_hand_1d():
    """d rpb[h, o] = sum over (b, i, window entries with bias index o) of d_attn (1-D, tiny)."""
    L, k, H = 6, 3, 2
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, L, H, 4)))
    kk = jnp.asarray(rng.standard_normal((2, L, 1, 4)))
    rpb = jnp.asarray(rng.standard_normal((H, 2 * k - 1)))
    ct = rng.standard_normal((2, L, H, k))
    _, vjp = jax.vjp(lambda b: helpers.qk_fn(1)(q, kk, k, rpb=b, backend="reference"), rpb)
    (d_rpb,) = vjp(jnp.asarray(ct))
    keys = oracle.axis_keys(L, k)
    want = np.zeros((H, 2 * k - 1))
    for i in range(L):
        for w, j in enumerate(keys[i]):
            want[:, j - i + k - 1] += ct[:, i, :, w].sum(0)
    np.testing.assert_allclose(np.asarray(d_rpb), want, rtol=1e-12)
    # and the forward bias entries by hand
    s = helpers.qk_fn(1)(q, kk, k, rpb=rpb, backend="reference") - helpers.qk_fn(1)(q, kk, k, backend="reference")
    for i in range(L):
        for w, j in enumerate(keys[i]):
            np.testing.assert_allclose(np.asarray(s[:, i, :, w]), np.broadcast_to(np.asarray(rpb[:, j - i + k - 1]), (2, H)), rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_qk_av_equals_na(causal):
    case = Case((7, 6), (3, 4), dilation=(2, 1), is_causal=(causal, False), H=4, Hkv=2, D=5, Dv=3)
    q, k, v, _, _ = (None if x is None else jnp.asarray(x) for x in helpers.rand_inputs(case, np.float64, 1))
    s = helpers.qk_fn(2)(q, k, **_kw(case), backend="reference")
    out = helpers.av_fn(2)(jax.nn.softmax(s, axis=-1), v, **_kw(case), backend="reference")
    ref = helpers.na_fn(2)(q, k, v, **_kw(case), backend="reference")
    oracle.assert_close(out, ref, 1e-12)
    oracle.assert_close(out, oracle.attention(q, k, v, **_kw(case))[0], 1e-12)


def test_window_entry_order_2d():
    """Window entries are row-major over axes, counted from each query's window start."""
    S, ks = (5, 6), (3, 2)
    # q = e_0, k one-hot-encodes the token index: score = scale * token id
    N = 30
    q = np.zeros((1, *S, 1, N)); q[..., 0] = 1.0
    k = np.zeros((1, *S, 1, N)); k[..., 0] = np.arange(N).reshape(S)[None, :, :, None]
    s = np.asarray(helpers.qk_fn(2)(jnp.asarray(q), jnp.asarray(k), ks, scale=1.0, backend="reference"))
    a0, a1 = oracle.axis_keys(5, 3), oracle.axis_keys(6, 2)
    for i in range(5):
        for j in range(6):
            want = [x * 6 + y for x in a0[i] for y in a1[j]]
            np.testing.assert_array_equal(s[0, i, j, 0], np.asarray(want, np.float64))


# ----------------------------------------------------------------------------- na*d on the unfused ops

def _unfused_na(case, inputs, backend="reference"):
    """(out, lse) of na{r}d as backend="gemm" computes it (``functional._unfused_attention``: qk ->
    float32 softmax -> av), on the unfused ops of ``backend``."""
    from jax_na import _checks, functional
    q, k, v, ak, av = inputs
    params, _ = _checks.attention_args(case.rank, q, k, v, case.kernel_size, case.stride, case.dilation,
                                       case.is_causal, case.scale, ak, av, "reference")
    if ak is None:
        ak, av = jnp.zeros((case.B, 0, case.Hkv, case.D), q.dtype), jnp.zeros((case.B, 0, case.Hkv, case.Dv), q.dtype)
    return functional._unfused_attention(q, k, v, ak, av, params, backend)


@pytest.mark.parametrize("case", helpers.edge_cases(), ids=lambda c: c.id)
def test_unfused_attention_is_na(case):
    """With the reference's unfused ops the composite computes SEMANTICS.md to float64 precision on
    the whole edge-case sweep (stride, dilation, causal, GQA, D_v != D, additional keys/values): out
    and LSE vs the oracle, every gradient (LSE cotangent included) vs the dense float64 VJP."""
    seed = helpers.seed_of(case)
    inputs = tuple(None if x is None else jnp.asarray(x) for x in helpers.rand_inputs(case, np.float64, seed))
    cts = (helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), seed + 1),
           helpers.rand_like((case.B, *case.spatial, case.H), seed + 2))
    diff = [i for i, x in enumerate(inputs) if x is not None]

    def run(*xs):
        full = list(inputs)
        for i, x in zip(diff, xs):
            full[i] = x
        return _unfused_na(case, full)

    (out, lse), vjp = jax.vjp(jax.jit(run), *(inputs[i] for i in diff))
    grads = vjp(tuple(jnp.asarray(c) for c in cts))
    ref_out, ref_lse = oracle.attention(*inputs[:3], **case.kwargs(), scale=case.scale, add_k=inputs[3],
                                        add_v=inputs[4])
    assert out.dtype == lse.dtype == jnp.float64
    oracle.assert_close(out, ref_out, 1e-12, "out")
    oracle.assert_close(lse, ref_lse, 1e-12, "lse")
    _, _, ref_grads = helpers.dense_reference(case, inputs, cts)
    assert len(grads) == len(ref_grads)
    for name, g, rg in zip(["dq", "dk", "dv", "d_add_k", "d_add_v"], grads, ref_grads):
        oracle.assert_close(g, rg, 1e-10, name)


@pytest.fixture
def pretend_gemm(monkeypatch):
    """The gemm targets pretended compiled: backend="gemm" passes the checks and, lowered for the CPU,
    runs its primitives on the reference."""
    helpers.pretend_gemm_targets(monkeypatch)
    yield
    monkeypatch.undo()
    jax.clear_caches()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
def test_na_gemm_backend_is_the_composite(pretend_gemm, dtype):
    """na1d/na2d/na3d(backend="gemm") run the composite: same results as the reference's unfused ops
    under jit, return_lse (float32) and vmap of grad; outputs in the input dtype."""
    case = Case((7, 9), (3, 4), stride=(2, 1), dilation=(1, 2), is_causal=(True, False), B=2, H=4, Hkv=2,
                D=6, Dv=5, Na=3)
    xs = [tuple(jnp.asarray(x, dtype) for x in helpers.rand_inputs(case, np.float32, s)) for s in (1, 2)]
    na = helpers.na_fn(2)

    def f(q, k, v, ak, av, backend):
        return na(q, k, v, **case.kwargs(), additional_keys=ak, additional_values=av, return_lse=True,
                  backend=backend)

    out, lse = jax.jit(lambda *a: f(*a, "gemm"))(*xs[0])
    assert out.dtype == jnp.dtype(dtype) and lse.dtype == jnp.float32 and lse.shape == out.shape[:-1]
    want = _unfused_na(case, xs[0])   # eager: the same ops up to XLA's fusion (an ulp)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np.asarray(want[0].astype(jnp.float32)),
                               rtol=eps, atol=eps)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want[1]), rtol=1e-6, atol=1e-6)
    assert na(*xs[0][:3], **case.kwargs(), backend="gemm").shape == out.shape   # return_lse=False: out only
    # vmap of grad vs per-slice grads of the float64 reference
    stacked = [jnp.stack(a) for a in zip(*xs)]
    loss = lambda backend: lambda *a: sum(jnp.sum(x.astype(jnp.float32)) for x in f(*a, backend))
    g = jax.jit(jax.vmap(jax.grad(loss("gemm"), argnums=(0, 1, 2, 3, 4))))(*stacked)
    tol = helpers.tol_for(jnp.float32) if dtype == jnp.float32 else 3e-2
    for i in range(2):
        rg = jax.grad(loss("reference"), argnums=(0, 1, 2, 3, 4))(*(x.astype(jnp.float64) for x in xs[i]))
        for a, b in zip(g, rg):
            assert a.dtype == jnp.dtype(dtype)
            oracle.assert_close(np.asarray(a[i].astype(jnp.float32), np.float64), np.asarray(b), tol)
