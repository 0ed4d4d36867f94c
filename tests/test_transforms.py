"""jit, vmap (full and partial), grad, vmap-of-grad, grad under jit, nestings; values vs the oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import oracle
from helpers import Case

CASE2 = Case((6, 7), (3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(False, True), H=4, Hkv=2, D=5,
             Dv=3, Na=2)
CASE1 = Case((11,), 4, stride=2, dilation=2, is_causal=True, H=2, Hkv=1, D=4, Dv=6, Na=1)
CASE3 = Case((4, 5, 6), (2, 3, 3), stride=(1, 1, 3), is_causal=(True, False, False), H=2, Hkv=2, D=3,
             Dv=4)


def _na(case, **extra):
    fn = helpers.na_fn(case.rank)
    return functools.partial(fn, **case.kwargs(), scale=case.scale, **extra)


def _oracle(case, q, k, v, ak=None, av=None):
    return oracle.attention(q, k, v, **case.kwargs(), scale=case.scale, add_k=ak, add_v=av)


def _batched_inputs(case, V, seed):
    xs = [helpers.rand_inputs(case, np.float64, seed=seed + i) for i in range(V)]
    return [None if xs[0][j] is None else np.stack([x[j] for x in xs]) for j in range(5)]


@pytest.mark.parametrize("case", [CASE1, CASE2, CASE3], ids=lambda c: c.id)
def test_jit_forward_and_lse(case):
    q, k, v, ak, av = helpers.rand_inputs(case, np.float32, seed=1)
    f = jax.jit(lambda q, k, v, ak, av: _na(case, return_lse=True)(
        q, k, v, additional_keys=ak, additional_values=av))
    out, lse = f(q, k, v, ak, av)
    ref, ref_lse = _oracle(case, q, k, v, ak, av)
    oracle.assert_close(out, ref, 1e-5)
    oracle.assert_close(lse, ref_lse, 1e-5)
    out2, _ = f(q * 2, k, v, ak, av)  # retraced? no: same shapes, cached, new values
    oracle.assert_close(out2, _oracle(case, q * 2, k, v, ak, av)[0], 1e-5)


def test_eval_shape():
    case = CASE3
    q, k, v, _, _ = helpers.rand_inputs(case, np.float32, seed=1)
    out, lse = jax.eval_shape(lambda q, k, v: _na(case, return_lse=True)(q, k, v), q, k, v)
    assert out.shape == (1, 4, 5, 6, 2, 4) and out.dtype == jnp.float32
    assert lse.shape == (1, 4, 5, 6, 2) and lse.dtype == jnp.float32


@pytest.mark.parametrize("case", [CASE1, CASE2], ids=lambda c: c.id)
def test_vmap_all_operands(case):
    V = 3
    q, k, v, ak, av = _batched_inputs(case, V, seed=10)
    f = lambda q, k, v, ak, av: _na(case, return_lse=True)(q, k, v, additional_keys=ak,
                                                           additional_values=av)
    out, lse = jax.vmap(f)(q, k, v, ak, av)
    assert out.shape == (V, *q.shape[1:-1], case.Dv)
    for i in range(V):
        r, rl = _oracle(case, q[i], k[i], v[i], None if ak is None else ak[i], None if av is None else av[i])
        oracle.assert_close(out[i], r, 1e-12, f"slice {i}")
        oracle.assert_close(lse[i], rl, 1e-12, f"lse slice {i}")


@pytest.mark.parametrize("in_axes", [(0, None, None, None, None), (None, 0, 0, None, None),
                                     (None, None, 0, None, None), (None, None, None, 0, 0),
                                     (1, None, 1, None, 0), (2, 0, None, None, None)])
def test_vmap_some_operands(in_axes):
    case = CASE2
    V = 2
    base = helpers.rand_inputs(case, np.float64, seed=20)
    batched = _batched_inputs(case, V, seed=30)
    args = []
    for j, ax in enumerate(in_axes):
        if ax is None:
            args.append(base[j])
        else:
            args.append(np.moveaxis(batched[j], 0, ax))
    f = lambda q, k, v, ak, av: _na(case)(q, k, v, additional_keys=ak, additional_values=av)
    out = jax.vmap(f, in_axes=in_axes)(*args)
    for i in range(V):
        sl = [base[j] if ax is None else batched[j][i] for j, ax in enumerate(in_axes)]
        oracle.assert_close(out[i], _oracle(case, *sl)[0], 1e-12, f"slice {i}")


def test_vmap_out_axes_and_nested():
    case = CASE1
    V1, V2 = 2, 3
    xs = [[helpers.rand_inputs(case, np.float64, seed=100 + 10 * i + j) for j in range(V2)] for i in range(V1)]
    stack = lambda idx: np.stack([np.stack([xs[i][j][idx] for j in range(V2)]) for i in range(V1)])
    q, k, v, ak, av = (stack(i) for i in range(5))
    f = lambda q, k, v, ak, av: _na(case)(q, k, v, additional_keys=ak, additional_values=av)
    out = jax.vmap(jax.vmap(f), out_axes=1)(q, k, v, ak, av)
    assert out.shape[:2] == (V2, V1)
    for i in range(V1):
        for j in range(V2):
            oracle.assert_close(out[j, i], _oracle(case, *xs[i][j])[0], 1e-12)


def _dense_grads(case, inputs, ct):
    return helpers.dense_reference(case, inputs, ct)[2]


def _loss_and_cts(case, seed):
    ct_o = helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), seed)
    ct_l = helpers.rand_like((case.B, *case.spatial, case.H), seed + 1)

    def loss(q, k, v, ak=None, av=None):
        out, lse = _na(case, return_lse=True)(q, k, v, additional_keys=ak, additional_values=av)
        return jnp.sum(out * ct_o) + jnp.sum(lse * ct_l)

    return loss, (ct_o, ct_l)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", [CASE1, CASE2, CASE3], ids=lambda c: c.id)
def test_grad_and_grad_under_jit(case, jit):
    inputs = helpers.rand_inputs(case, np.float64, seed=40)
    loss, ct = _loss_and_cts(case, 41)
    args = [x for x in inputs if x is not None]
    g = jax.grad(loss, argnums=tuple(range(len(args))))
    if jit:
        g = jax.jit(g)
    got = g(*args)
    want = _dense_grads(case, inputs, ct)
    for a, b in zip(got, want):
        oracle.assert_close(a, b, 1e-10)


def test_value_and_grad_float32_under_jit():
    case = CASE2
    inputs = helpers.rand_inputs(case, np.float32, seed=50)
    loss, ct = _loss_and_cts(case, 51)
    val, got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(*inputs)
    out, lse, want = helpers.dense_reference(case, inputs, ct)
    np.testing.assert_allclose(float(val), np.sum(out * ct[0]) + np.sum(lse * ct[1]), rtol=1e-5)
    for a, b in zip(got, want):
        oracle.assert_close(a, b, 1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_vmap_of_grad(jit):
    case = CASE2
    V = 3
    q, k, v, ak, av = _batched_inputs(case, V, seed=60)
    loss, ct = _loss_and_cts(case, 61)
    g = jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    if jit:
        g = jax.jit(g)
    got = g(q, k, v, ak, av)
    for i in range(V):
        want = _dense_grads(case, (q[i], k[i], v[i], ak[i], av[i]), ct)
        for a, b in zip(got, want):
            oracle.assert_close(a[i], b, 1e-10, f"slice {i}")


def test_vmap_of_grad_partially_batched():
    """Only q batched: dk/dv of each vmapped instance are that instance's own gradients."""
    case = CASE3
    V = 2
    base = helpers.rand_inputs(case, np.float64, seed=70)
    qs = _batched_inputs(case, V, seed=71)[0]
    loss, ct = _loss_and_cts(case, 72)
    got = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None))(qs, base[1], base[2])
    for i in range(V):
        want = _dense_grads(case, (qs[i], base[1], base[2], None, None), ct)
        for a, b in zip(got, want):
            oracle.assert_close(a[i], b, 1e-10)


def test_grad_of_vmap_sums_unbatched_operands():
    case = CASE1
    V = 2
    base = helpers.rand_inputs(case, np.float64, seed=80)
    qs = _batched_inputs(case, V, seed=81)[0]
    loss, ct = _loss_and_cts(case, 82)
    total = lambda qs, k, v, ak, av: jnp.sum(jax.vmap(loss, in_axes=(0, None, None, None, None))(qs, k, v, ak, av))
    got = jax.grad(total, argnums=(0, 1, 2, 3, 4))(qs, *base[1:])
    per = [_dense_grads(case, (qs[i], *base[1:]), ct) for i in range(V)]
    oracle.assert_close(got[0][0], per[0][0], 1e-10)
    oracle.assert_close(got[0][1], per[1][0], 1e-10)
    for j in range(1, 5):
        oracle.assert_close(got[j], per[0][j] + per[1][j], 1e-10)


def test_grad_with_remat_and_scan():
    case = CASE1
    inputs = helpers.rand_inputs(case, np.float64, seed=90)
    loss, ct = _loss_and_cts(case, 91)
    want = _dense_grads(case, inputs, ct)
    got = jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2, 3, 4))(*inputs)
    for a, b in zip(got, want):
        oracle.assert_close(a, b, 1e-10)

    def scanned(q, k, v, ak, av):  # the same loss twice through lax.scan
        def body(c, _):
            return c + loss(q, k, v, ak, av), None
        return jax.lax.scan(body, 0.0, None, length=2)[0]
    got = jax.jit(jax.grad(scanned, argnums=(0, 1, 2, 3, 4)))(*inputs)
    for a, b in zip(got, want):
        oracle.assert_close(a, 2 * b, 1e-10)


def test_second_order_grad():
    """Hessian-vector products (forward-over-reverse and reverse-over-reverse) vs the dense reference.

    Not promised by the API; reported as xfail while the primitives have no differentiation rule.
    """
    case = Case((7,), 3, H=1, Hkv=1, D=2, Dv=2)
    q, k, v, _, _ = helpers.rand_inputs(case, np.float64, seed=95)
    m = oracle.mask(case.spatial, 3)
    f = lambda q: jnp.sum(_na(case)(q, k, v) ** 2)
    fd = lambda q: jnp.sum(helpers.dense_attention(q, k, v, None, None, m, 2 ** -0.5)[0] ** 2)
    t = helpers.rand_like(q.shape, 96)
    want = jax.jvp(jax.grad(fd), (q,), (t,))[1]
    try:
        hvp = jax.jvp(jax.grad(f), (q,), (t,))[1]
        hvp_r = jax.grad(lambda q: jnp.vdot(jax.grad(f)(q), t))(q)
    except NotImplementedError as e:
        pytest.xfail(f"higher-order differentiation unsupported: {e}")
    oracle.assert_close(hvp, want, 1e-9)
    oracle.assert_close(hvp_r, want, 1e-9)


# ----------------------------------------------------------------------------- unfused under transforms

def test_unfused_vmap_with_batched_and_unbatched_rpb():
    case = Case((6, 5), (3, 2), dilation=(2, 1), is_causal=(False, True), H=4, Hkv=2, D=3)
    V = 2
    tables = oracle.window_tables(case.spatial, case.kernel_size, case.dilation, case.is_causal)
    qk = helpers.qk_fn(2)
    kw = dict(kernel_size=case.kernel_size, dilation=case.dilation, is_causal=case.is_causal,
              backend="reference")
    qs, ks = (_batched_inputs(case, V, seed=200)[i] for i in (0, 1))
    rpbs = np.stack([helpers.rand_like((4, 5, 3), 210 + i) for i in range(V)])
    ct = np.stack([helpers.rand_like((1, 6, 5, 4, 6), 220 + i) for i in range(V)])

    def loss(q, k, b, c):
        return jnp.sum(qk(q, k, rpb=b, **kw) * c)  # -inf entries: c is masked below
    ct = np.where(tables[1].reshape(1, 1, 6, 5, 1, 6), ct, 0.0)

    # batched rpb: per-instance d_rpb
    out = jax.vmap(lambda q, k, b: qk(q, k, rpb=b, **kw))(qs, ks, rpbs)
    g = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))(qs, ks, rpbs, ct)
    # unbatched rpb under vmap: d_rpb (outside vmap) is the sum over instances
    g_shared = jax.grad(lambda q, k, b, c: jnp.sum(jax.vmap(loss, in_axes=(0, 0, None, 0))(q, k, b, c)),
                        argnums=2)(qs, ks, rpbs[0], ct)
    ref_shared = 0
    for i in range(V):
        want = oracle.qk(qs[i], ks[i], case.kernel_size, case.dilation, case.is_causal, rpb=rpbs[i])
        np.testing.assert_array_equal(np.isneginf(np.asarray(out[i])), np.isneginf(want))
        fin = np.isfinite(want)
        oracle.assert_close(np.asarray(out[i])[fin], want[fin], 1e-12)
        rl = lambda q, k, b: jnp.sum(helpers.dense_qk(q, k, b, tables, 3 ** -0.5) * ct[i])
        rg = jax.grad(rl, argnums=(0, 1, 2))(qs[i], ks[i], rpbs[i])
        for a, b in zip(g, rg):
            oracle.assert_close(a[i], b, 1e-10)
        ref_shared = ref_shared + jax.grad(rl, argnums=2)(qs[i], ks[i], rpbs[0])
    oracle.assert_close(g_shared, ref_shared, 1e-10)


def test_unfused_jit_grad_av():
    case = Case((9,), 4, dilation=2, is_causal=True, H=2, Hkv=1, Dv=3)
    tables = oracle.window_tables(case.spatial, 4, 2, True)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((2, 1, 9, 2, 4))   # vmapped over axis 0
    v = rng.standard_normal((1, 9, 1, 3))      # shared
    c = rng.standard_normal((1, 9, 2, 3))
    av = helpers.av_fn(1)
    loss = lambda w, v: jnp.sum(av(w, v, 4, dilation=2, is_causal=True) * c)
    got = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))(w, v)
    for i in range(2):
        rg = jax.grad(lambda w, v: jnp.sum(helpers.dense_av(w, v, tables) * c), argnums=(0, 1))(w[i], v)
        oracle.assert_close(got[0][i], rg[0], 1e-12)
        oracle.assert_close(got[1][i], rg[1], 1e-12)


def _primitive_eqns(jaxpr):
    """Every equation of a jax_na primitive in ``jaxpr`` and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("jax_na_"):
            yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _primitive_eqns(sub)


def test_vmap_binds_primitives_with_leading_batch_axes():
    """vmap puts its axis in front of every operand and result of each primitive instead of reshaping
    it into the batch (which would gather a sharded batch, tests/sharding_checks.py): nested vmap of
    the gradient of the fused op and of qk + av binds all six primitives on [V1, V2, B, ...]."""
    case = Case((6, 5), (3, 2), dilation=(2, 1), is_causal=(False, True), H=4, Hkv=2, D=3, Dv=2, Na=2)
    V1, V2 = 2, 3
    q, k, v, ak, av = (np.broadcast_to(x, (V1, V2, *x.shape)) for x in helpers.rand_inputs(case, seed=5))
    rpb = np.broadcast_to(helpers.rand_like((4, 5, 3), 6), (V1, V2, 4, 5, 3))
    kw = dict(kernel_size=case.kernel_size, dilation=case.dilation, is_causal=case.is_causal)
    qk, av_op = helpers.qk_fn(2), helpers.av_fn(2)

    def loss(q, k, v, ak, av, rpb):
        out = _na(case)(q, k, v, additional_keys=ak, additional_values=av)
        w = qk(q, k, rpb=rpb, **kw)
        return jnp.sum(out) + jnp.sum(av_op(jnp.where(jnp.isfinite(w), w, 0.0), v, **kw))

    g = jax.vmap(jax.vmap(jax.grad(loss, argnums=tuple(range(6)))))
    eqns = list(_primitive_eqns(jax.make_jaxpr(g)(q, k, v, ak, av, rpb).jaxpr))
    names = {e.primitive.name for e in eqns}
    assert names == {f"jax_na_{n}" for n in ("fwd", "bwd", "qk", "qk_bwd", "av", "av_bwd")}, names
    for e in eqns:
        for x in (*e.invars, *e.outvars):
            assert x.aval.shape[:2] == (V1, V2), (e.primitive.name, x.aval.shape)
    # and the values: every instance is the same problem, so every instance has the same gradients
    grads = jax.jit(g)(q, k, v, ak, av, rpb)
    one = jax.grad(loss, argnums=tuple(range(6)))(q[0, 0], k[0, 0], v[0, 0], ak[0, 0], av[0, 0], rpb[0, 0])
    for a, b in zip(grads, one):
        for i in range(V1):
            for j in range(V2):
                oracle.assert_close(a[i, j], b, 1e-12)


def test_unfused_nested_vmap_of_grad():
    """qk + av under two vmaps (GQA, masked entries), a bias per outer instance shared by the inner
    ones: values and gradients (d_rpb per instance, not summed over either vmapped axis) vs the dense
    reference on each instance alone."""
    case = Case((6, 5), (3, 2), dilation=(2, 1), is_causal=(False, True), H=4, Hkv=2, D=3, Dv=2)
    V1, V2 = 2, 3
    tables = oracle.window_tables(case.spatial, case.kernel_size, case.dilation, case.is_causal)
    kw = dict(kernel_size=case.kernel_size, dilation=case.dilation, is_causal=case.is_causal,
              backend="reference")
    qk, av = helpers.qk_fn(2), helpers.av_fn(2)
    xs = [[helpers.rand_inputs(case, np.float64, seed=300 + 10 * i + j) for j in range(V2)] for i in range(V1)]
    q, k, v = (np.stack([np.stack([xs[i][j][n] for j in range(V2)]) for i in range(V1)]) for n in range(3))
    rpb = np.stack([helpers.rand_like((4, 5, 3), 320 + i) for i in range(V1)])
    ct = helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), 330)

    def loss(q, k, v, b):
        w = qk(q, k, rpb=b, **kw)
        return jnp.sum(av(jnp.where(jnp.isfinite(w), w, 0.0), v, **kw) * ct)

    def dense_loss(q, k, v, b):
        return jnp.sum(helpers.dense_av(helpers.dense_qk(q, k, b, tables, case.D ** -0.5), v, tables) * ct)

    g = jax.vmap(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), in_axes=(0, 0, 0, None)))
    val, grads = jax.jit(g)(q, k, v, rpb)
    assert grads[3].shape == (V1, V2, *rpb.shape[1:])
    for i in range(V1):
        for j in range(V2):
            want_val, want = jax.value_and_grad(dense_loss, argnums=(0, 1, 2, 3))(q[i, j], k[i, j], v[i, j],
                                                                                   rpb[i])
            oracle.assert_close(val[i, j], want_val, 1e-10, f"value {i} {j}")
            for name, a, b in zip(("dq", "dk", "dv", "d_rpb"), grads, want):
                oracle.assert_close(a[i, j], b, 1e-10, f"{name} {i} {j}")
