"""GPU: every kernel backend against the float64 reference (on upcast inputs) on the edge-case sweep,
in f32/f16/bf16, forward (out, lse) and backward (all grads), with poisoned memory, twice per case
(bitwise deterministic), plus a large batch and odd head dims. The fused backend runs every case its
kernels take (float16/bfloat16 with head dims up to 256, float32 up to 128, padded to 32/64/128/256) and
skips the rest with the reason;
tests/gpu/test_gpu_fused.py has its own cases at the native head dims."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import jax_na
from gpu_common import (DTYPES, TOL, backends_under_test, check_case, na_fns, random_inputs, rel, to64,
                        unsupported)
from helpers import Case

pytestmark = pytest.mark.gpu

CASES = helpers.edge_cases()


def _skip_unsupported(backend, dtype, case):
    why = unsupported(backend, dtype, case.D, case.Dv)
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", backends_under_test())
def test_edge_cases(backend, case, dtype):
    _skip_unsupported(backend, dtype, case)
    check_case(case, backend, dtype, seed=helpers.seed_of(case))


BIG = [
    Case((16, 16), 5, B=48, H=4, Hkv=2, D=32, Dv=32, Na=3),
    Case((2048,), 33, stride=4, dilation=3, is_causal=True, B=4, H=8, Hkv=1, D=64, Dv=64),
    Case((8, 20, 20), (3, 7, 7), dilation=(1, 2, 2), is_causal=(True, False, False), B=2, H=4, Hkv=4, D=32,
         Dv=48),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", BIG, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", backends_under_test())
def test_large_problems_many_blocks(backend, case, dtype):
    _skip_unsupported(backend, dtype, case)
    check_case(case, backend, dtype, seed=7)


@pytest.mark.parametrize("D,Dv", [(1, 1), (3, 5), (17, 9), (65, 33), (128, 128), (200, 72)])
@pytest.mark.parametrize("backend", backends_under_test())
def test_any_head_dim(backend, D, Dv):
    case = Case((9, 10), (3, 4), stride=(1, 2), is_causal=(False, True), H=2, Hkv=1, D=D, Dv=Dv, Na=2)
    dtypes = [d for d in DTYPES if not unsupported(backend, d, D, Dv)]
    if not dtypes:
        pytest.skip(unsupported(backend, jnp.bfloat16, D, Dv))
    for dtype in dtypes:
        check_case(case, backend, dtype, seed=D)


@pytest.mark.parametrize("D,Dv", [(16, 8), (64, 64), (128, 128), (136, 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_auto_backend_follows_preference(dtype, D, Dv):
    """auto lowers to the first kernel family of AUTO_PREFERENCE that supports the call (fused for
    float16/bfloat16 with head dims up to 256, float32 up to 128), else to the reference, bit for bit."""
    from jax_na import primitives
    case = Case((12, 11), (5, 3), stride=(2, 1), dilation=(2, 3), is_causal=(True, False), H=4, Hkv=2,
                D=D, Dv=Dv, Na=2)
    args = random_inputs(case, dtype, 5)
    chosen = primitives.cuda_kernel("auto", "fwd", args[:5]) or "reference"
    expect = "fused" if "fused" in jax_na.available_backends() and not unsupported("fused", dtype, D, Dv) \
        else "reference"
    assert chosen == expect, (chosen, expect)
    auto = na_fns(case, None)(*args)
    explicit = na_fns(case, chosen)(*args)
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(explicit)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    text = jax.jit(lambda q, k, v: jax_na.na2d(q, k, v, 3)).lower(*args[:3]).as_text()
    if chosen == "reference":
        assert "jax_na_" not in text
    else:
        assert f"jax_na_{chosen}_fwd" in text


@pytest.mark.parametrize("backend", backends_under_test())
def test_kernel_backend_rejects_float64(backend):
    if backend == "reference":
        pytest.skip("no kernel backend on this machine")
    q = jnp.ones((1, 8, 2, 4), jnp.float64)
    with pytest.raises((TypeError, ValueError)) as ei:
        jax_na.na1d(q, q, q, 3, backend=backend)
    assert backend in str(ei.value) and "float64" in str(ei.value)


@pytest.mark.parametrize("backend", backends_under_test())
def test_vmap_and_grad_on_device(backend):
    """vmap-of-grad through the kernels equals per-slice reference grads."""
    case = Case((10, 9), (3, 3), stride=(1, 3), dilation=(2, 1), is_causal=(False, True), H=4, Hkv=2, D=16,
                Dv=16, Na=2)
    V = 3
    dtype = jnp.float32 if backend != "fused" else jnp.bfloat16   # fused: half precision only
    tol = TOL[jnp.dtype(dtype)]
    xs = [random_inputs(case, dtype, 40 + i) for i in range(V)]
    stacked = [jnp.stack([x[j] for x in xs]) for j in range(7)]
    fn = helpers.na_fn(2)

    def loss(q, k, v, ak, av, ct_o, ct_l, backend):
        out, lse = fn(q, k, v, **case.kwargs(), additional_keys=ak, additional_values=av, return_lse=True,
                      backend=backend)
        return jnp.sum(out * ct_o) + jnp.sum(lse * ct_l)

    g = jax.jit(jax.vmap(jax.grad(functools.partial(loss, backend=backend), argnums=(0, 1, 2, 3, 4))))(*stacked)
    for i in range(V):
        rg = jax.grad(functools.partial(loss, backend="reference"), argnums=(0, 1, 2, 3, 4))(
            *(to64(a) for a in xs[i]))
        for a, b in zip(g, rg):
            rel(a[i], b, tol, f"vmap-of-grad slice {i}")
