"""Flax linen layers: init, apply vs a hand-built oracle, grads, rel_pos_bias, GQA, dropout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import oracle

flax = pytest.importorskip("flax")
from jax_na.flax import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D  # noqa: E402

LAYERS = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}


def _np(p):
    return np.asarray(p, np.float64)


def _layer_oracle(params, x, num_heads, kv_heads, head_dim, kernel_size, stride=1, dilation=1,
                  is_causal=False, rel_pos_bias=False, use_bias=True):
    """The layer's math with oracle attention: q/k/v projections, NA, output projection."""
    p = params["params"]
    x = _np(x)

    def proj(name, heads):
        y = np.einsum("...c,chd->...hd", x, _np(p[name]["kernel"]).reshape(x.shape[-1], heads, head_dim))
        if use_bias:
            y = y + _np(p[name]["bias"]).reshape(heads, head_dim)
        return y

    q, k, v = proj("query", num_heads), proj("key", kv_heads), proj("value", kv_heads)
    if rel_pos_bias:
        s = oracle.qk(q, k, kernel_size, dilation, is_causal, rpb=_np(p["rpb"]))
        w = np.exp(s - s.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        y = oracle.av(w, v, kernel_size, dilation, is_causal)
    else:
        y, _ = oracle.attention(q, k, v, kernel_size, stride, dilation, is_causal)
    ko = _np(p["out"]["kernel"])
    out = np.einsum("...hd,hdo->...o", y, ko.reshape(num_heads, head_dim, -1))
    if use_bias:
        out = out + _np(p["out"]["bias"])
    return out


@pytest.mark.parametrize("rank,shape,kw", [
    (1, (2, 13, 16), dict(num_heads=4, kernel_size=5, stride=2, is_causal=True)),
    (2, (1, 7, 9, 12), dict(num_heads=3, kernel_size=(3, 4), dilation=(2, 1), is_causal=(False, True))),
    (3, (1, 4, 5, 6, 8), dict(num_heads=2, kernel_size=(2, 3, 3), stride=(1, 1, 3))),
])
def test_init_apply_matches_oracle(rank, shape, kw):
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    layer = LAYERS[rank](**kw)
    params = layer.init(jax.random.key(1), x)
    p = params["params"]
    C = shape[-1]
    hd = C // kw["num_heads"]
    assert set(p) == {"query", "key", "value", "out"}
    assert p["query"]["kernel"].size == C * C and p["out"]["kernel"].size == C * C
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    y = layer.apply(params, x)
    assert y.shape == shape and y.dtype == jnp.float32
    want = _layer_oracle(params, x, kw["num_heads"], kw["num_heads"], hd, kw["kernel_size"],
                         kw.get("stride", 1), kw.get("dilation", 1), kw.get("is_causal", False))
    oracle.assert_close(y, want, 1e-5)
    # jit gives the same
    y2 = jax.jit(layer.apply)(params, x)
    oracle.assert_close(y2, want, 1e-5)


def test_features_gqa_no_bias():
    x = jax.random.normal(jax.random.key(0), (2, 6, 7, 10), jnp.float32)
    layer = NeighborhoodAttention2D(num_heads=4, num_kv_heads=2, qkv_features=16, out_features=5,
                                    kernel_size=3, use_bias=False)
    params = layer.init(jax.random.key(1), x)
    p = params["params"]
    assert p["query"]["kernel"].size == 10 * 16
    assert p["key"]["kernel"].size == 10 * 2 * 4 and p["value"]["kernel"].size == 10 * 2 * 4
    assert not any("bias" in v for v in p.values() if isinstance(v, dict))
    y = layer.apply(params, x)
    assert y.shape == (2, 6, 7, 5)
    oracle.assert_close(y, _layer_oracle(params, x, 4, 2, 4, 3, use_bias=False), 1e-5)


@pytest.mark.parametrize("rank,shape,ks,dil,causal", [
    (1, (2, 11, 8), 3, 2, True),
    (2, (1, 7, 8, 8), (3, 4), 1, (False, True)),
    (3, (1, 4, 5, 5, 4), (2, 3, 3), (1, 1, 1), False),
])
def test_rel_pos_bias(rank, shape, ks, dil, causal):
    x = jax.random.normal(jax.random.key(2), shape, jnp.float32)
    H = 2
    layer = LAYERS[rank](num_heads=H, kernel_size=ks, dilation=dil, is_causal=causal, rel_pos_bias=True)
    params = layer.init(jax.random.key(3), x)
    kt = oracle._tup(ks, rank)
    assert params["params"]["rpb"].shape == (H, *(2 * k - 1 for k in kt))
    # make the bias matter
    params = jax.tree.map(lambda a: a, params)
    params["params"]["rpb"] = jax.random.normal(jax.random.key(4), params["params"]["rpb"].shape)
    y = layer.apply(params, x)
    want = _layer_oracle(params, x, H, H, shape[-1] // H, ks, 1, dil, causal, rel_pos_bias=True)
    oracle.assert_close(y, want, 1e-5)
    # the bias has a gradient, matching finite differences of the oracle on one entry
    loss = lambda p: jnp.sum(layer.apply(p, x) ** 2)
    g = jax.grad(loss)(params)["params"]["rpb"]
    assert g.shape == params["params"]["rpb"].shape and float(jnp.abs(g).max()) > 0
    idx = (1,) + tuple(k - 1 for k in kt)   # zero offset: used by every query
    eps = 1e-3

    def oloss(delta):
        p2 = jax.tree.map(lambda a: np.array(a, np.float64), params)
        p2["params"]["rpb"][idx] += delta
        return np.sum(_layer_oracle(p2, x, H, H, shape[-1] // H, ks, 1, dil, causal, rel_pos_bias=True) ** 2)
    fd = (oloss(eps) - oloss(-eps)) / (2 * eps)
    np.testing.assert_allclose(float(g[idx]), fd, rtol=2e-3)


def test_rel_pos_bias_requires_stride_1():
    x = jnp.ones((1, 8, 8, 4))
    with pytest.raises(ValueError, match="stride"):
        NeighborhoodAttention2D(num_heads=2, kernel_size=3, stride=2, rel_pos_bias=True).init(jax.random.key(0), x)


def test_rel_pos_bias_with_fused_backend_is_an_error():
    """rel_pos_bias runs the unfused ops, which the fused kernels do not have: a clear error naming
    the backends that work (also on machines without kernels: the layer checks before any call)."""
    x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
    with pytest.raises(ValueError) as ei:
        NeighborhoodAttention2D(num_heads=2, kernel_size=3, rel_pos_bias=True, backend="fused",
                                dtype=jnp.bfloat16).init(jax.random.key(0), x)
    msg = str(ei.value)
    assert "rel_pos_bias" in msg and "fused" in msg and "reference" in msg and "naive" in msg, msg
    assert "'gemm'" in msg, msg


@pytest.mark.parametrize("rel_pos_bias", [True, False])
def test_gemm_backend_layer(monkeypatch, rel_pos_bias):
    """backend="gemm" runs the layer with and without rel_pos_bias (on its unfused ops either way).
    The gemm targets are pretended compiled here; lowered for the CPU the layer then computes what
    the reference does."""
    from jax_na import _ext
    has_target = _ext.has_target
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(_ext, "has_target", lambda name: name.startswith("jax_na_gemm_") or has_target(name))
    jax.clear_caches()
    try:
        x = jax.random.normal(jax.random.key(2), (2, 7, 8, 8), jnp.float32)
        kw = dict(num_heads=2, kernel_size=(3, 4), is_causal=(False, True), rel_pos_bias=rel_pos_bias)
        ref_layer = NeighborhoodAttention2D(**kw, backend="reference")
        params = ref_layer.init(jax.random.key(3), x)
        layer = NeighborhoodAttention2D(**kw, backend="gemm")
        oracle.assert_close(jax.jit(layer.apply)(params, x), ref_layer.apply(params, x), 1e-5)
        g = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)
        rg = jax.grad(lambda p: jnp.sum(ref_layer.apply(p, x) ** 2))(params)
        # all parameters at once: the key bias's gradient is 0 up to rounding (a softmax shift)
        flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
        oracle.assert_close(flat(g), flat(rg), 1e-5)
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_layer_argument_errors():
    x = jnp.ones((1, 8, 8, 6))
    with pytest.raises(ValueError, match="num_kv_heads"):
        NeighborhoodAttention2D(num_heads=3, num_kv_heads=2, kernel_size=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_heads"):
        NeighborhoodAttention2D(num_heads=4, kernel_size=3).init(jax.random.key(0), x)  # 6 % 4
    with pytest.raises(ValueError, match="kernel_size"):
        NeighborhoodAttention2D(num_heads=2, kernel_size=9).init(jax.random.key(0), x)
    with pytest.raises(ValueError):
        NeighborhoodAttention2D(num_heads=2, kernel_size=3).init(jax.random.key(0), jnp.ones((8, 8, 6)))


def test_grad_and_training_step_reduce_loss():
    x = jax.random.normal(jax.random.key(5), (2, 9, 9, 8), jnp.float32)
    target = jnp.roll(x, 1, axis=1)
    layer = NeighborhoodAttention2D(num_heads=2, kernel_size=3, num_kv_heads=1, rel_pos_bias=True)
    params = layer.init(jax.random.key(6), x)
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    def loss(p):
        return jnp.mean((layer.apply(p, x) - target) ** 2)

    @jax.jit
    def step(p, o):
        l, g = jax.value_and_grad(loss)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l, g

    p, o, l0, g = step(params, opt)
    for leaf in jax.tree.leaves(g):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert all(float(jnp.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(g))
    for _ in range(15):
        p, o, l, _ = step(p, o)
    assert float(l) < 0.9 * float(l0)


def test_grad_matches_finite_difference_on_input():
    x = jax.random.normal(jax.random.key(7), (1, 7, 6), jnp.float64)
    layer = NeighborhoodAttention1D(num_heads=2, kernel_size=3, dilation=2, param_dtype=jnp.float64)
    params = layer.init(jax.random.key(8), x)
    f = lambda x: jnp.sum(jnp.sin(layer.apply(params, x)))
    g = jax.grad(f)(x)
    fo = lambda x: np.sum(np.sin(_layer_oracle(params, x, 2, 2, 3, 3, 1, 2)))
    x64 = np.asarray(x)
    for idx in [(0, 0, 0), (0, 3, 2), (0, 6, 5)]:
        xp, xm = x64.copy(), x64.copy()
        xp[idx] += 1e-6
        xm[idx] -= 1e-6
        np.testing.assert_allclose(float(g[idx]), (fo(xp) - fo(xm)) / 2e-6, rtol=1e-6, atol=1e-9)


def test_dropout_deterministic_vs_not():
    x = jax.random.normal(jax.random.key(9), (2, 10, 8), jnp.float32)
    layer = NeighborhoodAttention1D(num_heads=2, kernel_size=3, dropout_rate=0.5)
    params = layer.init(jax.random.key(10), x, deterministic=True)
    y_det = layer.apply(params, x, deterministic=True)
    y_det2 = layer.apply(params, x, deterministic=True)
    np.testing.assert_array_equal(np.asarray(y_det), np.asarray(y_det2))
    oracle.assert_close(y_det, _layer_oracle(params, x, 2, 2, 4, 3), 1e-5)
    y1 = layer.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(11)})
    y2 = layer.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(12)})
    y1b = layer.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(11)})
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y1b))
    assert not np.array_equal(np.asarray(y1), np.asarray(y2))
    zero = np.asarray(y1) == 0
    assert 0.3 < zero.mean() < 0.7
    np.testing.assert_allclose(np.asarray(y1)[~zero], 2 * np.asarray(y_det)[~zero], rtol=1e-5, atol=1e-6)
    # module-level deterministic field
    layer_d = NeighborhoodAttention1D(num_heads=2, kernel_size=3, dropout_rate=0.5, deterministic=True)
    np.testing.assert_array_equal(np.asarray(layer_d.apply(params, x)), np.asarray(y_det))
    # no dropout_rate: deterministic flag irrelevant
    layer0 = NeighborhoodAttention1D(num_heads=2, kernel_size=3)
    np.testing.assert_array_equal(np.asarray(layer0.apply(params, x)), np.asarray(y_det))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_compute_dtype(dtype):
    x = jax.random.normal(jax.random.key(13), (1, 6, 6, 8), jnp.float32)
    layer = NeighborhoodAttention2D(num_heads=2, kernel_size=3, dtype=dtype)
    params = layer.init(jax.random.key(14), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    y = layer.apply(params, x)
    assert y.dtype == jnp.dtype(dtype)
    # bf16/fp16 compute of the projections dominates: a loose bound against the float64 layer
    err = oracle.rel_err(np.asarray(y.astype(jnp.float32)), _layer_oracle(params, x, 2, 2, 4, 3))
    assert err < (5e-2 if dtype == jnp.bfloat16 else 1e-2), err


def test_vmap_over_layer_apply():
    x = jax.random.normal(jax.random.key(15), (3, 1, 9, 4), jnp.float32)
    layer = NeighborhoodAttention1D(num_heads=2, kernel_size=4, is_causal=True)
    params = layer.init(jax.random.key(16), x[0])
    y = jax.vmap(lambda xi: layer.apply(params, xi))(x)
    for i in range(3):
        oracle.assert_close(y[i], _layer_oracle(params, x[i], 2, 2, 2, 4, is_causal=True), 1e-5)
