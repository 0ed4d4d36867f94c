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
from jax_na import primitives, reference
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
    # auto never picks the naive kernels (the reference beats them); float32 goes to the fused
    # kernels (their portable set runs it at float32 accuracy) where they are compiled
    assert "naive" not in primitives.AUTO_PREFERENCE
    fused = ext.has_target("jax_na_fused_fwd")
    assert ("jax_na_fused_fwd" in _cuda_hlo(_fwd(None), q, k, v, ak, av)) == fused
    text = _cuda_hlo(_loss(None), q, k, v, ak, av)
    assert ("jax_na_fused_bwd" in text) == fused and "jax_na_naive" not in text
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
    assert "jax_na_" not in text
    # the reference backend never lowers to a kernel
    text = _cuda_hlo(_fwd("reference"), q, k, v, ak, av)
    assert "jax_na_naive" not in text


# ----------------------------------------------------------------------------- fused

def _bf16(D, Dv, B_=B, H_=H, Hkv=HKV):
    r = np.random.default_rng(1)
    mk = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.bfloat16)
    return (mk(B_, X, Y, H_, D), mk(B_, X, Y, Hkv, D), mk(B_, X, Y, Hkv, Dv), mk(B_, NA, Hkv, D),
            mk(B_, NA, Hkv, Dv))


def _fused_call_line(text, target, n_results, n_operands):
    calls = _calls(text, target)
    assert calls, text
    line = calls[0]
    pat = rf"%\S+:{n_results} = stablehlo.custom_call @{target}\((%[^,)]+, ){{{n_operands - 1}}}%[^,)]+\)"
    assert re.search(pat, line), line
    return line


def _scale_of(line):
    return np.float32(float(re.search(r"scale = ([-+0-9.eE]+) : f32", line).group(1)))


def _check_fused_lowering():
    """backend="fused" and auto (bf16/f16, head dims <= 128) lower to the fused targets of docs/ffi.md:
    forward q, k, v, add_k, add_v -> out, lse + an int32 [1] workspace; backward 9 operands -> 5 grads + a
    float32 workspace [B*N*H]; head dims other than 32/64/128 zero-padded to the next of 32, 64 and
    128 with the caller's scale; float32, head dims > 128 and the unfused ops never reach them."""
    N = X * Y
    for backend in ("fused", None):
        for D, Dv, P in ((64, 64, 64), (128, 128, 128), (40, 40, 64), (32, 64, 64), (8, 6, 32),
                         (32, 32, 32), (100, 72, 128)):
            args = _bf16(D, Dv)
            text = _cuda_hlo(_fwd(backend), *args)
            line = _fused_call_line(text, "jax_na_fused_fwd", 3, 5)
            assert "jax_na_naive" not in text and "jax_na_fused_bwd" not in text
            # every operand runs at head dim P; out [B, X, Y, H, P] -> sliced to D_v; lse f32
            assert f"(tensor<{B}x{X}x{Y}x{H}x{P}xbf16>, tensor<{B}x{X}x{Y}x{HKV}x{P}xbf16>" in line, line
            # out, lse, and the int32 tile counter the target zeroes
            assert f"-> (tensor<{B}x{X}x{Y}x{H}x{P}xbf16>, tensor<{B}x{X}x{Y}x{H}xf32>, tensor<1xi32>)" in line, line
            # the scale of the unpadded head dim, as the user asked for (default D ** -0.5)
            assert _scale_of(line) == np.float32(D ** -0.5), (D, line)
            for attr in ("kernel_size = dense<[3, 4]>", "stride = dense<[1, 2]>", "dilation = dense<1>",
                         "is_causal = dense<[1, 0]>"):
                assert attr in line, (attr, line)
            assert ("stablehlo.pad" in text) == (P != D or P != Dv), text
            text = _cuda_hlo(_loss(backend), *args)
            _fused_call_line(text, "jax_na_fused_fwd", 3, 5)
            line = _fused_call_line(text, "jax_na_fused_bwd", 6, 9)
            assert f"tensor<{B * N * H}xf32>)" in line, line   # the workspace, last result
            assert f"-> (tensor<{B}x{X}x{Y}x{H}x{P}xbf16>" in line, line
            assert "jax_na_naive" not in text
    # without additional keys/values: zero-element [B, 0, H_kv, P] operands, padded like the rest
    text = _cuda_hlo(_fwd("fused", with_add=False), *_bf16(40, 40))
    line = _fused_call_line(text, "jax_na_fused_fwd", 3, 5)
    assert f"tensor<{B}x0x{HKV}x64xbf16>" in line, line
    _fused_call_line(_cuda_hlo(jax.grad(lambda *a: jnp.sum(_fwd("fused", False)(*a)[0].astype(jnp.float32))),
                               *_bf16(40, 40)), "jax_na_fused_bwd", 6, 9)
    # float16 too; an explicit scale is passed as given
    args = [a.astype(jnp.float16) for a in _bf16(48, 48)]
    f = lambda q, k, v: jax_na.na2d(q, k, v, 3, scale=0.25)
    line = _fused_call_line(_cuda_hlo(f, *args[:3]), "jax_na_fused_fwd", 3, 5)
    assert _scale_of(line) == 0.25 and "x64xf16>" in line, line
    # auto: float32 on the fused kernels (f32 operands); float64 (no kernel), head dims above 256
    # and float32 head dims above 128 lower to the reference; 16-bit head dims 129..256 run padded to 256
    text = _cuda_hlo(_loss(None), *(a.astype(jnp.float32) for a in _bf16(64, 64)))
    line = _fused_call_line(text, "jax_na_fused_bwd", 6, 9)
    assert f"-> (tensor<{B}x{X}x{Y}x{H}x64xf32>" in line, line
    assert "jax_na_" not in _cuda_hlo(_loss(None), *(a.astype(jnp.float64) for a in _bf16(64, 64)))
    assert "jax_na_" not in _cuda_hlo(_loss(None), *(a.astype(jnp.float32) for a in _bf16(136, 64)))
    assert "jax_na_" not in _cuda_hlo(_loss(None), *_bf16(64, 264))
    line = _fused_call_line(_cuda_hlo(_loss(None), *_bf16(136, 64)), "jax_na_fused_bwd", 6, 9)
    assert f"-> (tensor<{B}x{X}x{Y}x{H}x256xbf16>" in line and _scale_of(line) == np.float32(136 ** -0.5), line
    # the unfused ops have no fused kernel: auto lowers them to the gemm targets where they are
    # compiled, else to the reference
    q, k, v = _bf16(64, 64)[:3]
    text = _cuda_hlo(lambda q, k: jax_na.na2d_qk(q, k, K), q, k)
    assert "jax_na_fused" not in text
    assert ("jax_na_gemm_qk" in text) == ext.has_target("jax_na_gemm_qk") and "jax_na_naive" not in text
    # vmap (folded into the batch) of grad: still one fused call per direction, on V*B batches
    V = 3
    stacked = [jnp.stack([a] * V) for a in _bf16(40, 40)]
    text = _cuda_hlo(jax.vmap(_loss("fused")), *stacked)
    line = _fused_call_line(text, "jax_na_fused_bwd", 6, 9)
    assert f"tensor<{V * B * N * H}xf32>)" in line and f"tensor<{V * B}x{X}x{Y}x{H}x64xbf16>" in line, line
    # lowered for a non-CUDA platform, "fused" is the reference
    text = jax.jit(_loss("fused")).trace(*_bf16(64, 64)).lower(lowering_platforms=("cpu",)).as_text()
    assert "jax_na_" not in text


# ----------------------------------------------------------------------------- gemm

def _gemm_line(text, kind, n_results, n_operands):
    calls = [c for c in _calls(text, f"jax_na_gemm_{kind}") if f"@jax_na_gemm_{kind}(" in c]
    assert calls, text
    results = "" if n_results == 1 else f":{n_results}"
    pat = rf"%\S+{results} = stablehlo.custom_call @jax_na_gemm_{kind}\((%[^,)]+, ){{{n_operands - 1}}}%[^,)]+\)"
    assert re.search(pat, calls[0]), calls[0]
    return calls[0]


def _check_gemm_lowering():
    """backend="gemm" lowers the unfused ops to the gemm targets of docs/ffi.md (the naive targets'
    operands, results and attributes: qk_bwd has no rpb operand, d_rpb is a result of its shape):
    head dims up to 128 zero-padded to 64 or 128 with the caller's scale (float32 too: 3xTF32), larger
    head dims as they are; na2d(backend="gemm") is qk -> softmax -> av on them; auto takes them
    only where they run on tensor cores."""
    W = math.prod(K)
    rpb = jnp.ones((H, 5, 7), jnp.bfloat16)
    qk = lambda backend: lambda q, k, b: jax_na.na2d_qk(q, k, K, is_causal=(False, True), rpb=b, backend=backend)
    av = lambda backend: lambda a, v: jax_na.na2d_av(a, v, K, backend=backend)
    for dtype, D, Dv, P, Pv in ((jnp.bfloat16, 40, 72, 64, 128), (jnp.float16, 128, 64, 128, 64),
                                (jnp.bfloat16, 136, 6, 136, 64), (jnp.float32, 40, 72, 64, 128), (jnp.float32, 160, 8, 160, 64)):
        q, k, v = (a.astype(dtype) for a in _bf16(D, Dv)[:3])
        b = rpb.astype(dtype)
        t = jnp.dtype(dtype).name.replace("float", "f").replace("bf16", "bf16")
        text = _cuda_hlo(qk("gemm"), q, k, b)
        line = _gemm_line(text, "qk", 1, 3)
        assert f"(tensor<{B}x{X}x{Y}x{H}x{P}x{t}>, tensor<{B}x{X}x{Y}x{HKV}x{P}x{t}>, tensor<{H}x5x7x{t}>)" in line, line
        assert f"-> tensor<{B}x{X}x{Y}x{H}x{W}x{t}>" in line and _scale_of(line) == np.float32(D ** -0.5), line
        for attr in ("kernel_size = dense<[3, 4]>", "stride = dense<1>", "dilation = dense<1>",
                     "is_causal = dense<[0, 1]>"):
            assert attr in line, (attr, line)
        loss = lambda q, k, b: jnp.sum(jnp.where(jnp.isinf(s := qk("gemm")(q, k, b)), 0, s).astype(jnp.float32))
        text = _cuda_hlo(jax.grad(loss, argnums=(0, 1, 2)), q, k, b)
        line = _gemm_line(text, "qk_bwd", 3, 3)   # d_attn, q, k -> dq, dk, d_rpb
        assert f"-> (tensor<{B}x{X}x{Y}x{H}x{P}x{t}>, tensor<{B}x{X}x{Y}x{HKV}x{P}x{t}>, tensor<{H}x5x7x{t}>)" in line, line
        assert _scale_of(line) == np.float32(D ** -0.5), line
        a = jnp.ones((B, X, Y, H, W), dtype)
        line = _gemm_line(_cuda_hlo(av("gemm"), a, v), "av", 1, 2)
        assert f"tensor<{B}x{X}x{Y}x{HKV}x{Pv}x{t}>) -> tensor<{B}x{X}x{Y}x{H}x{Pv}x{t}>" in line, line
        assert "scale" not in line, line
        text = _cuda_hlo(jax.grad(lambda a, v: jnp.sum(av("gemm")(a, v).astype(jnp.float32)), argnums=(0, 1)), a, v)
        line = _gemm_line(text, "av_bwd", 2, 3)   # d_out, attn, v -> d_attn, dv
        assert f"-> (tensor<{B}x{X}x{Y}x{H}x{W}x{t}>, tensor<{B}x{X}x{Y}x{HKV}x{Pv}x{t}>)" in line, line
        assert "jax_na_naive" not in text and "jax_na_fused" not in text
        # auto: the gemm targets only on tensor cores (head dims up to 128)
        assert ("jax_na_gemm_qk" in _cuda_hlo(qk(None), q, k, b)) == (D <= 128)
        assert ("jax_na_gemm_av" in _cuda_hlo(av(None), a, v)) == (Dv <= 128)
    # na2d with backend="gemm": the four gemm targets around the softmax, with the call's stride and
    # causal axes; the additional keys' part is plain XLA
    args = _bf16(40, 40)
    fwd, grad = _cuda_hlo(_fwd("gemm"), *args), _cuda_hlo(_loss("gemm"), *args)
    for text, kind, n_res, n_ops in ((fwd, "qk", 1, 3), (fwd, "av", 1, 2), (grad, "qk_bwd", 3, 3),
                                     (grad, "av_bwd", 2, 3)):
        line = _gemm_line(text, kind, n_res, n_ops)
        assert "stride = dense<[1, 2]>" in line and "is_causal = dense<[1, 0]>" in line, line
        assert "jax_na_fused" not in text and "jax_na_naive" not in text
    # vmap folds into the heads (qk) / batch (av): still one call each
    stacked = [jnp.stack([x] * 3) for x in args]
    text = _cuda_hlo(jax.vmap(_loss("gemm")), *stacked)
    assert text.count("@jax_na_gemm_qk(") == 1 and text.count("@jax_na_gemm_av_bwd(") == 1, text
    assert f"tensor<{B}x{X}x{Y}x{3 * H}x64xbf16>" in _gemm_line(text, "qk", 1, 3)  # heads: 3 x H


def test_cuda_lowering_emits_gemm_calls(monkeypatch):
    """The gemm lowering, on a real build with the gemm targets or pretending them."""
    if not ext.has_gemm_kernels():
        _pretend(monkeypatch)
    try:
        _check_gemm_lowering()
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_gemm_without_its_targets_lowers_nothing_to_them(monkeypatch):
    """A CUDA build without the gemm targets: auto keeps the unfused ops on the reference, explicit
    "gemm" is a clear error at the call (test_errors.py), and the naive targets are unaffected."""
    monkeypatch.setattr(ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(ext, "has_target", lambda name: "_gemm_" not in name)
    monkeypatch.setattr(ext, "has_cuda_device", lambda: True)
    jax.clear_caches()
    try:
        q, k = _bf16(64, 64)[:2]
        assert "jax_na_" not in _cuda_hlo(lambda q, k: jax_na.na2d_qk(q, k, K), q, k)
        assert "jax_na_naive_qk" in _cuda_hlo(lambda q, k: jax_na.na2d_qk(q, k, K, backend="naive"), q, k)
        assert "gemm" not in jax_na.available_backends()
        with pytest.raises(ValueError, match="gemm"):
            jax_na.na2d_qk(q, k, K, backend="gemm")
        monkeypatch.setattr(ext, "has_target", lambda name: True)
        assert "gemm" in jax_na.available_backends()
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def _fake_gemm_ffi_call(seen):
    """A stand-in for jax.ffi.ffi_call that computes the gemm targets with the reference (on CPU),
    checking the contract on the way: the naive targets' operands and results, and the head dim the
    op contracts or produces padded to 64/128 for float16/bfloat16 (float32: as it is)."""
    from jax_na import _checks

    def ffi_call(target, result_shapes, **_):
        def run(*ops, kernel_size, stride, dilation, is_causal, scale=1.0):
            params = _checks.NAParams(tuple(int(i) for i in kernel_size), tuple(int(i) for i in stride),
                                      tuple(int(i) for i in dilation), tuple(bool(i) for i in is_causal),
                                      float(scale))
            kind = target.removeprefix("jax_na_gemm_")
            head = {"qk": ops[0], "qk_bwd": ops[1], "av": ops[1], "av_bwd": ops[0]}[kind].shape[-1]
            seen.append((kind, head, float(scale)))
            if jnp.dtype(ops[0].dtype).itemsize == 2:
                assert head in (64, 128) or head > 128, (target, head)
            qk_f = lambda q, k, b: reference.qk_forward(q, k, b if b.size else None, params)
            av_f = lambda a, v: reference.av_forward(a, v, params)
            if kind == "qk":
                assert len(ops) == 3 and len(result_shapes) == 1
                return (qk_f(*ops),)
            if kind == "qk_bwd":  # no rpb operand: d_rpb has the shape of the result asked for
                assert len(ops) == 3 and len(result_shapes) == 3
                d_attn, q, k = ops
                rpb = jnp.zeros(result_shapes[2].shape, q.dtype)
                if rpb.size:
                    return jax.vjp(qk_f, q, k, rpb)[1](d_attn)
                return (*jax.vjp(lambda q, k: qk_f(q, k, rpb), q, k)[1](d_attn), rpb)
            if kind == "av":
                assert len(ops) == 2 and len(result_shapes) == 1
                return (av_f(*ops),)
            assert kind == "av_bwd" and len(ops) == 3 and len(result_shapes) == 2
            d_out, a, v = ops
            return jax.vjp(av_f, a, v)[1](d_out)
        return run

    return ffi_call


@pytest.mark.parametrize("dtype,D,Dv", [(jnp.bfloat16, 40, 72), (jnp.float16, 5, 128), (jnp.bfloat16, 136, 64),
                                        (jnp.float32, 40, 72)])
def test_gemm_padding_computes_the_same_function(monkeypatch, dtype, D, Dv):
    """The padding/slicing around the gemm targets (primitives._gemm_impl), run on CPU with the targets
    replaced by the reference: scores, av output and every gradient equal the reference on the
    unpadded inputs (up to the summation order of the longer padded dot products, a rounding of the
    output dtype at most), with the caller's scale."""
    from jax_na import _checks, primitives

    seen = []
    monkeypatch.setattr(jax.ffi, "ffi_call", _fake_gemm_ffi_call(seen))
    r = np.random.default_rng(D)
    mk = lambda *shape: jnp.asarray(r.standard_normal(shape), dtype)
    q, k, v, rpb = mk(B, X, Y, H, D), mk(B, X, Y, HKV, D), mk(B, X, Y, HKV, Dv), mk(H, 5, 7)
    W = math.prod(K)
    a, d_attn, d_out = mk(B, X, Y, H, W), mk(B, X, Y, H, W), mk(B, X, Y, H, Dv)
    params = _checks.window_params(2, (X, Y), K, 1, (1, 2), (False, True), 0.3)
    impl = lambda kind, *ops: jax.jit(lambda *o: primitives._gemm_impl(kind, *o, params=params,
                                                                          backend="gemm"))(*ops)
    no_bias = jnp.zeros((0,), dtype)
    for bias in (rpb, no_bias):
        ref = [primitives._qk_ref(q, k, bias, params=params, backend="gemm")]
        got = impl("qk", q, k, bias)
        ref += primitives._qk_bwd_ref(d_attn, q, k, bias, params=params, backend="gemm")
        got += impl("qk_bwd", d_attn, q, k, bias)
        ref += [primitives._av_ref(a, v, params=params, backend="gemm")]
        got += impl("av", a, v)
        ref += primitives._av_bwd_ref(d_out, a, v, params=params, backend="gemm")
        got += impl("av_bwd", d_out, a, v)
        assert len(got) == len(ref) == 7
        tol = 1e-5 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
        for g, want in zip(got, ref):
            assert g.shape == want.shape and g.dtype == want.dtype
            np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)),
                                       rtol=tol, atol=tol)
    P, Pv = (_checks.gemm_head_dim(dtype, d) for d in (D, Dv))
    assert P == (D if D > 128 else (64 if D <= 64 else 128))
    sc = float(np.float32(0.3))   # the f32 attribute
    assert seen == [("qk", P, sc), ("qk_bwd", P, sc), ("av", Pv, 1.0), ("av_bwd", Pv, 1.0)] * 2


def test_expected_cuda_build():
    """tools/test.sh sets JAX_NA_EXPECT_CUDA=1 when nvcc exists: then the kernels must be compiled."""
    if os.environ.get("JAX_NA_EXPECT_CUDA") != "1":
        pytest.skip("JAX_NA_EXPECT_CUDA not set")
    assert ext.has_cuda_kernels(), "nvcc is present but jax_na was built without its CUDA kernels"
    assert ext.cuda_archs()


@pytest.mark.skipif(not ext.has_cuda_kernels(), reason="jax_na built without CUDA kernels")
def test_cuda_lowering_emits_ffi_calls():
    _check_lowering_has_kernels()


@pytest.mark.skipif(not ext.has_fused_kernels(), reason="jax_na built without the fused kernels")
def test_cuda_lowering_emits_fused_calls():
    _check_fused_lowering()


def _pretend(monkeypatch):
    monkeypatch.setattr(ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(ext, "has_target", lambda name: True)
    jax.clear_caches()


def test_cuda_lowering_with_pretend_kernels(monkeypatch):
    """Same checks on a build without kernels, pretending they were compiled (lowering only needs the
    target names, never the handlers)."""
    _pretend(monkeypatch)
    try:
        _check_lowering_has_kernels()
        _check_fused_lowering()
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_fused_lowering_on_a_build_without_fused_kernels(monkeypatch):
    """A CUDA build without CUTLASS has the naive targets only: auto lowers to the reference, "fused"
    is not available (a clear error at the call), and the naive kernels are unaffected."""
    monkeypatch.setattr(ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(ext, "has_target", lambda name: "_naive_" in name)
    jax.clear_caches()
    try:
        args = _bf16(64, 64)
        assert "jax_na_" not in _cuda_hlo(_loss(None), *args)
        assert "jax_na_naive_bwd" in _cuda_hlo(_loss("naive"), *args)
        with pytest.raises(ValueError, match="fused"):
            jax_na.na2d(*args[:3], 3, backend="fused")
        monkeypatch.setattr(ext, "has_cuda_device", lambda: True)
        assert "fused" not in jax_na.available_backends()
        # a build with the forward only: the backward runs on the reference
        monkeypatch.setattr(ext, "has_target", lambda name: name != "jax_na_fused_bwd")
        assert jax_na.available_backends()[0] == "fused"
        text = _cuda_hlo(_loss("fused"), *args)
        assert _calls(text, "jax_na_fused_fwd") and not _calls(text, "jax_na_fused_bwd")
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_non_positive_scale_lowers_to_fused_on_rewritten_q(monkeypatch):
    """Auto takes every finite scale to the fused kernels: a negative scale runs as |scale| on -q,
    scale 0 as 1 on q * 0 (the kernels' softmax needs a positive scale; the rewrite is exact)."""
    _pretend(monkeypatch)
    try:
        q, k, v = _bf16(64, 64)[:3]
        for scale, attr in ((0.125, 0.125), (-0.125, 0.125), (0.0, 1.0)):
            f = jax.grad(lambda q: jnp.sum(jax_na.na2d(q, k, v, 3, scale=scale).astype(jnp.float32)))
            text = jax.jit(f).trace(q).lower(lowering_platforms=("cuda",)).as_text()
            fwd, bwd = _calls(text, "jax_na_fused_fwd"), _calls(text, "jax_na_fused_bwd")
            assert len(fwd) == 1 and len(bwd) == 1, (scale, text)
            for call in fwd + bwd:
                assert f"scale = {attr:e} : f32" in call, (scale, call)
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_fused_batch_above_grid_limit_runs_in_chunks(monkeypatch):
    """The fused grid takes at most 65535 batches: a larger (e.g. vmap-folded) batch is split."""
    _pretend(monkeypatch)
    try:
        q = jax.ShapeDtypeStruct((70000, 16, 2, 64), jnp.bfloat16)
        f = jax.grad(lambda q: jnp.sum(jax_na.na1d(q, q, q, 3).astype(jnp.float32)))
        text = jax.jit(f).trace(q).lower(lowering_platforms=("cuda",)).as_text()
        fwd, bwd = _calls(text, "jax_na_fused_fwd"), _calls(text, "jax_na_fused_bwd")
        assert len(fwd) == 2 and len(bwd) == 2, text
        assert "tensor<65535x16x2x64xbf16>" in fwd[0] and "tensor<4465x16x2x64xbf16>" in fwd[1]
        assert f"tensor<{65535 * 16 * 2}xf32>" in bwd[0] and f"tensor<{4465 * 16 * 2}xf32>" in bwd[1]
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def _fake_fused_ffi_call(seen, seen_arch=None):
    """A stand-in for jax.ffi.ffi_call that computes the fused targets with the reference (on CPU),
    checking the contract on the way: one head dim P in (32, 64, 128) for every operand (64 or 128 on
    the Hopper kernels, arch 90), zero padding."""
    from jax_na import _checks, reference
    seen_arch = [] if seen_arch is None else seen_arch

    def ffi_call(target, result_shapes, **_):
        def run(*ops, kernel_size, stride, dilation, is_causal, scale, arch=None, tiles_sm80=None, tiles_sm90=None,
                deterministic=None):
            params = _checks.NAParams(tuple(int(i) for i in kernel_size), tuple(int(i) for i in stride),
                                      tuple(int(i) for i in dilation), tuple(bool(i) for i in is_causal),
                                      float(scale))
            P = ops[0].shape[-1]
            assert P in ((64, 128) if int(arch) == 90 else (32, 64, 128)), (P, arch)
            assert all(ops[i].shape[-1] == P for i in range(5)), [o.shape for o in ops]
            seen.append((target, ops[0].shape[0], P, float(scale)))
            fwd = lambda *a: reference.attention_forward(*a, params)
            seen_arch.append((target, int(arch)))  # the kernel choice: 0 auto, 80 portable, 90 Hopper
            if target == "jax_na_fused_fwd":  # out, lse and the int32 tile counter
                assert len(result_shapes) == 3 and result_shapes[2].shape == (1,), result_shapes
                assert result_shapes[2].dtype == jnp.int32, result_shapes
                return (*fwd(*ops), jnp.zeros((1,), jnp.int32))
            assert target == "jax_na_fused_bwd" and len(result_shapes) == 6
            q, k, v, ak, av, out, lse, d_out, d_lse = ops
            assert out.shape[-1] == d_out.shape[-1] == P
            ws = result_shapes[5]
            rows = q.shape[0] * math.prod(q.shape[1:-2]) * q.shape[-2]
            assert int(deterministic) in (0, 1), deterministic  # 0: dQ accumulators too (test_backward_modes.py)
            assert ws.shape == (rows * (1 if deterministic else P + 9),) and ws.dtype == jnp.float32
            grads = jax.vjp(fwd, q, k, v, ak, av)[1]((d_out, d_lse))
            return (*grads, jnp.zeros(ws.shape, ws.dtype))
        return run

    return ffi_call


@pytest.mark.parametrize("D,Dv", [(40, 40), (32, 64), (64, 64), (100, 72), (5, 128)])
def test_fused_padding_and_chunks_compute_the_same_function(monkeypatch, D, Dv):
    """The padding/slicing/batch-chunking around the fused targets (primitives._fused_impl), run on
    CPU with the targets replaced by the reference: out, lse and all grads equal the reference on
    the unpadded inputs, and the kernels see one head dim, zero-padded, with the caller's scale."""
    from jax_na import _checks, primitives, reference

    seen = []
    monkeypatch.setattr(jax.ffi, "ffi_call", _fake_fused_ffi_call(seen))
    monkeypatch.setattr(_checks, "FUSED_MAX_BATCH", 2)   # B = 5 -> chunks 2, 2, 1
    r = np.random.default_rng(D)
    Bn = 5
    q, k, v, ak, av = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in
                       ((Bn, X, Y, H, D), (Bn, X, Y, HKV, D), (Bn, X, Y, HKV, Dv), (Bn, NA, HKV, D),
                        (Bn, NA, HKV, Dv)))
    params = _checks.window_params(2, (X, Y), K, (1, 2), 1, (True, False), None, D)
    impl = lambda kind: jax.jit(lambda *a: primitives._fused_impl(kind, *a, params=params, backend="fused"))
    out, lse = impl("fwd")(q, k, v, ak, av)
    ref_out, ref_lse = reference.attention_forward(q, k, v, ak, av, params)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    P = _checks.fused_head_dim(D, Dv, jnp.float32)
    assert seen == [("jax_na_fused_fwd", b, P, np.float32(D ** -0.5)) for b in (2, 2, 1)]
    ct_o = jnp.asarray(r.standard_normal(out.shape), jnp.float32)
    ct_l = jnp.asarray(r.standard_normal(lse.shape), jnp.float32)
    grads = impl("bwd")(q, k, v, ak, av, out, lse, ct_o, ct_l)
    ref_grads = jax.vjp(lambda *a: reference.attention_forward(*a, params), q, k, v, ak, av)[1]((ct_o, ct_l))
    for g, rg, x in zip(grads, ref_grads, (q, k, v, ak, av)):
        assert g.shape == x.shape
        np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,arch", [("fused", 0), ("fused_sm80", 80), ("fused_sm90", 90), ("auto", 0)])
def test_fused_backend_names_pick_the_kernels(monkeypatch, backend, arch):
    """backend "fused" lets the targets choose (Hopper kernels on sm_90), "fused_sm80"/"fused_sm90" pin
    the portable/Hopper kernels of both directions through the targets' arch attribute; the results
    are the same."""
    from jax_na import _checks, primitives
    seen, seen_arch = [], []
    monkeypatch.setattr(jax.ffi, "ffi_call", _fake_fused_ffi_call(seen, seen_arch))
    q, k, v, ak, av = _inputs()
    params = _checks.window_params(2, (X, Y), K, (1, 2), 1, (True, False), None, D)
    out, lse = jax.jit(lambda *a: primitives._fused_impl("fwd", *a, params=params, backend=backend))(
        q, k, v, ak, av)
    ref_out, ref_lse = reference.attention_forward(q, k, v, ak, av, params)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    d_out, d_lse = jnp.ones_like(out), jnp.zeros_like(lse)
    grads = jax.jit(lambda *a: primitives._fused_impl("bwd", *a, params=params, backend=backend))(
        q, k, v, ak, av, out, lse, d_out, d_lse)
    ref_grads = jax.vjp(lambda *a: reference.attention_forward(*a, params), q, k, v, ak, av)[1]((d_out, d_lse))
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-5)
    assert seen_arch == [("jax_na_fused_fwd", arch), ("jax_na_fused_bwd", arch)]
    assert _checks.backend_family(backend) == ("fused" if backend != "auto" else "auto")


@pytest.mark.skipif(ext.has_cuda_kernels(), reason="jax_na has CUDA kernels here")
def test_cuda_lowering_without_kernels_falls_back_to_reference():
    q, k, v, ak, av = _inputs()
    text = _cuda_hlo(_fwd(None), q, k, v, ak, av)
    assert "jax_na_" not in text
    text = _cuda_hlo(_loss(None), q, k, v, ak, av)
    assert "jax_na_" not in text
    assert "jax_na_" not in _cuda_hlo(_loss(None), *_bf16(64, 64))
    # and the CPU lowering of the same function runs and is right (sanity)
    out, lse = jax.jit(_fwd(None))(q, k, v, ak, av)
    assert out.shape == (B, X, Y, H, DV) and bool(jnp.all(jnp.isfinite(out)))


def test_cpu_lowering_never_has_custom_calls(monkeypatch):
    _pretend(monkeypatch)
    try:
        q, k, v, ak, av = _inputs()
        text = jax.jit(_loss(None)).trace(q, k, v, ak, av).lower(lowering_platforms=("cpu",)).as_text()
        assert "jax_na_" not in text
        text = jax.jit(_loss(None)).trace(*_bf16(64, 64)).lower(lowering_platforms=("cpu",)).as_text()
        assert "jax_na_" not in text
        assert re.search(r"stablehlo\.(dot_general|exponential)", text)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
