"""The CUDA lowering, inspected on CPU: lowering for the cuda platform must emit the FFI custom calls of
docs/ffi.md when the kernels were compiled, and fall back to the reference otherwise."""

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_na
from jax_na import primitives
import jax_na._ext as ext

B, X, Y, H, HKV, D, DV, NA = 1, 8, 9, 4, 2, 8, 6, 3
K = (3, 4)


def _inputs(dtype=jnp.float32):
    r = np.random.default_rng(0)
    q = jnp.asarray(r.standard_normal((B, X, Y, H, D)), dtype)
    k = jnp.asarray(r.standard_normal((B, X, Y, HKV, D)), dtype)
    v = jnp.asarray(r.standard_normal((B, X, Y, HKV, DV)), dtype)
    ak = jnp.asarray(r.standard_normal((B, NA, HKV, D)), dtype)
    av = jnp.asarray(r.standard_normal((B, NA, HKV, DV)), dtype)
    return q, k, v, ak, av


def _cuda_hlo(f, *args):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _calls(text, target):
    return [line for line in text.splitlines() if f'"{target}"' in line or f"@{target}" in line
            or f"call_target_name = \"{target}\"" in line]


def _fwd(backend, with_add=True):
    def f(q, k, v, ak, av):
        kw = dict(additional_keys=ak, additional_values=av) if with_add else {}
        return jax_na.na2d(q, k, v, K, stride=(1, 2), is_causal=(True, False), backend=backend,
                           return_lse=True, **kw)
    return f


def _loss(backend):
    def f(q, k, v, ak, av):
        out, lse = _fwd(backend)(q, k, v, ak, av)
        return jnp.sum(out) + jnp.sum(lse)
    return jax.grad(f, argnums=(0, 1, 2, 3, 4))


def _check_lowering_has_kernels():
    q, k, v, ak, av = _inputs()
    W, N = math.prod(K), X * Y
    for backend in ("naive",):
        text = _cuda_hlo(_fwd(backend), q, k, v, ak, av)
        calls = _calls(text, "jax_na_naive_fwd")
        assert calls, text
        # the workspace result of docs/ffi.md: F32 [B*N*H*(W+Na)]
        assert f"tensor<{B * N * H * (W + NA)}xf32>" in text
        line = calls[0]
        assert re.search(r"%\S+:3 = stablehlo.custom_call @jax_na_naive_fwd\((%[^,)]+, ){4}%[^,)]+\)", line), line
        for attr in ("kernel_size = dense<[3, 4]>", "stride = dense<[1, 2]>", "dilation = dense<1>",
                     "is_causal = dense<[1, 0]>", f"scale = {np.float32(D ** -0.5):.6g}"[:16]):
            assert attr in line, (attr, line)
        text = _cuda_hlo(_loss(backend), q, k, v, ak, av)
        assert _calls(text, "jax_na_naive_fwd") and _calls(text, "jax_na_naive_bwd"), text
        # 9 operands (q, k, v, add_k, add_v, out, lse, d_out, d_lse) -> 5 grads + workspace
        assert re.search(r"%\S+:6 = stablehlo.custom_call @jax_na_naive_bwd\((%[^,)]+, ){8}%[^,)]+\)",
                         _calls(text, "jax_na_naive_bwd")[0])
        assert f"tensor<{2 * B * N * H * (W + NA) + B * N * H}xf32>" in text
    # auto follows AUTO_PREFERENCE: with no preferred kernel family it lowers to the reference
    if not primitives.AUTO_PREFERENCE:
        assert "jax_na_naive" not in _cuda_hlo(_fwd(None), q, k, v, ak, av)
        assert "jax_na_naive" not in _cuda_hlo(_loss(None), q, k, v, ak, av)
    # without additional keys: zero-element buffers, same targets
    text = _cuda_hlo(_fwd("naive", with_add=False), q, k, v, ak, av)
    assert _calls(text, "jax_na_naive_fwd") and f"tensor<{B}x0x{HKV}x{D}xf32>" in text
    # unfused
    rpb = jnp.ones((H, 5, 7), jnp.float32)
    qk = lambda q, k, b: jax_na.na2d_qk(q, k, K, is_causal=(False, True), rpb=b, backend="naive")
    text = _cuda_hlo(qk, q, k, rpb)
    assert _calls(text, "jax_na_naive_qk")
    text = _cuda_hlo(jax.grad(lambda q, k, b: jnp.sum(jnp.where(jnp.isfinite(qk(q, k, b)), qk(q, k, b), 0)),
                              argnums=(0, 1, 2)), q, k, rpb)
    assert _calls(text, "jax_na_naive_qk_bwd")
    a = jnp.ones((B, X, Y, H, math.prod(K)), jnp.float32)
    av_ = lambda a, v: jax_na.na2d_av(a, v, K, backend="naive")
    text = _cuda_hlo(av_, a, v)
    assert _calls(text, "jax_na_naive_av")
    text = _cuda_hlo(jax.grad(lambda a, v: jnp.sum(av_(a, v)), argnums=(0, 1)), a, v)
    assert _calls(text, "jax_na_naive_av_bwd")
    # float64 has no kernel: the reference is lowered, no custom call
    q64, k64, v64, ak64, av64 = _inputs(jnp.float64)
    text = _cuda_hlo(_fwd(None), q64, k64, v64, ak64, av64)
    assert "jax_na_naive" not in text
    # the reference backend never lowers to a kernel
    text = _cuda_hlo(_fwd("reference"), q, k, v, ak, av)
    assert "jax_na_naive" not in text


def test_expected_cuda_build():
    """tools/test.sh sets JAX_NA_EXPECT_CUDA=1 when nvcc exists: then the kernels must be compiled."""
    if os.environ.get("JAX_NA_EXPECT_CUDA") != "1":
        pytest.skip("JAX_NA_EXPECT_CUDA not set")
    assert ext.has_cuda_kernels(), "nvcc is present but jax_na was built without its CUDA kernels"
    assert ext.cuda_archs()


@pytest.mark.skipif(not ext.has_cuda_kernels(), reason="jax_na built without CUDA kernels")
def test_cuda_lowering_emits_ffi_calls():
    _check_lowering_has_kernels()


def test_cuda_lowering_with_pretend_kernels(monkeypatch):
    """Same checks on a build without kernels, pretending they were compiled (lowering only needs the
    target names, never the handlers)."""
    monkeypatch.setattr(ext, "has_cuda_kernels", lambda: True)
    jax.clear_caches()
    try:
        _check_lowering_has_kernels()
    finally:
        monkeypatch.undo()
        jax.clear_caches()


@pytest.mark.skipif(ext.has_cuda_kernels(), reason="jax_na has CUDA kernels here")
def test_cuda_lowering_without_kernels_falls_back_to_reference():
    q, k, v, ak, av = _inputs()
    text = _cuda_hlo(_fwd(None), q, k, v, ak, av)
    assert "jax_na_naive" not in text
    text = _cuda_hlo(_loss(None), q, k, v, ak, av)
    assert "jax_na_naive" not in text
    # and the CPU lowering of the same function runs and is right (sanity)
    out, lse = jax.jit(_fwd(None))(q, k, v, ak, av)
    assert out.shape == (B, X, Y, H, DV) and bool(jnp.all(jnp.isfinite(out)))


def test_cpu_lowering_never_has_custom_calls(monkeypatch):
    monkeypatch.setattr(ext, "has_cuda_kernels", lambda: True)
    jax.clear_caches()
    try:
        q, k, v, ak, av = _inputs()
        text = jax.jit(_loss(None)).trace(q, k, v, ak, av).lower(lowering_platforms=("cpu",)).as_text()
        assert "jax_na_naive" not in text
        assert re.search(r"stablehlo\.(dot_general|exponential)", text)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
