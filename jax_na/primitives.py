"""JAX primitives of jax_na: abstract evaluation, batching and per-platform lowering.

Six primitives, each a kernel family's entry:

=====================  ================================================  ========================================
primitive              operands -> results                                CUDA targets (naive; fused or gemm)
=====================  ================================================  ========================================
``jax_na_fwd``         q, k, v, add_k, add_v -> out, lse                  jax_na_naive_fwd; jax_na_fused_fwd
``jax_na_bwd``         q, k, v, add_k, add_v, out, lse, d_out, d_lse      jax_na_naive_bwd; jax_na_fused_bwd
                       -> dq, dk, dv, d_add_k, d_add_v
``jax_na_qk``          q, k, rpb -> attn                                  jax_na_naive_qk; jax_na_gemm_qk
``jax_na_qk_bwd``      d_attn, q, k, rpb -> dq, dk, d_rpb                 jax_na_naive_qk_bwd; jax_na_gemm_qk_bwd
``jax_na_av``          attn, v -> out                                     jax_na_naive_av; jax_na_gemm_av
``jax_na_av_bwd``      d_out, attn, v -> d_attn, dv                       jax_na_naive_av_bwd; jax_na_gemm_av_bwd
=====================  ================================================  ========================================

Absent additional keys/values are ``[B, 0, H_kv, D]`` arrays and an absent bias is a ``[0]`` array, so
every primitive has a fixed arity. Every primitive carries ``params`` (``NAParams``) and ``backend``
("auto" or a backend name). Lowering picks the kernel per platform: on CUDA the requested kernel or,
for "auto", the first family of ``AUTO_PREFERENCE`` that supports the call's dtype and shapes
(``cuda_kernel``); on every other platform, and for inputs no kernel supports, the pure-JAX reference
(the backward of the reference is its autodiff). The fused targets run inside a small traced function
(``_fused_impl``) that zero-pads the head dims to 32, 64, 128 or 256 (float32: 64 or 128) and slices the results back; the gemm
targets likewise (``_gemm_impl``: the head dim each op contracts or produces, float32/float16/bfloat16).

Each primitive lowers through ``sharding.partitioned_lowering`` (``custom_partitioning`` with a Shardy
rule), which runs a per-device twin ``<name>_local`` carrying the platform lowerings on each shard.

Every primitive takes any number of leading batch axes in front of ``B`` (``[*V, B, ...]`` for every
operand and result; a bias ``[*V, H, ...]``, an absent bias stays ``[0]``): batching moves the vmapped
axis to the front and binds the primitive on that. The per-device lowering (after partitioning, so it
is a local reshape) folds the leading axes into the batch, or into the heads for the unfused QK ops so
that a per-instance ``d_rpb`` is not summed across them. Folding before partitioning instead would merge
an unsharded vmapped axis with a sharded batch into one axis whose sharding XLA cannot express (it
would all-gather).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_na import _checks, _ext, reference, sharding
from jax_na._checks import NAParams

try:  # the standard eager implementation of a primitive: compile it alone and run it
    from jax._src.dispatch import apply_primitive as _apply_primitive
except ImportError:  # pragma: no cover
    _apply_primitive = None

_NAIVE_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
# CUDA kernel families that "auto" tries, fastest first: a call lowers to the first one that is
# compiled here and supports it (``supports(..., auto=True)``: kind, dtype, head dims, heads, per call),
# else to the reference. Measured on an H100 (bf16, BENCHMARKS.md problems, effective TFLOP/s forward):
# the fused kernels 101-401 (forward+backward 82-319), the reference (XLA matmuls over each query
# tile's window bounding box) 12-37, the naive kernels 0.4-1.0. So "fused" comes first, and "naive" is
# not listed: it is only used when asked for. "fused" has only fwd/bwd and "gemm" only the unfused
# qk/av ops (and their backwards), so each kind has one candidate. auto takes "gemm" only where it
# runs on tensor cores (float32/float16/bfloat16, head dims up to 128, padded to 64/128; float32 through
# 3xTF32 at float32 accuracy), the case it is built to beat the reference in (float32 on the H100: 6-71x
# the reference per forward op, README.md); larger head dims would run on the naive kernels inside the
# gemm targets, so auto leaves them, and fwd/bwd calls no fused kernel takes, to the reference.
AUTO_PREFERENCE: tuple[str, ...] = ("fused", "gemm")


def _shaped(shape, dtype):
    return jax.core.ShapedArray(tuple(shape), jnp.dtype(dtype))


def _lse_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


# ----------------------------------------------------------------------------- reference impls

def _fwd_ref(q, k, v, add_k, add_v, *, params, backend):
    return reference.attention_forward(q, k, v, add_k, add_v, params)


def _bwd_ref(q, k, v, add_k, add_v, out, lse, d_out, d_lse, *, params, backend):
    f = lambda *a: reference.attention_forward(*a, params)
    _, vjp = jax.vjp(f, q, k, v, add_k, add_v)
    return vjp((d_out, d_lse))


def _qk_ref(q, k, rpb, *, params, backend):
    return reference.qk_forward(q, k, rpb if rpb.size else None, params)


def _qk_bwd_ref(d_attn, q, k, rpb, *, params, backend):
    # d_attn comes in the input dtype (functional._qk_bwd) also for float32 scores.
    params = dataclasses.replace(params, scores_f32=False)
    if rpb.size:
        _, vjp = jax.vjp(lambda q, k, b: reference.qk_forward(q, k, b, params), q, k, rpb)
        return vjp(d_attn)
    _, vjp = jax.vjp(lambda q, k: reference.qk_forward(q, k, None, params), q, k)
    return (*vjp(d_attn), jnp.zeros_like(rpb))


def _av_ref(attn, v, *, params, backend):
    return reference.av_forward(attn, v, params)


def _av_bwd_ref(d_out, attn, v, *, params, backend):
    _, vjp = jax.vjp(lambda a, v: reference.av_forward(a, v, params), attn, v)
    return vjp(d_out)


# ----------------------------------------------------------------------------- abstract eval
# Shapes are taken from the ends (``[:-1]``, ``[-1]``), so the leading batch axes of the operands carry
# over to the results as they are.

def _fwd_abstract(q, k, v, add_k, add_v, *, params, backend):
    return (_shaped((*q.shape[:-1], v.shape[-1]), q.dtype), _shaped(q.shape[:-1], _lse_dtype(q.dtype)))


def _bwd_abstract(q, k, v, add_k, add_v, out, lse, d_out, d_lse, *, params, backend):
    return tuple(_shaped(x.shape, x.dtype) for x in (q, k, v, add_k, add_v))


def _qk_abstract(q, k, rpb, *, params, backend):
    return _shaped((*q.shape[:-1], params.window_size), _checks.scores_dtype(q.dtype, params))


def _qk_bwd_abstract(d_attn, q, k, rpb, *, params, backend):
    return tuple(_shaped(x.shape, x.dtype) for x in (q, k, rpb))


def _av_abstract(attn, v, *, params, backend):
    return _shaped((*attn.shape[:-1], v.shape[-1]), v.dtype)


def _av_bwd_abstract(d_out, attn, v, *, params, backend):
    return tuple(_shaped(x.shape, x.dtype) for x in (attn, v))


# ----------------------------------------------------------------------------- batching

def _as_leading(x, d, size):
    if d is None:
        return jnp.broadcast_to(x, (size, *x.shape))
    return jnp.moveaxis(x, d, 0)


def _batch_into_batch(prim, args, dims, **params):
    """vmap axis V -> a leading batch axis of every operand and result: ``[V, *outer, B, ...]``."""
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    outs = prim.bind(*(_as_leading(x, d, size) for x, d in zip(args, dims)), **params)
    return (outs, [0] * len(outs)) if prim.multiple_results else (outs, 0)


def _rpb_leading(rpb, d, size):
    """The bias with the vmapped axis in front (a per-instance bias), or the absent bias ``[0]``."""
    if rpb.size == 0:  # absent, batched or not: stays the placeholder
        return jnp.zeros((0,), rpb.dtype)
    return _as_leading(rpb, d, size)


def _qk_batch(args, dims, *, params, backend):
    q, k, rpb = args
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    q, k = (_as_leading(x, d, size) for x, d in zip((q, k), dims))
    return qk_p.bind(q, k, _rpb_leading(rpb, dims[2], size), params=params, backend=backend), 0


def _qk_bwd_batch(args, dims, *, params, backend):
    d_attn, q, k, rpb = args
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    d_attn, q, k = (_as_leading(x, d, size) for x, d in zip((d_attn, q, k), dims))
    dq, dk, d_rpb = qk_bwd_p.bind(d_attn, q, k, _rpb_leading(rpb, dims[3], size), params=params,
                                  backend=backend)
    if not d_rpb.size:  # no bias: an empty gradient per instance
        d_rpb = jnp.zeros((size, 0), rpb.dtype)
    return (dq, dk, d_rpb), (0, 0, 0)


# ----------------------------------------------------------------------------- leading batch axes

def _fold_into_batch(x, n):
    """``[*V (n axes), B, ...] -> [prod(V) * B, ...]``."""
    return x.reshape(math.prod(x.shape[:n + 1]), *x.shape[n + 1:])


def _fold_into_heads(x, n):
    """``[*V (n axes), B, *S, Hx, C] -> [B, *S, prod(V) * Hx, C]``, V outermost in the heads (so that
    GQA's query head h -> kv head h // G mapping still holds)."""
    x = jnp.moveaxis(x, tuple(range(n)), tuple(range(x.ndim - 2 - n, x.ndim - 2)))
    return x.reshape(*x.shape[:-2 - n], math.prod(x.shape[-2 - n:-1]), x.shape[-1])


def _unfold_heads(x, lead, heads):
    """The inverse of :func:`_fold_into_heads` (``heads``: Hx, the heads of one instance)."""
    n = len(lead)
    x = x.reshape(*x.shape[:-2], *lead, heads, x.shape[-1])
    return jnp.moveaxis(x, tuple(range(x.ndim - 2 - n, x.ndim - 2)), tuple(range(n)))


def _fold_bias(rpb, n):
    """``[*V, H, ...] -> [prod(V) * H, ...]``; the absent bias ``[0]`` as it is."""
    return rpb if rpb.ndim == 1 else rpb.reshape(math.prod(rpb.shape[:n + 1]), *rpb.shape[n + 1:])


def _flat_impl(kind, prim, *args, params, backend):
    """``prim`` on operands with leading batch axes: folded into the batch (into the heads for the
    unfused QK ops: a bias per instance), bound as one call, the results unfolded."""
    n = sharding.leading_batch_axes(params.rank, args[0].shape)
    lead = args[0].shape[:n]
    if kind == "qk":
        q, k, rpb = args
        out = prim.bind(_fold_into_heads(q, n), _fold_into_heads(k, n), _fold_bias(rpb, n), params=params,
                        backend=backend)
        return [_unfold_heads(out, lead, q.shape[-2])]
    if kind == "qk_bwd":
        d_attn, q, k, rpb = args
        dq, dk, d_rpb = prim.bind(*(_fold_into_heads(x, n) for x in (d_attn, q, k)), _fold_bias(rpb, n),
                                  params=params, backend=backend)
        d_rpb = d_rpb if rpb.ndim == 1 else d_rpb.reshape(rpb.shape)
        return [_unfold_heads(dq, lead, q.shape[-2]), _unfold_heads(dk, lead, k.shape[-2]), d_rpb]
    B = args[0].shape[n]  # every operand and result has this batch (from B, not by division: B may be 0)
    outs = prim.bind(*(_fold_into_batch(x, n) for x in args), params=params, backend=backend)
    outs = outs if prim.multiple_results else [outs]
    return [o.reshape(*lead, B, *o.shape[1:]) for o in outs]


def _with_leading_axes(kind, prim, lowering):
    """The lowering rule of the per-device primitive ``prim``: ``lowering`` for a call without leading
    batch axes; otherwise the leading axes are folded away (a local reshape: this runs per device,
    after partitioning) around a call of ``prim`` on the folded operands, which ``lowering`` lowers."""
    flat_lowering = mlir.lower_fun(functools.partial(_flat_impl, kind, prim), multiple_results=True)

    def rule(ctx, *args, params, backend):
        if sharding.leading_batch_axes(params.rank, ctx.avals_in[0].shape) == 0:
            return lowering(ctx, *args, params=params, backend=backend)
        return flat_lowering(ctx, *args, params=params, backend=backend)
    return rule


# ----------------------------------------------------------------------------- CUDA lowering

def supports(family: str, kind: str, avals, params: NAParams | None = None, auto: bool = False) -> bool:
    """Whether CUDA kernel family ``family`` is compiled here and takes primitive ``kind`` ("fwd",
    "bwd", "qk", ...) on operands of shapes/dtypes ``avals``. Decided per call at lowering time (so
    ``vmap``, whose axes the per-device lowering folds into the batch, is taken into account).
    ``auto``: whether "auto" should take it (see AUTO_PREFERENCE: "gemm" only on its tensor cores)."""
    dtype = avals[0].dtype  # operand 0 has the call's dtype
    if family == "naive":
        return _ext.has_cuda_kernels() and jnp.dtype(dtype) in [jnp.dtype(d) for d in _NAIVE_DTYPES]
    if family == "gemm":
        if kind not in _GEMM_HEAD_OPERANDS or not _ext.has_target(f"jax_na_gemm_{kind}"):
            return False
        if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _NAIVE_DTYPES]:
            return False
        # An empty call launches nothing: the reference lowering handles it (the absent bias [0]
        # is the one operand that may be empty).
        if any(math.prod(a.shape) == 0 for a in avals if len(a.shape) > 1):
            return False
        head = avals[_GEMM_HEAD_OPERANDS[kind][0]].shape[-1]
        return not auto or _checks.gemm_tensor_cores(dtype, head)
    if family == "fused":
        if kind not in ("fwd", "bwd") or not _ext.has_target(f"jax_na_fused_{kind}"):
            return False
        q, v = avals[0], avals[2]
        # An empty call (zero batch or heads) launches nothing: the reference lowering handles it.
        return (math.prod(q.shape) > 0
                and _checks.fused_supports(dtype, q.shape[-1], v.shape[-1], q.shape[-2]))
    return False


def cuda_kernel(backend: str, kind: str, avals, params: NAParams | None = None) -> str | None:
    """The CUDA kernel family primitive ``kind`` lowers to on CUDA for ``backend`` ("auto" or a
    backend name) and these operands, or None for the reference.

    An explicit backend whose kernel is missing for this call lowers to the reference too: that
    only happens for inputs the argument checks cannot see (an empty call) or on a partial build
    (fused forward compiled without the fused backward: the backward then runs on the reference)."""
    if backend == "auto":
        return next((f for f in AUTO_PREFERENCE if supports(f, kind, avals, params, auto=True)), None)
    family = _checks.backend_family(backend)
    return family if family in ("naive", "fused", "gemm") and supports(family, kind, avals, params) else None


def _attrs(params: NAParams, with_scale=True):
    attrs = dict(
        kernel_size=np.asarray(params.kernel_size, np.int64),
        stride=np.asarray(params.stride, np.int64),
        dilation=np.asarray(params.dilation, np.int64),
        is_causal=np.asarray(params.is_causal, np.int64),
    )
    if with_scale:
        attrs["scale"] = np.float32(params.scale)
    return attrs


# Padding floats of each dQ accumulator row of the non-deterministic fused backward's workspace
# (cuda/fused/fused_bwd.h, kDqAccumPad): rows of P + 8 floats, head-major.
DQ_ACCUM_PAD = 8


def workspace_size(kind: str, family: str, avals, params: NAParams, adds_dq: bool = False) -> int | None:
    """Elements of the float32 workspace result (the last result, docs/ffi.md) that the CUDA target of
    kernel family ``family`` for primitive ``kind`` takes, or None when it takes none. Leading batch
    axes count as part of the batch (the kernels get them folded into it). ``adds_dq``: the fused
    backward adds dQ in its warp-specialized kernel (its ``deterministic`` attribute 0; operands padded to head dim P)."""
    if kind not in ("fwd", "bwd"):
        return None
    q, add_k = avals[0], avals[3]
    rows = math.prod(q.shape[:-1])  # B * N * H (q: [*V, B, *S, H, D])
    if family == "naive":  # [B, N, H, W + Na] float32 scores (twice in the backward) + one per row
        scores = rows * (params.window_size + add_k.shape[-3])
        return scores if kind == "fwd" else 2 * scores + rows
    if family == "fused":  # the backward: delta per query token and head, and dQ's accumulator rows
        # of P + DQ_ACCUM_PAD floats (cuda/fused/fused_bwd.h's kDqAccumPad)
        # (the forward's workspace, one int32 tile counter, is not float32: _fused_impl asks for it)
        return None if kind == "fwd" else rows * (1 + q.shape[-1] + DQ_ACCUM_PAD if adds_dq else 1)
    raise ValueError(f"unknown kernel family {family!r}")


def _pad_last(x, size):
    """Zero-pad the last axis of ``x`` to ``size``."""
    if x.shape[-1] == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _last(x, size):
    return x if x.shape[-1] == size else x[..., :size]


def _batch_chunks(call, operands):
    """``call(*operands)`` on batch chunks of at most FUSED_MAX_BATCH (the kernels' grid limit),
    results concatenated along the batch. One call, with no copies, in the usual case."""
    B, chunk = operands[0].shape[0], _checks.FUSED_MAX_BATCH
    if B <= chunk:
        return call(*operands)
    parts = [call(*(x[i:i + chunk] for x in operands)) for i in range(0, B, chunk)]
    return [jnp.concatenate(p, axis=0) for p in zip(*parts)]


def _fused_impl(kind, *args, params, backend):
    """The fused CUDA targets on the primitive's operands: head dims padded to the instantiated one
    (the kernels need D == D_v in FUSED_HEAD_DIMS; zero columns of q and k change no score, zero
    columns of v only add zero output columns, and the scale stays the caller's), the batch split
    into chunks the grid can take, the results sliced back to the primitive's shapes."""
    q, v = args[0], args[2]
    D, Dv = q.shape[-1], v.shape[-1]
    attrs = _attrs(params)
    f32 = jnp.dtype(jnp.float32)
    # The kernels' online softmax tracks the running maximum of the raw scores q.k, which orders like
    # the scaled scores only for scale > 0. A negative scale runs as |scale| on -q: (-q).k = -(q.k)
    # exactly, so every score is bit-identical; scale 0 runs as 1 on q * 0 (every score 0: a uniform
    # softmax over the window; dq = 0). dk, dv and the lse do not change.
    sign = float(np.sign(params.scale))
    q_in = (lambda x: x) if sign > 0 else (lambda x: x * jnp.asarray(sign, x.dtype))
    if sign <= 0:
        attrs["scale"] = np.float32(abs(params.scale) if sign < 0 else 1.0)
    arch = np.int64(_checks.FUSED_BACKENDS.get(backend, 0))  # which kernels: 0 auto, 80 portable, 90 Hopper

    if kind == "fwd":
        # The forward's tile configuration per kernel set (q_tile_shape / kv_tile_shape; 0: default).
        tiles = params.fwd_tiles or _checks.FusedTiles(int(arch), 0, 0)
        tile_attrs = dict(arch=np.int64(tiles.arch), tiles_sm80=np.int64(tiles.sm80), tiles_sm90=np.int64(tiles.sm90))
        P = _checks.fused_head_dim(D, Dv, q.dtype, backend, tiles.arch)

        def call(q, k, v, add_k, add_v):
            out = jax.ShapeDtypeStruct((*q.shape[:-1], P), q.dtype)
            lse = jax.ShapeDtypeStruct(q.shape[:-1], f32)
            # one int32 that the target zeroes: the persistent Hopper forward's tile counter
            ws = jax.ShapeDtypeStruct((1,), jnp.dtype(jnp.int32))
            res = jax.ffi.ffi_call("jax_na_fused_fwd", (out, lse, ws))(q, k, v, add_k, add_v, **tile_attrs, **attrs)
            return res[:2]

        out, lse = _batch_chunks(call, [_pad_last(x, P) for x in (q_in(args[0]), *args[1:])])
        return [_last(out, Dv), lse]

    # Non-deterministic where the Hopper backward runs: its warp-specialized dK/dV/dQ kernel adds dQ
    # into P + DQ_ACCUM_PAD more float32 workspace entries per query row, and no dQ kernel recomputes S
    # and dP.
    # The backward's tile configuration per kernel set (backward_q_tile_shape / backward_kv_tile_shape).
    tiles = params.bwd_tiles or _checks.FusedTiles(int(arch), 0, 0)
    P = _checks.fused_head_dim(D, Dv, q.dtype, backend, tiles.arch)
    adds_dq = not params.deterministic and _checks.fused_bwd_adds_dq(q.dtype, P, params.window_size, backend, tiles)
    if not params.deterministic and not adds_dq:
        # The deterministic kernels take a call that asked for the other mode (the portable set runs it),
        # but its Hopper index came from the non-deterministic kernel's list, which is longer: past the
        # deterministic list it names nothing there, so the default stands in (those kernels run only
        # where dispatch.cu and fused_bwd_adds_dq disagree, and then correctly in any configuration).
        if tiles.sm90 >= len(_checks.fused_bwd_tile_configs("sm90", q.dtype, P, params.rank, True)):
            tiles = dataclasses.replace(tiles, sm90=0)
    tile_attrs = dict(arch=np.int64(tiles.arch), tiles_sm80=np.int64(tiles.sm80), tiles_sm90=np.int64(tiles.sm90))

    def call(q, k, v, add_k, add_v, out, lse, d_out, d_lse):
        grads = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, add_k, add_v)]
        ws = jax.ShapeDtypeStruct((workspace_size("bwd", "fused", (q, k, v, add_k), params, adds_dq),), f32)
        res = jax.ffi.ffi_call("jax_na_fused_bwd", (*grads, ws))(q, k, v, add_k, add_v, out, lse, d_out, d_lse,
                                                                  deterministic=np.int64(not adds_dq),
                                                                  **tile_attrs, **attrs)
        return res[:5]

    q, k, v, add_k, add_v, out, lse, d_out, d_lse = args
    padded = [*(_pad_last(x, P) for x in (q_in(q), k, v, add_k, add_v, out)), lse, _pad_last(d_out, P), d_lse]
    dq, *grads = _batch_chunks(call, padded)
    return [_last(g, x.shape[-1]) for g, x in zip((q_in(dq), *grads), (q, k, v, add_k, add_v))]


# Per unfused kind: the operands whose last axis is the head dim the op contracts or produces (qk,
# qk_bwd: D of q and k; av: D_v of v; av_bwd: D_v of d_out and v); the gemm lowering pads these.
_GEMM_HEAD_OPERANDS = {"qk": (0, 1), "qk_bwd": (1, 2), "av": (1,), "av_bwd": (0, 2)}
_ABSTRACT = {"qk": _qk_abstract, "qk_bwd": _qk_bwd_abstract, "av": _av_abstract, "av_bwd": _av_bwd_abstract}


def _gemm_impl(kind, *args, params, backend):
    """The gemm CUDA targets on the primitive's operands: the head dim of the op
    (``_GEMM_HEAD_OPERANDS``; float32, float16 and bfloat16 alike) zero-padded to the tensor-core
    kernels' 64 or 128 (zero columns of q and k change no score, zero columns of v and d_out only add
    zero output columns and zero dv columns; the scale stays the caller's), the results sliced back to
    the primitive's shapes. Head dims above 128 go unpadded (the targets run them on their naive
    kernels). The operands, results and attributes are those of the naive targets (docs/ffi.md):
    qk_bwd gets no rpb operand, only a d_rpb result of its shape."""
    pad = _GEMM_HEAD_OPERANDS[kind]
    P = _checks.gemm_head_dim(args[0].dtype, args[pad[0]].shape[-1])
    padded = [_pad_last(x, P) if i in pad else x for i, x in enumerate(args)]
    abstract = _ABSTRACT[kind]  # the result shapes follow the (padded) operands
    results = abstract(*padded, params=params, backend=backend)
    wanted = abstract(*args, params=params, backend=backend)
    results, wanted = ((r,) if kind in ("qk", "av") else r for r in (results, wanted))
    operands = padded[:3] if kind == "qk_bwd" else padded
    out = jax.ffi.ffi_call(f"jax_na_gemm_{kind}", [jax.ShapeDtypeStruct(r.shape, r.dtype) for r in results])(
        *operands, **_attrs(params, with_scale=kind in ("qk", "qk_bwd")))
    return [_last(o, w.shape[-1]) for o, w in zip(out, wanted)]


def _register(prim, abstract, ref_impl, target, *, multiple_results, with_scale=True, drop_operands=()):
    """Abstract eval and eager impl of ``prim``; its lowering partitions it over the devices
    (sharding.py) around a per-device twin ``<name>_local`` that has the platform lowerings: the
    reference everywhere, the FFI call on CUDA (both behind the fold of leading batch axes)."""
    abstract = sharding.manual_axes_rule(target, abstract)  # results vary like operands in shard_map
    prim.multiple_results = multiple_results
    prim.def_abstract_eval(abstract)
    if _apply_primitive is not None:
        prim.def_impl(functools.partial(_apply_primitive, prim))
    local = Primitive(f"{prim.name}_local")
    local.multiple_results = multiple_results
    local.def_abstract_eval(abstract)
    mlir.register_lowering(prim, sharding.partitioned_lowering(target, local))
    sharding.requires_devices(prim)
    ref_lowering = mlir.lower_fun(ref_impl, multiple_results=multiple_results)
    mlir.register_lowering(local, _with_leading_axes(target, local, ref_lowering))
    # The fused and gemm targets run inside small traced functions (padding, batch chunks).
    traced_impl = _fused_impl if target in ("fwd", "bwd") else _gemm_impl
    traced_lowering = mlir.lower_fun(functools.partial(traced_impl, target), multiple_results=True)

    def cuda_lowering(ctx, *args, params, backend):
        family = cuda_kernel(backend, target, ctx.avals_in, params)
        if family is None:
            return ref_lowering(ctx, *args, params=params, backend=backend)
        if family in ("fused", "gemm"):  # padding (and batch chunks) around the call
            return traced_lowering(ctx, *args, params=params, backend=backend)
        keep = [i for i in range(len(args)) if i not in drop_operands]
        avals_out = list(ctx.avals_out)
        ws = workspace_size(target, family, ctx.avals_in, params)
        if ws is not None:
            avals_out.append(_shaped((ws,), jnp.float32))
        ctx2 = ctx.replace(avals_in=[ctx.avals_in[i] for i in keep], avals_out=avals_out)
        results = jax.ffi.ffi_lowering(f"jax_na_{family}_{target}")(
            ctx2, *[args[i] for i in keep], **_attrs(params, with_scale))
        return results[: len(ctx.avals_out)]

    mlir.register_lowering(local, _with_leading_axes(target, local, cuda_lowering), platform="cuda")


fwd_p = Primitive("jax_na_fwd")
bwd_p = Primitive("jax_na_bwd")
qk_p = Primitive("jax_na_qk")
qk_bwd_p = Primitive("jax_na_qk_bwd")
av_p = Primitive("jax_na_av")
av_bwd_p = Primitive("jax_na_av_bwd")

_register(fwd_p, _fwd_abstract, _fwd_ref, "fwd", multiple_results=True)
_register(bwd_p, _bwd_abstract, _bwd_ref, "bwd", multiple_results=True)
_register(qk_p, _qk_abstract, _qk_ref, "qk", multiple_results=False)
# The bias operand of qk_bwd only tells the shape of d_rpb; the kernel does not read it.
_register(qk_bwd_p, _qk_bwd_abstract, _qk_bwd_ref, "qk_bwd", multiple_results=True, drop_operands=(3,))
_register(av_p, _av_abstract, _av_ref, "av", multiple_results=False, with_scale=False)
_register(av_bwd_p, _av_bwd_abstract, _av_bwd_ref, "av_bwd", multiple_results=True, with_scale=False)

batching.primitive_batchers[fwd_p] = functools.partial(_batch_into_batch, fwd_p)
batching.primitive_batchers[bwd_p] = functools.partial(_batch_into_batch, bwd_p)
batching.primitive_batchers[av_p] = functools.partial(_batch_into_batch, av_p)
batching.primitive_batchers[av_bwd_p] = functools.partial(_batch_into_batch, av_bwd_p)
batching.primitive_batchers[qk_p] = _qk_batch
batching.primitive_batchers[qk_bwd_p] = _qk_bwd_batch
