"""Argument checks: every invalid call raises ValueError/TypeError naming the argument (and the axis),
at call time, also under jit tracing, before any kernel runs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_na

f32 = jnp.float32


def _arr(shape, dtype=f32):
    return jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)


Q2 = _arr((1, 8, 9, 4, 8))
K2 = _arr((1, 8, 9, 2, 8))
V2 = _arr((1, 8, 9, 2, 6))


def _expect(fn, names, axis=None, exc=(ValueError, TypeError), jit=True):
    """fn() must raise `exc` mentioning every name in `names` (and 'axis N' if given), eagerly and
    under jax.jit tracing."""
    names = [names] if isinstance(names, str) else names
    for mode in ("eager", "jit") if jit else ("eager",):
        with pytest.raises(exc) as ei:
            if mode == "eager":
                fn()
            else:
                jax.jit(lambda: fn())()
        msg = str(ei.value)
        for n in names:
            assert n in msg, f"[{mode}] message does not name {n!r}: {msg}"
        if axis is not None:
            assert re.search(rf"axis\W*{axis}\b", msg), f"[{mode}] message does not name axis {axis}: {msg}"


# ----------------------------------------------------------------------------- shapes / dtypes

@pytest.mark.parametrize("fn,q", [(jax_na.na1d, Q2), (jax_na.na2d, Q2[:, 0]), (jax_na.na3d, Q2),
                                  (jax_na.na2d, Q2[0])])
def test_wrong_rank(fn, q):
    _expect(lambda: fn(q, q, q, 3), "query")


def test_wrong_rank_of_key_and_value():
    _expect(lambda: jax_na.na2d(Q2, K2[:, 0], V2, 3), "key")
    _expect(lambda: jax_na.na2d(Q2, K2, V2[:, 0], 3), "value")


@pytest.mark.parametrize("k,v,name", [
    (_arr((1, 8, 8, 2, 8)), V2, "key"),           # spatial mismatch q/k
    (_arr((2, 8, 9, 2, 8)), V2, "key"),           # batch mismatch
    (_arr((1, 8, 9, 2, 7)), V2, "key"),           # head dim mismatch
    (K2, _arr((1, 8, 8, 2, 6)), "value"),         # spatial mismatch k/v
    (K2, _arr((1, 8, 9, 1, 6)), "value"),         # heads mismatch k/v
    (_arr((1, 8, 9, 3, 8)), _arr((1, 8, 9, 3, 6)), "key"),   # H % Hkv != 0
])
def test_shape_mismatch(k, v, name):
    _expect(lambda: jax_na.na2d(Q2, k, v, 3), name)


@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_integer_dtype(which):
    args = {"query": Q2, "key": K2, "value": V2}
    args[which] = args[which].astype(jnp.int32)
    _expect(lambda: jax_na.na2d(args["query"], args["key"], args["value"], 3), which, exc=TypeError)


@pytest.mark.parametrize("which", ["key", "value"])
def test_mixed_dtypes(which):
    args = {"query": Q2, "key": K2, "value": V2}
    args[which] = args[which].astype(jnp.float16)
    _expect(lambda: jax_na.na2d(args["query"], args["key"], args["value"], 3), which, exc=TypeError)


def test_not_an_array():
    _expect(lambda: jax_na.na1d([[1.0]], Q2[:, 0], Q2[:, 0], 3), "query", jit=False)


# ----------------------------------------------------------------------------- window parameters

@pytest.mark.parametrize("kw,name,axis", [
    (dict(kernel_size=1), "kernel_size", 0),
    (dict(kernel_size=(3, 1)), "kernel_size", 1),
    (dict(kernel_size=0), "kernel_size", 0),
    (dict(kernel_size=(9, 3)), "kernel_size", 0),             # k > L on axis 0 (L = 8)
    (dict(kernel_size=(3, 5), dilation=(1, 2)), "dilation", 1),  # k * d = 10 > 9
    (dict(kernel_size=3, dilation=(3, 1)), "dilation", 0),      # 9 > 8
    (dict(kernel_size=3, stride=0), "stride", 0),
    (dict(kernel_size=3, stride=(1, 4)), "stride", 1),          # > k
    (dict(kernel_size=(4, 3), stride=(5, 1)), "stride", 0),
    (dict(kernel_size=3, stride=-1), "stride", 0),
    (dict(kernel_size=3, dilation=0), "dilation", 0),
    (dict(kernel_size=3, dilation=(1, -2)), "dilation", 1),
])
def test_bad_window_values(kw, name, axis):
    _expect(lambda: jax_na.na2d(Q2, K2, V2, **kw), name, axis=axis, exc=ValueError)


def test_k_times_d_message_names_both():
    with pytest.raises(ValueError) as ei:
        jax_na.na1d(Q2[:, 0], K2[:, 0], V2[:, 0], 4, dilation=3)  # 12 > 9
    assert "kernel_size" in str(ei.value) and "dilation" in str(ei.value) and "9" in str(ei.value)
    assert "kernel_size <= 3 with this dilation or dilation <= 2 with this kernel_size" in str(ei.value)


@pytest.mark.parametrize("k,d,allowed", [(12, 1, "kernel_size <= 9 with this dilation"),
                                         (2, 12, "dilation <= 4 with this kernel_size"),
                                         (12, 12, "kernel_size * dilation <= 9")])
def test_k_times_d_message_offers_only_valid_fixes(k, d, allowed):
    """A kernel or a dilation longer than the axis on its own: the message offers only fixes that exist
    (never "kernel_size <= 0" or "dilation <= 0")."""
    with pytest.raises(ValueError) as ei:
        jax_na.na1d(Q2[:, 0], K2[:, 0], V2[:, 0], k, dilation=d)
    assert f"(allowed: {allowed})" in str(ei.value) and "<= 0" not in str(ei.value), str(ei.value)


@pytest.mark.parametrize("kw,name", [
    (dict(kernel_size=(3, 3, 3)), "kernel_size"),
    (dict(kernel_size=(3,)), "kernel_size"),
    (dict(kernel_size=3, stride=(1, 1, 1)), "stride"),
    (dict(kernel_size=3, dilation=(1,)), "dilation"),
    (dict(kernel_size=3, is_causal=(True,)), "is_causal"),
    (dict(kernel_size=3, is_causal=(True, False, True)), "is_causal"),
])
def test_wrong_tuple_length(kw, name):
    _expect(lambda: jax_na.na2d(Q2, K2, V2, **kw), name, exc=ValueError)


@pytest.mark.parametrize("kw,name,axis", [
    (dict(kernel_size=3.0), "kernel_size", 0),
    (dict(kernel_size=(3, "3")), "kernel_size", 1),
    (dict(kernel_size=(3, None)), "kernel_size", 1),
    (dict(kernel_size=3, stride=1.5), "stride", 0),
    (dict(kernel_size=3, dilation=(1, 2.0)), "dilation", 1),
    (dict(kernel_size=True), "kernel_size", 0),
    (dict(kernel_size=3, is_causal=1), "is_causal", 0),
    (dict(kernel_size=3, is_causal=(False, 0)), "is_causal", 1),
    (dict(kernel_size=3, is_causal="yes"), "is_causal", None),
    (dict(kernel_size=3, is_causal=None), "is_causal", 0),
])
def test_wrong_types(kw, name, axis):
    _expect(lambda: jax_na.na2d(Q2, K2, V2, **kw), name, axis=axis)


def test_traced_window_parameter_rejected():
    def f(q, k):
        return jax_na.na2d(Q2, K2, V2, k)
    with pytest.raises((TypeError, ValueError)) as ei:
        jax.jit(f)(Q2, 3)
    assert "kernel_size" in str(ei.value)


@pytest.mark.parametrize("scale", ["0.5", jnp.float32(0.5) * jnp.ones(2), float("nan"), float("inf"), True])
def test_bad_scale(scale):
    _expect(lambda: jax_na.na2d(Q2, K2, V2, 3, scale=scale), "scale")


def test_traced_scale_rejected():
    with pytest.raises((TypeError, ValueError)) as ei:
        jax.jit(lambda s: jax_na.na2d(Q2, K2, V2, 3, scale=s))(0.5)
    assert "scale" in str(ei.value)


# ----------------------------------------------------------------------------- additional kv

AK = _arr((1, 5, 2, 8))
AV = _arr((1, 5, 2, 6))


@pytest.mark.parametrize("ak,av,name", [
    (AK, None, "additional_values"),
    (None, AV, "additional_keys"),
    (_arr((2, 5, 2, 8)), AV, "additional_keys"),     # batch
    (_arr((1, 5, 1, 8)), _arr((1, 5, 1, 6)), "additional_keys"),   # heads != Hkv
    (_arr((1, 5, 2, 7)), AV, "additional_keys"),     # head dim
    (AK, _arr((1, 4, 2, 6)), "additional_values"),   # N_add mismatch
    (AK, _arr((1, 5, 2, 5)), "additional_values"),   # Dv mismatch
    (AK, _arr((1, 5, 1, 6)), "additional_values"),   # heads
    (_arr((1, 5, 2, 8, 1)), AV, "additional_keys"),  # rank
    (AK, AV[0], "additional_values"),                # rank
    (AK.astype(jnp.float16), AV, "additional_keys"),  # dtype
    (AK, AV.astype(jnp.int32), "additional_values"),  # dtype
])
def test_additional_kv_errors(ak, av, name):
    _expect(lambda: jax_na.na2d(Q2, K2, V2, 3, additional_keys=ak, additional_values=av), name)


# ----------------------------------------------------------------------------- backend

@pytest.mark.parametrize("backend", ["foo", "Reference", "cuda", ""])
def test_unknown_backend(backend):
    _expect(lambda: jax_na.na2d(Q2, K2, V2, 3, backend=backend), "backend", exc=ValueError)


def test_backend_wrong_type():
    _expect(lambda: jax_na.na2d(Q2, K2, V2, 3, backend=1), "backend")


def test_naive_without_kernels_says_so():
    from jax_na import _ext
    if _ext.has_cuda_kernels():
        pytest.skip("jax_na was built with its CUDA kernels here")
    for call in (lambda: jax_na.na2d(Q2, K2, V2, 3, backend="naive"),
                 lambda: jax_na.na2d_qk(Q2, K2, 3, backend="naive"),
                 lambda: jax_na.na2d_av(_arr((1, 8, 9, 4, 9)), V2, 3, backend="naive")):
        with pytest.raises(ValueError) as ei:
            call()
        msg = str(ei.value)
        assert "naive" in msg and ("CUDA" in msg or "GPU" in msg), msg


def test_naive_rejects_float64():
    """naive supports f32/f16/bf16; float64 with an explicit naive backend is an error naming it."""
    q = Q2.astype(jnp.float64)
    with pytest.raises((ValueError, TypeError)) as ei:
        jax_na.na2d(q, K2.astype(jnp.float64), V2.astype(jnp.float64), 3, backend="naive")
    assert "naive" in str(ei.value) and "backend" in str(ei.value)


# ----------------------------------------------------------------------------- fused backend
# What a call asks of the fused kernels is checked before what this installation has, so these
# errors are the same on a machine without them.

def test_hopper_fused_set_rejects_float32():
    """float32 runs on the portable fused kernels; the Hopper set is 16-bit only."""
    _expect(lambda: jax_na.na2d(Q2, K2, V2, 3, backend="fused_sm90"),
            ["backend", "'fused_sm90'", "float32", "float16", "bfloat16", "'fused'", "reference"], exc=TypeError)


def test_fused_rejects_float64():
    q, k, v = (x.astype(jnp.float64) for x in (Q2, K2, V2))
    _expect(lambda: jax_na.na2d(q, k, v, 3, backend="fused"),
            ["backend", "'fused'", "float64", "float16", "bfloat16", "reference"], exc=TypeError)


@pytest.mark.parametrize("D,Dv", [(264, 264), (64, 272), (257, 8)])
@pytest.mark.parametrize("backend", ["fused", "fused_sm80"])
def test_fused_rejects_head_dims_above_256(backend, D, Dv):
    bf = jnp.bfloat16
    q, k, v = _arr((1, 8, 9, 4, D), bf), _arr((1, 8, 9, 2, D), bf), _arr((1, 8, 9, 2, Dv), bf)
    _expect(lambda: jax_na.na2d(q, k, v, 3, backend=backend),
            ["backend", f"'{backend}'", "head dim", f"D={D}", f"D_v={Dv}", "256", "bfloat16", "reference", "naive"],
            exc=ValueError)


@pytest.mark.parametrize("D,Dv", [(256, 256), (64, 136), (129, 8)])
@pytest.mark.parametrize("backend,dtype", [("fused", jnp.float32), ("fused_sm80", jnp.float32),
                                           ("fused_sm90", jnp.bfloat16), ("fused_sm90", jnp.float16)])
def test_fused_rejects_head_dims_above_128_in_float32_and_on_hopper(backend, dtype, D, Dv):
    """float32 tiles and the Hopper kernels stop at head dim 128; the error names what takes the call
    (the portable 16-bit kernels up to 256 for fused_sm90)."""
    q, k, v = _arr((1, 8, 9, 4, D), dtype), _arr((1, 8, 9, 2, D), dtype), _arr((1, 8, 9, 2, Dv), dtype)
    want = ["backend", f"'{backend}'", "head dim", f"D={D}", f"D_v={Dv}", "128", "reference"]
    if backend == "fused_sm90":
        want += ["'fused'", "'fused_sm80'"]
    _expect(lambda: jax_na.na2d(q, k, v, 3, backend=backend), want, exc=ValueError)


def test_fused_rejects_too_many_heads():
    q = jnp.zeros((1, 4, 65536, 1), jnp.bfloat16)
    _expect(lambda: jax_na.na1d(q, q, q, 2, backend="fused"),
            ["backend", "'fused'", "heads", "65535", "H=65536", "reference", "naive"], exc=ValueError,
            jit=False)


@pytest.mark.parametrize("op", ["qk", "av"])
def test_fused_has_no_unfused_ops(op):
    bf = jnp.bfloat16
    q, k, v = Q2.astype(bf), K2.astype(bf), V2.astype(bf)
    w = _arr((1, 8, 9, 4, 9), bf)
    call = {"qk": lambda: jax_na.na2d_qk(q, k, 3, backend="fused"),
            "av": lambda: jax_na.na2d_av(w, v, 3, backend="fused")}[op]
    _expect(call, ["backend", "'fused'", f"na2d_{op}", "'reference'", "'naive'", "na2d"], exc=ValueError)


@pytest.mark.parametrize("backend,has_kernels,names", [
    ("fused", "has_fused_kernels", ("CUDA", "CUTLASS")),
    ("fused_sm90", "has_hopper_kernels", ("9.0", "CUDA")),
])
def test_fused_without_its_kernels_says_so(backend, has_kernels, names):
    """An explicit fused backend whose kernels this installation/machine lacks names what is missing
    and the backends that are available."""
    from jax_na import _ext
    if getattr(_ext, has_kernels)():
        pytest.skip(f"this machine runs the kernels of {backend!r}")
    bf = jnp.bfloat16
    with pytest.raises(ValueError) as ei:
        jax_na.na2d(Q2.astype(bf), K2.astype(bf), V2.astype(bf), 3, backend=backend)
    msg = str(ei.value)
    assert backend in msg and any(n in msg for n in names) and "available" in msg, msg


@pytest.mark.parametrize("backend", ["fused_sm80", "fused_sm90"])
def test_pinned_fused_backends_check_like_fused(backend):
    """The pinned fused backends take what "fused" takes (float32: the portable set only) and name
    themselves in the errors."""
    if backend == "fused_sm90":
        _expect(lambda: jax_na.na2d(Q2, K2, V2, 3, backend=backend),
                ["backend", repr(backend), "float32", "float16", "bfloat16"], exc=TypeError)
    bf = jnp.bfloat16
    D, limit = (272, "256") if backend == "fused_sm80" else (256, "128")
    q, k, v = _arr((1, 8, 9, 4, D), bf), _arr((1, 8, 9, 2, D), bf), _arr((1, 8, 9, 2, D), bf)
    _expect(lambda: jax_na.na2d(q, k, v, 3, backend=backend),
            ["backend", repr(backend), "head dim", f"D={D}", limit], exc=ValueError)


def _gemm_calls():
    w = _arr((1, 8, 9, 4, 9))   # the same weights as test_gemm_on_this_installation's (seed 0)
    return {"na2d": lambda: jax_na.na2d(Q2, K2, V2, 3, backend="gemm"),
            "na2d_qk": lambda: jax_na.na2d_qk(Q2, K2, 3, backend="gemm"),
            "na2d_av": lambda: jax_na.na2d_av(w, V2, 3, backend="gemm")}


@pytest.mark.parametrize("op", ["na2d", "na2d_qk", "na2d_av"])
def test_gemm_without_its_kernels_says_so(monkeypatch, op):
    """An explicit "gemm" on a CUDA build without the gemm targets (no CUTLASS headers at build time,
    or a build older than them) names what is missing and the backends that are available; a build
    without CUDA says that instead. Both whatever this machine has."""
    from jax_na import _ext
    call = _gemm_calls()[op]
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(_ext, "has_target", lambda name: "_gemm_" not in name)
    _expect(call, ["backend", "'gemm'", "gemm (tensor-core) CUDA kernels", "CUTLASS", "available"],
            exc=ValueError)
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: False)
    _expect(call, ["backend", "'gemm'", "nvcc", "available"], exc=ValueError)


def test_gemm_on_this_installation():
    """Here: "gemm" runs where its targets were compiled (computing what the reference does; lowered
    for a non-CUDA platform it is the reference), else the error above."""
    from jax_na import _ext
    w = _arr((1, 8, 9, 4, 9))
    refs = {"na2d": lambda: jax_na.na2d(Q2, K2, V2, 3, backend="reference"),
            "na2d_qk": lambda: jax_na.na2d_qk(Q2, K2, 3, backend="reference"),
            "na2d_av": lambda: jax_na.na2d_av(w, V2, 3, backend="reference")}
    for op, call in _gemm_calls().items():
        if _ext.has_gemm_kernels():
            np.testing.assert_allclose(np.asarray(call()), np.asarray(refs[op]()), rtol=1e-4, atol=1e-5)
        else:
            _expect(call, ["backend", "'gemm'", "available"], exc=ValueError)


def test_gemm_checks_what_the_call_asks_first():
    """"gemm" takes float32/float16/bfloat16 and every head dim; float64 is a TypeError naming the
    backends that take it, on every installation (checked before what this one has)."""
    q, k, v = (x.astype(jnp.float64) for x in (Q2, K2, V2))
    _expect(lambda: jax_na.na2d(q, k, v, 3, backend="gemm"), ["backend", "'gemm'", "float64", "reference"],
            exc=TypeError)
    _expect(lambda: jax_na.na2d_qk(q, k, 3, backend="gemm"), ["'gemm'", "float64"], exc=TypeError)
    _expect(lambda: jax_na.na2d(Q2, K2, V2, 3, backend="gemmm"), ["backend", "'gemm'", "'gemmm'"],
            exc=ValueError)


@pytest.mark.parametrize("backend", ["reference", None, "auto"])
def test_reference_and_auto_accept_every_float_dtype(backend):
    for dt in (jnp.float32, jnp.float16, jnp.bfloat16, jnp.float64):
        out = jax_na.na2d(Q2.astype(dt), K2.astype(dt), V2.astype(dt), 3, backend=backend)
        assert out.dtype == jnp.dtype(dt) and bool(jnp.all(jnp.isfinite(out.astype(f32))))


# ----------------------------------------------------------------------------- unfused

def test_rpb_errors():
    good = _arr((4, 5, 5))
    assert jax_na.na2d_qk(Q2, K2, 3, rpb=good).shape == (1, 8, 9, 4, 9)
    for bad in (_arr((4, 5)), _arr((2, 5, 5)), _arr((4, 5, 3)), _arr((4, 3, 3)), _arr((4, 5, 5, 1))):
        _expect(lambda: jax_na.na2d_qk(Q2, K2, 3, rpb=bad), "rpb")
    _expect(lambda: jax_na.na2d_qk(Q2, K2, (3, 2), rpb=good), "rpb")
    _expect(lambda: jax_na.na2d_qk(Q2, K2, 3, rpb=good.astype(jnp.float16)), "rpb")
    _expect(lambda: jax_na.na2d_qk(Q2, K2, 3, rpb=good.astype(jnp.int32)), "rpb")


def test_unfused_argument_errors():
    W = _arr((1, 8, 9, 4, 9))
    _expect(lambda: jax_na.na2d_qk(Q2, K2, 1), "kernel_size", axis=0)
    _expect(lambda: jax_na.na2d_qk(Q2, K2, 3, dilation=(1, 4)), "dilation", axis=1)
    _expect(lambda: jax_na.na2d_qk(Q2, K2, 3, is_causal=(True, 1)), "is_causal", axis=1)
    _expect(lambda: jax_na.na2d_qk(Q2, K2[:, :, :8], 3), "key")
    _expect(lambda: jax_na.na2d_qk(Q2, _arr((1, 8, 9, 3, 8)), 3), "key")
    _expect(lambda: jax_na.na2d_qk(Q2[:, 0], K2, 3), "query")
    _expect(lambda: jax_na.na2d_qk(Q2, K2.astype(jnp.float16), 3), "key")
    _expect(lambda: jax_na.na2d_qk(Q2, K2, 3, backend="bogus"), "backend")
    _expect(lambda: jax_na.na2d_qk(Q2, K2, 3, scale="x"), "scale")
    _expect(lambda: jax_na.na2d_av(W, V2, (3, 2)), "weights")        # W = 6 != 9
    _expect(lambda: jax_na.na2d_av(W[:, :, :8], V2, 3), "weights")
    _expect(lambda: jax_na.na2d_av(_arr((1, 8, 9, 3, 9)), V2, 3), "value")   # 3 % 2 heads
    _expect(lambda: jax_na.na2d_av(W, V2.astype(jnp.float16), 3), "weights")
    _expect(lambda: jax_na.na2d_av(W, V2[:, 0], 3), "value")
    _expect(lambda: jax_na.na2d_av(W, V2, 3, dilation=(3, 1)), "dilation", axis=0)
    _expect(lambda: jax_na.na2d_av(W, V2, 3, backend="bogus"), "backend")


# ----------------------------------------------------------------------------- accepted edge values

def test_boundary_values_accepted():
    q = _arr((1, 8, 9, 2, 4))
    for kw in (dict(kernel_size=2), dict(kernel_size=(8, 9)), dict(kernel_size=3, stride=3),
               dict(kernel_size=(4, 3), dilation=(2, 3)), dict(kernel_size=[3, 2], stride=[3, 2]),
               dict(kernel_size=(np.int64(3), 3), is_causal=(np.bool_(True), False))):
        out = jax_na.na2d(q, q, q, **kw)
        assert out.shape == q.shape and bool(jnp.all(jnp.isfinite(out)))
    a = jax_na.na2d(q, q, q, kernel_size=[3, 2], stride=[3, 2], is_causal=[True, False])
    b = jax_na.na2d(q, q, q, kernel_size=(3, 2), stride=(3, 2), is_causal=(True, False))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
