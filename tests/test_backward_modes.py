"""CPU: ``deterministic_backward`` (na1d/na2d/na3d and the Flax layers): argument checks, what the
CUDA lowering of the fused backward asks for (its ``deterministic`` attribute and the size of its
workspace, lowered with the kernels pretended where this build lacks them), and that the backends
without the Hopper backward compute the same gradients either way.

The kernels themselves (both modes against the float64 reference) are in tests/gpu/test_gpu_fused.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import jax_na
import jax_na._ext as ext
from jax_na import _checks

R = np.random.default_rng(0)


def _arr(*shape, dtype=jnp.bfloat16):
    return jnp.asarray(R.standard_normal(shape), dtype)


@pytest.mark.parametrize("value", [1, 0, "yes", np.int64(1), (True,)])
def test_bad_values(value):
    q = _arr(1, 8, 2, 16, dtype=jnp.float32)
    with pytest.raises(ValueError, match="deterministic_backward must be True, False or None") as ei:
        jax_na.na1d(q, q, q, 3, deterministic_backward=value)
    assert repr(value) in str(ei.value)


@pytest.mark.parametrize("value", [True, False, np.bool_(False)])
def test_params_carry_the_mode(value):
    q = _arr(1, 8, 2, 16, dtype=jnp.float32)
    params, _ = _checks.attention_args(1, q, q, q, 3, 1, 1, False, None, None, None, None,
                                       deterministic_backward=value)
    assert params.deterministic is bool(value)


# XLA_FLAGS -> the default mode (True: deterministic). Each flag's last occurrence counts and either
# one asks for determinism, as in XLA (RequireDeterminism).
XLA_FLAG_CASES = [
    ("", False),
    ("--xla_gpu_autotune_level=0", False),
    ("--xla_gpu_deterministic_ops=true", True),
    ("--xla_gpu_deterministic_ops", True),
    ("--xla_gpu_deterministic_ops=1", True),
    ("--xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_exclude_nondeterministic_ops=true", True),
    ("--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_autotune_level=2 --xla_gpu_deterministic_ops=True", True),
    ("--xla_gpu_deterministic_ops=true --xla_gpu_exclude_nondeterministic_ops=false", True),
    ("--xla_gpu_exclude_nondeterministic_ops=true --xla_gpu_deterministic_ops=false", True),
    ("--xla_gpu_exclude_nondeterministic_ops=false --xla_gpu_deterministic_ops=false", False),
]


@pytest.mark.parametrize("flags,want", XLA_FLAG_CASES)
def test_default_follows_xla_flags(monkeypatch, flags, want):
    """None (the default of na*d, the Flax layers and fused_tile_configs) at head dim 128 is
    deterministic exactly when XLA_FLAGS asks XLA for deterministic GPU ops; an explicit bool wins
    over the flags."""
    monkeypatch.setenv("XLA_FLAGS", flags)
    q = _arr(1, 8, 2, 128)
    for kw in ({}, {"deterministic_backward": None}):
        params, _ = _checks.attention_args(1, q, q, q, 3, 1, 1, False, None, None, None, None, **kw)
        assert params.deterministic is want, (flags, kw)
    for explicit in (True, False):
        params, _ = _checks.attention_args(1, q, q, q, 3, 1, 1, False, None, None, None, None,
                                           deterministic_backward=explicit)
        assert params.deterministic is explicit
    assert jax_na.fused_tile_configs(1, backward=True) == jax_na.fused_tile_configs(
        1, backward=True, deterministic_backward=want)


# (dtype, D, D_v, the default without XLA flags): non-deterministic where the Hopper kernels would
# pad to 64 or 128 (NONDETERMINISTIC_DEFAULT_HEAD_DIMS: measured faster at both), deterministic where
# no Hopper kernel runs (head dims above 128; float32 has one mode anyway).
HEAD_DIM_CASES = [
    (jnp.bfloat16, 128, 128, False),
    (jnp.float16, 100, 100, False),
    (jnp.bfloat16, 64, 96, False),    # max(D, D_v) = 96: padded to 128
    (jnp.bfloat16, 65, 65, False),
    (jnp.bfloat16, 64, 64, False),
    (jnp.float16, 32, 32, False),     # padded to 64 where the Hopper kernels run it
    (jnp.bfloat16, 8, 8, False),
    (jnp.bfloat16, 256, 256, True),
    (jnp.bfloat16, 129, 129, True),
    (jnp.float32, 128, 128, True),
]


@pytest.mark.parametrize("dtype,D,Dv,want", HEAD_DIM_CASES)
def test_default_by_head_dim(monkeypatch, dtype, D, Dv, want):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    q = _arr(1, 8, 2, D, dtype=dtype)
    v = _arr(1, 8, 2, Dv, dtype=dtype)
    params, _ = _checks.attention_args(1, q, q, v, 3, 1, 1, False, None, None, None, None)
    assert params.deterministic is want
    assert _checks.deterministic_arg(None, dtype, D, Dv) is want
    if max(D, Dv) <= 128:
        listed = jax_na.fused_tile_configs(1, dtype, max(D, Dv), backward=True)
        assert listed == jax_na.fused_tile_configs(1, dtype, max(D, Dv), backward=True, deterministic_backward=want)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    params, _ = _checks.attention_args(1, q, q, v, 3, 1, 1, False, None, None, None, None)
    assert params.deterministic is True


def test_default_mode_takes_the_deterministic_shapes(pretend_kernels, monkeypatch):
    """Backward tile shapes only the deterministic mode has (the Hopper set's 64-key 8x8 with 8x8 at
    head dim 128) run that mode under the default (None), and are refused, naming the mode, when
    deterministic_backward=False asks for the other; the non-deterministic mode's shapes keep it."""
    pretend_kernels()
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    q = _arr(1, 16, 16, 2, 128)
    args = (2, q, q, q, 3, 1, 1, False, None, None, None, "fused")
    det_only = dict(backward_q_tile_shape=(8, 8), backward_kv_tile_shape=(8, 8))
    params, _ = _checks.attention_args(*args, **det_only)
    assert params.deterministic is True and params.bwd_tiles.sm90 == 0
    with pytest.raises(ValueError, match=r"deterministic_backward=False; allowed") as ei:
        _checks.attention_args(*args, deterministic_backward=False, **det_only)
    assert "backward_kv_tile_shape" in str(ei.value)
    nd = jax_na.fused_tile_configs(2, "bfloat16", 128, backward=True, deterministic_backward=False)["fused_sm90"][0]
    params, _ = _checks.attention_args(*args, backward_q_tile_shape=nd[0], backward_kv_tile_shape=nd[1])
    assert params.deterministic is False and params.bwd_tiles.sm90 == 0
    with pytest.raises(ValueError, match="deterministic_backward=False"):  # in neither mode
        _checks.attention_args(*args, backward_q_tile_shape=(3, 3))


def test_fused_tile_configs_checks_the_mode_forward_too():
    with pytest.raises(ValueError, match="deterministic_backward must be True, False or None"):
        jax_na.fused_tile_configs(1, deterministic_backward="no")


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_same_gradients_either_way_on_the_reference(rank):
    """The reference (and every backend but the Hopper fused one) ignores the mode."""
    spatial = (9, 7, 5)[:rank]
    q, k, v = (_arr(2, *spatial, 2, 8, dtype=jnp.float32) for _ in range(3))
    fn = getattr(jax_na, f"na{rank}d")

    def grads(det):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v, 3, backend="reference", deterministic_backward=det) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for a, b in zip(grads(True), grads(False)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- CUDA lowering

def _bwd_call(f, *args):
    calls = helpers.custom_calls(helpers.cuda_hlo(f, *args), "jax_na_fused_bwd")
    assert len(calls) == 1, calls
    return calls[0]


def _det_attr(line):
    return helpers.int_attr(line, "deterministic")


_workspace_elems = helpers.workspace_elems


def _grad_fn(fn, kernel, backend, det, **kw):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, kernel, backend=backend, deterministic_backward=det, **kw).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))


# (rank, shape, heads, head dim, kernel, dtype, backend, whether deterministic_backward=False adds dQ)
CASES = [
    (2, (8, 9), 4, 128, 3, jnp.bfloat16, None, True),            # head dim 128: the Hopper backward
    (2, (8, 9), 4, 100, 3, jnp.float16, "fused", True),          # padded to 128
    (2, (8, 9), 4, 64, 3, jnp.bfloat16, None, False),            # head dim 64, 9 keys: portable
    (1, (300,), 2, 64, 257, jnp.bfloat16, None, True),           # head dim 64, 257 keys: Hopper
    (1, (300,), 2, 32, 257, jnp.bfloat16, None, False),          # head dim 32: portable (at 32)
    (1, (300,), 2, 24, 257, jnp.bfloat16, "fused_sm90", True),   # pinned Hopper: padded to 64
    (2, (8, 9), 4, 64, 3, jnp.bfloat16, "fused_sm90", True),     # pinned Hopper
    (2, (8, 9), 4, 128, 3, jnp.bfloat16, "fused_sm80", False),   # pinned portable
    (2, (8, 9), 4, 128, 3, jnp.float32, None, False),            # float32: portable only
    (2, (8, 9), 4, 256, 3, jnp.bfloat16, None, False),           # head dim 256: portable only
    (3, (4, 5, 6), 2, 128, (3, 3, 3), jnp.bfloat16, None, True),
]


@pytest.mark.parametrize("rank,shape,H,D,kernel,dtype,backend,adds", CASES)
def test_lowering(pretend_kernels, rank, shape, H, D, kernel, dtype, backend, adds):
    """deterministic 0 and a workspace of B*N*H*(P+9) floats exactly where the Hopper backward runs
    and the call asks for it; else deterministic 1 and B*N*H floats."""
    pretend_kernels()
    fn = getattr(jax_na, f"na{rank}d")
    q, k, v = (_arr(2, *shape, H, D, dtype=dtype) for _ in range(3))
    rows = 2 * math.prod(shape) * H
    P = _checks.fused_head_dim(D, D, dtype, backend or "fused")
    for det in (True, False):
        line = _bwd_call(_grad_fn(fn, kernel, backend, det), q, k, v)
        atomic = adds and not det
        assert _det_attr(line) == (0 if atomic else 1), (det, line)
        assert _workspace_elems(line) == (rows * (P + 9) if atomic else rows), (det, line)


def test_no_hopper_no_atomics(pretend_kernels):
    """Without a compute capability 9.0 GPU the backward stays deterministic (and small)."""
    pretend_kernels(hopper=False)
    q = _arr(1, 8, 9, 2, 128)
    line = _bwd_call(_grad_fn(jax_na.na2d, 3, None, False), q, q, q)
    assert _det_attr(line) == 1 and _workspace_elems(line) == 8 * 9 * 2


def test_flax_layer_passes_it_on(pretend_kernels):
    from jax_na.flax import NeighborhoodAttention2D

    pretend_kernels()
    x = _arr(1, 8, 9, 256)
    for det, want in ((True, 1), (False, 0)):
        layer = NeighborhoodAttention2D(num_heads=2, kernel_size=3, dtype=jnp.bfloat16, deterministic_backward=det)
        params = jax.eval_shape(layer.init, jax.random.key(0), x)
        params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
        loss = lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32))
        line = _bwd_call(jax.grad(loss, argnums=1), params, x)
        assert _det_attr(line) == want, line


@pytest.mark.parametrize("flags,want", [("", 0), ("--xla_gpu_deterministic_ops=true", 1)])
def test_default_lowering_follows_xla_flags(pretend_kernels, monkeypatch, flags, want):
    """A call without deterministic_backward at head dim 128 (na2d and the Flax layer, 2 heads of
    128) lowers to the warp-specialized kernel's attribute and workspace unless XLA_FLAGS asks for
    deterministic ops; at head dim 64 it lowers to the deterministic kernels either way."""
    from jax_na.flax import NeighborhoodAttention2D

    pretend_kernels()
    monkeypatch.setenv("XLA_FLAGS", flags)
    q = _arr(1, 8, 9, 2, 128)
    loss = lambda q, k, v: jnp.sum(jax_na.na2d(q, k, v, 3).astype(jnp.float32))
    line = _bwd_call(jax.grad(loss, argnums=(0, 1, 2)), q, q, q)
    rows = 8 * 9 * 2
    assert _det_attr(line) == want and _workspace_elems(line) == (rows if want else rows * 137), line
    layer = NeighborhoodAttention2D(num_heads=2, kernel_size=3, dtype=jnp.bfloat16)
    x = _arr(1, 8, 9, 256)
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    line = _bwd_call(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32)), argnums=1), params, x)
    assert _det_attr(line) == want, line
    q64 = _arr(1, 8, 9, 2, 64)
    line = _bwd_call(jax.grad(loss, argnums=(0, 1, 2)), q64, q64, q64)
    assert _det_attr(line) == 1 and _workspace_elems(line) == rows, line
