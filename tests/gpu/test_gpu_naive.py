"""GPU: every kernel backend against the float64 reference (on upcast inputs) on the edge-case sweep,
in f32/f16/bf16, forward (out, lse) and backward (all grads), with poisoned memory, twice per case
(bitwise deterministic), plus a large batch and odd head dims."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import jax_na
from gpu_common import DTYPES, TOL, backends_under_test, poison_device_memory, rel, to64
from helpers import Case

pytestmark = pytest.mark.gpu

CASES = helpers.edge_cases()


@functools.lru_cache(maxsize=None)
def _fns(case, backend):
    """jitted (out, lse, grads) of na{r}d for a case: one compile per (case, backend, dtype)."""
    fn = helpers.na_fn(case.rank)

    def run(q, k, v, ak, av, ct_o, ct_l):
        def f(q, k, v, ak, av):
            kw = {} if ak is None else dict(additional_keys=ak, additional_values=av)
            return fn(q, k, v, **case.kwargs(), scale=case.scale, return_lse=True, backend=backend, **kw)
        (out, lse), vjp = jax.vjp(f, q, k, v, ak, av)
        grads = vjp((ct_o, ct_l.astype(lse.dtype)))
        return out, lse, [g for g in grads if g is not None]

    return jax.jit(run)


def _random(case, dtype, seed):
    q, k, v, ak, av = (None if x is None else jnp.asarray(x, dtype)
                       for x in helpers.rand_inputs(case, np.float32, seed=seed))
    ct_o = jnp.asarray(helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), seed + 1), dtype)
    ct_l = jnp.asarray(helpers.rand_like((case.B, *case.spatial, case.H), seed + 2), jnp.float32)
    return q, k, v, ak, av, ct_o, ct_l


def _check(case, backend, dtype, seed):
    args = _random(case, dtype, seed)
    run = _fns(case, backend)
    # 1) a first run on other fresh random inputs, 2) poison, 3) the run under test, 4) poison, 5) again
    jax.block_until_ready(run(*_random(case, dtype, seed + 1000)))
    poison_device_memory()
    out, lse, grads = jax.block_until_ready(run(*args))
    poison_device_memory()
    out2, lse2, grads2 = jax.block_until_ready(run(*args))

    assert out.dtype == jnp.dtype(dtype) and lse.dtype == jnp.float32
    ref_out, ref_lse, ref_grads = _fns(case, "reference")(*(to64(a) for a in args))
    tol = TOL[jnp.dtype(dtype)]
    rel(out, ref_out, tol, f"out {case.id}")
    rel(lse, ref_lse, 1e-5, f"lse {case.id}")   # float32 softmax whatever the input dtype
    names = ["dq", "dk", "dv", "d_additional_keys", "d_additional_values"]
    assert len(grads) == len(ref_grads)
    for name, g, rg in zip(names, grads, ref_grads):
        assert g.dtype == jnp.dtype(dtype), name
        rel(g, rg, tol, f"{name} {case.id}")
    # bitwise deterministic across runs
    for name, a, b in zip(["out", "lse"] + names, [out, lse, *grads], [out2, lse2, *grads2]):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)),
                                      err_msg=f"{name} not deterministic")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", backends_under_test())
def test_edge_cases(backend, case, dtype):
    _check(case, backend, dtype, seed=helpers.seed_of(case))


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
    _check(case, backend, dtype, seed=7)


@pytest.mark.parametrize("D,Dv", [(1, 1), (3, 5), (17, 9), (65, 33), (128, 128), (200, 72)])
@pytest.mark.parametrize("backend", backends_under_test())
def test_any_head_dim(backend, D, Dv):
    case = Case((9, 10), (3, 4), stride=(1, 2), is_causal=(False, True), H=2, Hkv=1, D=D, Dv=Dv, Na=2)
    for dtype in DTYPES:
        _check(case, backend, dtype, seed=D)


@pytest.mark.parametrize("backend", backends_under_test())
def test_auto_backend_follows_preference(backend):
    """auto lowers to the first kernel family of AUTO_PREFERENCE, or to the reference when it is
    empty (today: the reference beats the naive kernels on the H100), bit for bit."""
    from jax_na import primitives
    if backend == "reference":
        pytest.skip("no kernel backend on this machine")
    assert backend in jax_na.available_backends()
    case = Case((12, 11), (5, 3), stride=(2, 1), dilation=(2, 3), is_causal=(True, False), H=4, Hkv=2,
                D=16, Dv=8, Na=2)
    args = _random(case, jnp.bfloat16, 5)
    chosen = primitives.AUTO_PREFERENCE[0] if primitives.AUTO_PREFERENCE else "reference"
    auto = _fns(case, None)(*args)
    explicit = _fns(case, chosen)(*args)
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(explicit)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    text = jax.jit(lambda q, k, v: jax_na.na2d(q, k, v, 3)).lower(*args[:3]).as_text()
    if primitives.AUTO_PREFERENCE:
        assert f"jax_na_{chosen}_fwd" in text
    else:
        assert "jax_na_naive" not in text


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
    xs = [_random(case, jnp.float32, 40 + i) for i in range(V)]
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
            rel(a[i], b, 1e-5, f"vmap-of-grad slice {i}")
