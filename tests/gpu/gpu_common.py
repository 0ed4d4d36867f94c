"""Shared pieces of the GPU tests: which backends to test, poisoning, float64 reference runs."""

import functools
import math
import os

# The FFI handlers fill every result with NaN bytes before their kernels run when this is set (read once,
# at the first kernel call of the process): unwritten elements then fail the comparisons.
os.environ.setdefault("JAX_NA_POISON_OUTPUTS", "1")

import jax
import jax.numpy as jnp
import numpy as np

import helpers
import jax_na
import oracle
from jax_na import _checks

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16]
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.float16): 2e-3, jnp.dtype(jnp.bfloat16): 1e-2}


def tolerances(backend, dtype):
    """Bounds of the relative Frobenius error vs float64 of na*d on ``backend``: (out and gradients,
    LSE). The same for every backend (SEMANTICS.md; the LSE is float32 whatever the input dtype)."""
    return TOL[jnp.dtype(dtype)], 1e-5


def backends_under_test(unfused=False):
    """Every non-reference backend usable here (``unfused``: those with the unfused qk/av ops, which
    the fused kernels do not have); on CPU (JAX_NA_TEST_GPU_ON_CPU=1) the reference stands in so that
    the test logic itself can be checked."""
    if os.environ.get("JAX_NA_TEST_GPU_ON_CPU") == "1":
        return ["reference"]
    # "fused_sm80"/"fused_sm90" pin the kernels that "fused" picks by itself: the sweep runs "fused"
    # (Hopper kernels on an H100 where auto picks them); test_gpu_fused.py runs both sets by name.
    b = [x for x in jax_na.available_backends() if x not in ("reference", "fused_sm80", "fused_sm90")]
    if unfused:
        b = [x for x in b if x in _checks.UNFUSED_BACKENDS]
    return b or ["naive"]   # the gpu marker skips these tests where no kernel backend exists


def unsupported(backend, dtype, D, Dv):
    """Why ``backend`` cannot take a call of this dtype and head dims (a pytest.skip reason), or None.
    Only the fused kernels have such limits: head dims up to 256 in float16/bfloat16 on the portable set
    and up to 128 in float32 and on the Hopper set ("fused_sm90", float16/bfloat16 only), padded to
    the next instantiated one (_checks.fused_head_dims)."""
    if _checks.backend_family(backend) != "fused":
        return None
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _checks.BACKEND_DTYPES[backend]]:
        return f"{backend} does not take {jnp.dtype(dtype).name}"
    if _checks.fused_head_dim(D, Dv, dtype, backend) is None:
        dims = _checks.fused_head_dims(dtype, backend)
        return f"{backend} takes head dims up to {dims[-1]} in {jnp.dtype(dtype).name}, not D={D}, D_v={Dv}"
    return None


def poison_device_memory(mib=256):
    """Fill a large allocation with NaN and free it: XLA's allocator hands the same memory to the next
    outputs/workspaces, so elements a kernel forgets to write show up as NaN (or as stale values)."""
    n = mib * 2**20 // 4
    x = jnp.full((n,), jnp.nan, jnp.float32)
    x.block_until_ready()
    del x


def to64(x):
    return None if x is None else jnp.asarray(x).astype(jnp.float64)


def rel(a, b, tol, what):
    """Relative Frobenius error of a (any dtype) vs float64 b, NaN/Inf never pass."""
    return oracle.assert_close(np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64), np.asarray(b), tol,
                               what)


# ----------------------------------------------------------------------------- one case, checked

@functools.lru_cache(maxsize=None)
def na_fns(case, backend, deterministic_backward=None, bwd_tiles=None):
    """jitted (out, lse, grads) of na{r}d for a case: one compile per (case, backend, dtype);
    ``deterministic_backward``: passed on unless None (na{r}d's default); ``bwd_tiles``: None or
    (backward_q_tile_shape, backward_kv_tile_shape)."""
    fn = helpers.na_fn(case.rank)
    det = {} if deterministic_backward is None else dict(deterministic_backward=deterministic_backward)
    if bwd_tiles is not None:
        det.update(backward_q_tile_shape=bwd_tiles[0], backward_kv_tile_shape=bwd_tiles[1])

    def run(q, k, v, ak, av, ct_o, ct_l):
        def f(q, k, v, ak, av):
            kw = {} if ak is None else dict(additional_keys=ak, additional_values=av)
            return fn(q, k, v, **case.kwargs(), scale=case.scale, return_lse=True, backend=backend, **kw, **det)
        (out, lse), vjp = jax.vjp(f, q, k, v, ak, av)
        grads = vjp((ct_o, ct_l.astype(lse.dtype)))
        return out, lse, [g for g in grads if g is not None]

    return jax.jit(run)


def random_inputs(case, dtype, seed):
    """q, k, v, add_k, add_v (None without additional KV) and the cotangents of out and lse."""
    q, k, v, ak, av = (None if x is None else jnp.asarray(x, dtype)
                       for x in helpers.rand_inputs(case, np.float32, seed=seed))
    ct_o = jnp.asarray(helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), seed + 1), dtype)
    ct_l = jnp.asarray(helpers.rand_like((case.B, *case.spatial, case.H), seed + 2), jnp.float32)
    return q, k, v, ak, av, ct_o, ct_l


def bwd_tiles_of(case, backend, dtype, bwd_tiles=None, deterministic_backward=None):
    """The backward's FusedTiles a call resolves to (None: the defaults); ``bwd_tiles`` and
    ``deterministic_backward`` as na_fns'."""
    from jax_na import _checks

    q = jax.ShapeDtypeStruct((1, *case.spatial, case.H, case.D), jnp.dtype(dtype))
    v = jax.ShapeDtypeStruct((1, *case.spatial, case.Hkv, case.Dv), jnp.dtype(dtype))
    bq, bkv = bwd_tiles or (None, None)
    p = _checks.window_params(case.rank, case.spatial, case.kernel_size, case.stride, case.dilation,
                              case.is_causal, case.scale, case.D)
    return _checks.bwd_tiles_args(case.rank, q, v, backend or "auto", bq, bkv,
                                  (p.kernel_size, p.stride, p.dilation, p.is_causal),
                                  _checks.deterministic_arg(deterministic_backward, dtype, case.D, case.Dv))


def adds_dq(case, backend, dtype, deterministic_backward=None, bwd_tiles=None) -> bool:
    """Whether the call's fused backward adds dQ in its Hopper kernel (na{r}d's
    deterministic_backward=False on the Hopper kernels): its dq is then not bitwise reproducible."""
    from jax_na import _checks

    if _checks.deterministic_arg(deterministic_backward, dtype, case.D, case.Dv) or \
            _checks.backend_family(backend) != "fused":
        return False
    P = _checks.fused_head_dim(case.D, case.Dv, dtype, backend)
    ks = case.kernel_size if isinstance(case.kernel_size, (tuple, list)) else (case.kernel_size,) * case.rank
    return P is not None and _checks.fused_bwd_adds_dq(dtype, P, int(np.prod(ks)), backend,
                                                       bwd_tiles_of(case, backend, dtype, bwd_tiles, False))


def check_case(case, backend, dtype, seed, deterministic_backward=None, bwd_tiles=None):
    """out, lse and every gradient of ``backend`` against the float64 reference on the same (upcast)
    inputs, with poisoned memory, and bitwise equal over two runs (deterministic; dq only where the
    backward is: adds_dq, which this returns). ``bwd_tiles`` as na_fns'."""
    args = random_inputs(case, dtype, seed)
    run = na_fns(case, backend, deterministic_backward, bwd_tiles)
    # 1) a first run on other fresh random inputs, 2) poison, 3) the run under test, 4) poison, 5) again
    jax.block_until_ready(run(*random_inputs(case, dtype, seed + 1000)))
    poison_device_memory()
    out, lse, grads = jax.block_until_ready(run(*args))
    poison_device_memory()
    out2, lse2, grads2 = jax.block_until_ready(run(*args))

    assert out.dtype == jnp.dtype(dtype) and lse.dtype == jnp.float32
    ref_out, ref_lse, ref_grads = na_fns(case, "reference")(*(to64(a) for a in args))
    tol, lse_tol = tolerances(backend or "fused", dtype)
    rel(out, ref_out, tol, f"out {case.id}")
    rel(lse, ref_lse, lse_tol, f"lse {case.id}")
    names = ["dq", "dk", "dv", "d_additional_keys", "d_additional_values"]
    assert len(grads) == len(ref_grads)
    for name, g, rg, x in zip(names, grads, ref_grads, args):
        assert g.dtype == jnp.dtype(dtype) and g.shape == x.shape, name
        rel(g, rg, tol, f"{name} {case.id}")
    # bitwise deterministic across runs (the second run's dq against the reference where it is not)
    atomic_dq = adds_dq(case, backend, dtype, deterministic_backward, bwd_tiles)
    for name, a, b in zip(["out", "lse"] + names, [out, lse, *grads], [out2, lse2, *grads2]):
        if name == "dq" and atomic_dq:
            rel(b, ref_grads[0], tol, f"dq {case.id} (second run)")
            continue
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)),
                                      err_msg=f"{name} not deterministic")
    return atomic_dq


# ----------------------------------------------------------------------------- unfused ops, checked

def unfused_kw(case):
    return dict(kernel_size=case.kernel_size, dilation=case.dilation, is_causal=case.is_causal)


@functools.lru_cache(maxsize=None)
def unfused_fns(case, backend, with_rpb):
    """jitted scores, dq, dk, d_rpb (None without a bias), av output, d_weights, dv of na{r}d_qk/_av."""
    qk, av = helpers.qk_fn(case.rank), helpers.av_fn(case.rank)

    def run(q, k, rpb, v, w, ct_s, ct_o):
        fq = lambda q, k, b: qk(q, k, **unfused_kw(case), rpb=b, scale=case.scale, backend=backend)
        if with_rpb:
            s, vjp = jax.vjp(fq, q, k, rpb)
            dq, dk, drpb = vjp(ct_s)
        else:
            s, vjp = jax.vjp(lambda q, k: fq(q, k, None), q, k)
            (dq, dk), drpb = vjp(ct_s), None
        o, vjp = jax.vjp(lambda w, v: av(w, v, **unfused_kw(case), backend=backend), w, v)
        dw, dv = vjp(ct_o)
        return s, dq, dk, drpb, o, dw, dv

    return jax.jit(run)


def unfused_inputs(case, dtype, seed):
    """(q, k, rpb, v, weights, scores cotangent (0 at masked entries), av output cotangent), and the
    oracle's window validity ``[N, W]``."""
    W = math.prod(oracle._tup(case.kernel_size, case.rank))
    q, k, v, _, _ = helpers.rand_inputs(case, np.float32, seed=seed)
    rpb = helpers.rand_like((case.H, *(2 * k_ - 1 for k_ in oracle._tup(case.kernel_size, case.rank))), seed + 1)
    w = helpers.rand_like((case.B, *case.spatial, case.H, W), seed + 2)
    _, valid, _ = oracle.window_tables(case.spatial, case.kernel_size, case.dilation, case.is_causal)
    ct_s = helpers.rand_like(w.shape, seed + 3)
    ct_s = np.where(valid.reshape(*case.spatial, 1, W)[None], ct_s, 0.0)   # cotangent of -inf entries: 0
    ct_o = helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), seed + 4)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, rpb, v, w, ct_s, ct_o)), valid


def check_unfused(case, backend, dtype, with_rpb, seed):
    """na{r}d_qk (with or without rpb) and na{r}d_av of ``backend``, forward and backward, against the
    float64 reference on the same (upcast) inputs, with poisoned memory, and bitwise equal over two
    runs; scores exactly -inf at the masked entries, d_weights exactly 0 there."""
    args, valid = unfused_inputs(case, dtype, seed)
    run = unfused_fns(case, backend, with_rpb)
    jax.block_until_ready(run(*unfused_inputs(case, dtype, seed + 100)[0]))
    poison_device_memory()
    got = jax.block_until_ready(run(*args))
    poison_device_memory()
    again = jax.block_until_ready(run(*args))
    ref = unfused_fns(case, "reference", with_rpb)(*(to64(a) for a in args))
    tol = TOL[jnp.dtype(dtype)]   # one rounding of each result to the input dtype
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
