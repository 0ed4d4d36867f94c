"""Functional API: na1d/na2d/na3d (fused-style attention) and the unfused na*d_qk / na*d_av ops.

All functions take heads-last arrays, work under ``jit``, ``vmap``, ``grad`` (and their nestings),
and check their arguments before anything is traced into a kernel (see ``_checks``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_na import _checks
from jax_na.primitives import av_bwd_p, av_p, bwd_p, fwd_p, qk_bwd_p, qk_p

__all__ = ["na1d", "na2d", "na3d", "na1d_qk", "na2d_qk", "na3d_qk", "na1d_av", "na2d_av", "na3d_av",
           "fused_tile_configs"]


# ----------------------------------------------------------------------------- differentiation

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, add_k, add_v, params, backend):
    return tuple(fwd_p.bind(q, k, v, add_k, add_v, params=params, backend=backend))


def _attention_fwd(q, k, v, add_k, add_v, params, backend):
    out, lse = fwd_p.bind(q, k, v, add_k, add_v, params=params, backend=backend)
    # The backward recomputes the probabilities from the LSE: save inputs, output and LSE only.
    return (out, lse), (q, k, v, add_k, add_v, out, lse)


def _attention_bwd(params, backend, res, cts):
    d_out, d_lse = cts
    return tuple(bwd_p.bind(*res, d_out, d_lse.astype(res[-1].dtype), params=params, backend=backend))


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _qk(q, k, rpb, params, backend):
    return qk_p.bind(q, k, rpb, params=params, backend=backend)


def _qk_fwd(q, k, rpb, params, backend):
    return _qk(q, k, rpb, params, backend), (q, k, rpb)


def _qk_bwd(params, backend, res, d_attn):
    q, k, rpb = res
    # float32 scores (params.scores_f32) take their gradient in the input dtype, as the fused
    # kernels round dS for their MMAs.
    return tuple(qk_bwd_p.bind(d_attn.astype(q.dtype), q, k, rpb, params=params, backend=backend))


_qk.defvjp(_qk_fwd, _qk_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _av(attn, v, params, backend):
    return av_p.bind(attn, v, params=params, backend=backend)


def _av_fwd(attn, v, params, backend):
    return _av(attn, v, params, backend), (attn, v)


def _av_bwd(params, backend, res, d_out):
    return tuple(av_bwd_p.bind(d_out, *res, params=params, backend=backend))


_av.defvjp(_av_fwd, _av_bwd)


# ----------------------------------------------------------------------------- shared entry points

def _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, return_lse, backend, q_tile_shape=None, kv_tile_shape=None,
        deterministic_backward=None, backward_q_tile_shape=None, backward_kv_tile_shape=None):
    params, backend = _checks.attention_args(rank, query, key, value, kernel_size, stride, dilation,
                                             is_causal, scale, additional_keys, additional_values, backend,
                                             q_tile_shape, kv_tile_shape, deterministic_backward,
                                             backward_q_tile_shape, backward_kv_tile_shape)
    if additional_keys is None:
        B, Hkv = key.shape[0], key.shape[-2]
        additional_keys = jnp.zeros((B, 0, Hkv, key.shape[-1]), key.dtype)
        additional_values = jnp.zeros((B, 0, Hkv, value.shape[-1]), value.dtype)
    if backend == "gemm":  # no fused gemm kernel: the unfused gemm ops around a float32 softmax
        out, lse = _unfused_attention(query, key, value, additional_keys, additional_values, params, backend)
    else:
        out, lse = _attention(query, key, value, additional_keys, additional_values, params, backend)
    return (out, lse) if return_lse else out


def _unfused_attention(q, k, v, add_k, add_v, params, backend):
    """Neighborhood attention composed of the unfused ops of ``backend`` ("gemm"; any backend with
    them computes the same function, e.g. "reference" in the tests): window scores ``_qk`` (no bias,
    with the call's stride, dilation, causal mask and scale) in float32 (``scores_f32``); the
    additional keys' scores densely in float32;
    one float32 softmax over both (masked window entries are ``-inf``: probability 0); ``_av`` of
    the window probabilities (in the input dtype) plus the additional values' part. Gradients run
    through the custom VJPs of ``_qk``/``_av`` (the backward primitives of ``backend``) and autodiff
    of the rest.

    Shapes as ``na{1,2,3}d``: q ``[B, *S, H, D]``, k ``[B, *S, H_kv, D]``, v ``[B, *S, H_kv, D_v]``,
    add_k/add_v ``[B, N_add, H_kv, D/D_v]`` (``N_add`` may be 0). Returns (out ``[B, *S, H, D_v]``
    in the input dtype, lse ``[B, *S, H]`` float32, float64 for float64 inputs).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax_na import _checks
      >>> q = jax.random.normal(jax.random.key(0), (1, 8, 2, 4))
      >>> params = _checks.window_params(1, (8,), 3, head_dim=4)
      >>> add = jnp.zeros((1, 0, 2, 4))
      >>> out, lse = _unfused_attention(q, q, q, add, add, params, "reference")
      >>> out.shape, lse.shape
      ((1, 8, 2, 4), (1, 8, 2))
    """
    dtype = q.dtype
    cdt = jnp.promote_types(dtype, jnp.float32)  # the softmax's dtype (float64 stays float64)
    # Window scores in float32 (the kernels accumulate in float32 and write them unrounded).
    scores_params = dataclasses.replace(params, scores_f32=True)
    scores = _qk(q, k, jnp.zeros((0,), dtype), scores_params, backend).astype(cdt)   # [B, *S, H, W]
    W = scores.shape[-1]
    B, *S, H, D = q.shape
    N, Hkv, Na = math.prod(S), k.shape[-2], add_k.shape[1]
    if Na:  # query head h reads kv head h // G: group the query heads by kv head
        qg = q.reshape(B, N, Hkv, H // Hkv, D)
        sa = _dot("bnhgd,bmhd->bnhgm", qg, add_k, cdt) * jnp.asarray(params.scale, cdt)
        scores = jnp.concatenate([scores, sa.reshape(B, *S, H, Na)], axis=-1)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None])
    out = _av(probs[..., :W].astype(dtype), v, params, backend)
    if Na:
        pa = probs[..., W:].astype(dtype).reshape(B, N, Hkv, H // Hkv, Na)
        oa = _dot("bnhgm,bmhd->bnhgd", pa, add_v, cdt).reshape(*out.shape)
        out = (out.astype(cdt) + oa).astype(dtype)
    return out, lse


def _dot(spec, a, b, cdt):
    """einsum accumulating in ``cdt``: half-precision operands as they are (the matrix units), float32
    and float64 at full precision (no TF32)."""
    if jnp.dtype(a.dtype).itemsize == 2:
        return jnp.einsum(spec, a, b, preferred_element_type=cdt)
    return jnp.einsum(spec, a.astype(cdt), b.astype(cdt), precision=jax.lax.Precision.HIGHEST)


def _na_qk(rank, query, key, kernel_size, dilation, is_causal, rpb, scale, backend):
    params, backend = _checks.qk_args(rank, query, key, kernel_size, dilation, is_causal, rpb, scale,
                                      backend)
    rpb = jnp.zeros((0,), query.dtype) if rpb is None else rpb
    return _qk(query, key, rpb, params, backend)


def _na_av(rank, weights, value, kernel_size, dilation, is_causal, backend):
    params, backend = _checks.av_args(rank, weights, value, kernel_size, dilation, is_causal, backend)
    return _av(weights, value, params, backend)


_NA_DOC = """{rank}-D neighborhood attention.

    Each query attends to the keys inside its window (``kernel_size`` tokens per axis, shifted inward
    at the borders), plus ``additional_keys`` if given, in one float32 softmax. Exact semantics:
    SEMANTICS.md (NATTEN-compatible).

    Args:
      query: ``{q}``.
      key: ``{k}``; ``H % H_kv == 0`` (grouped-query attention).
      value: ``{v}``.
      kernel_size: window size, an int or one per axis; ``2 <= k``, ``k * dilation <= L``.
      stride: queries in a stride group share their leader's window; ``1 <= stride <= k``.
      dilation: attend within interleaved groups of ``dilation`` tokens; ``>= 1``.
      is_causal: bool or one per axis.
      scale: score scale, default ``D ** -0.5`` (a static Python float).
      additional_keys: optional ``[B, N_add, H_kv, D]`` keys seen by every query.
      additional_values: optional ``[B, N_add, H_kv, D_v]``, required with ``additional_keys``.
      return_lse: also return the float32 log-sum-exp ``{lse}``.
      backend: None/"auto" (chosen per call at lowering time: "fused" on CUDA where its kernels take
        the call, else the reference; auto never picks "gemm" here: fused is faster), "fused"
        (flash-style CUDA kernels: float16/bfloat16 with head dims ``D, D_v <= 256``, and float32
        on the portable kernels (3xTF32 tensor-core products at float32 accuracy) with ``D, D_v <=
        128``; any finite scale (a scale <= 0 runs exactly as ``|scale|`` on ``-q``, or 1 on
        ``q * 0``); other head dims than 64/128/256 are padded to the next of them (zeros, same
        scale) and the results sliced back; the forward runs a TMA + wgmma kernel on compute
        capability 9.0 GPUs without dilation at head dim 128 (and at 64 for windows of 256+ keys)
        in float16/bfloat16 and the portable sm80-class one otherwise; head dim 256 runs on the
        portable kernels, two passes of 128 output columns, and its backward needs an sm_90-class
        GPU's shared memory), "fused_sm80" / "fused_sm90" (the same, with the kernels pinned: the
        portable set / the Hopper set, which is float16/bfloat16 with head dims up to 128),
        "gemm" (the unfused tensor-core ops of ``na{rank}d_qk``/``na{rank}d_av``: window scores and
        the additional keys' scores in float32, one float32 softmax, then the weights in the input
        dtype applied to the values (as the fused kernels round P); float32/16 and
        bfloat16, every head dim: tensor cores with head dims up to 128 (padded to 64/128; float32
        at float32 accuracy through 3xTF32), naive kernels inside its targets above; materializes
        ``[B, *spatial, H, prod(kernel_size)]`` scores), "naive" (one thread per output
        element; every float dtype and head dim) or "reference" (pure JAX, every platform). The
        kernel backends raise a ValueError/TypeError for a call they cannot take or when jax_na was
        built without them; a call lowered for a non-CUDA platform uses the reference.
      q_tile_shape, kv_tile_shape: the fused forward's tile shapes (a tuple of {rank} extents each;
        None: chosen per call: per kernel set, the configuration with the default's keys per tile
        whose tile walk computes the fewest (query, key) pairs for this problem, ``jax_na.tile_model``;
        e.g. 8x16 Q tiles for 2-D windows much longer along the last axis). The compiled
        configurations are listed in ``jax_na.fused_tile_configs(rank, dtype, head_dim)``; one
        given alone picks the first configuration that has it, and a configuration only the Hopper
        (or only the portable) kernels have runs on those. A shape no compiled configuration has,
        or tile shapes with a non-fused backend, is a ValueError. Other backends (auto on a
        platform without the fused kernels) compute the same function and ignore them; the
        backward has its own tiles.
      deterministic_backward: None (default): the mode measured faster: False at 16-bit head dims
        up to 128 (``max(D, D_v)``; the Hopper kernels pad to 64 or 128), True above 128 and in
        float32 (where only deterministic kernels run), and True whenever ``XLA_FLAGS`` asks XLA
        for deterministic GPU ops (``--xla_gpu_deterministic_ops=true`` or
        ``--xla_gpu_exclude_nondeterministic_ops=true``), as XLA's own GPU ops do. False: where
        the fused backward runs its Hopper kernels (compute capability 9.0 GPUs, float16/bfloat16;
        under "fused"/auto at head dim 128, and at head dim 64 for windows of 256 keys or more;
        every head dim up to 128 on "fused_sm90"), one warp-specialized kernel computes dK, dV and
        dQ (CTAs of 128 keys: the configurations of ``fused_tile_configs(rank, dtype, head_dim,
        backward=True, deterministic_backward=False)``), adding dQ into a float32 buffer in
        whatever order its CTAs get there, so dq may differ in its last bits between runs, and
        the backward's workspace holds ``B*N*H*(P+9)`` floats (P: the padded head dim) instead of
        ``B*N*H``; no second kernel recomputes the scores for dQ. Its backward alone took 4-32%
        less time than the deterministic kernels' on p1-p3 and p6-p10 (H100, bfloat16, head dim
        128; forward+backward 4-26% less; sessions 45-46) and 11-22% less on p1-p3 and p11 at
        head dim 64 (session 47; cuda/fused/NOTES.md). True: every gradient
        bitwise reproducible (a dQ kernel and a dK/dV kernel). The other backends and the
        portable fused kernels (e.g. head dim 32 or 64 with small windows) are deterministic
        either way.
      backward_q_tile_shape, backward_kv_tile_shape: the fused backward's tile shapes: the keys
        each CTA of its key-stationary dK/dV kernel owns (kv) and the queries it takes per step
        (q); each configuration also sets the dQ kernel's tiles (deterministic mode). Listed per
        mode in ``jax_na.fused_tile_configs(rank, dtype, head_dim, backward=True,
        deterministic_backward=...)`` (pass the call's mode) and checked as the forward's; with
        the default mode, shapes only the deterministic mode has run that mode. The alternatives
        are flatter boxes, for windows much shorter along the first axis than along the others.
        None: chosen per call: per kernel set, the configuration whose
        dK/dV and dQ kernels compute the fewest pair-products for this problem (``jax_na.tile_model``),
        the default unless an alternative saves more than ``_checks.BWD_CHOICE_MARGIN`` of its
        products (2% portable, 8% Hopper); e.g. the flat key tiles for 3-D windows much shorter on
        the first axis. In 3-D the Hopper non-deterministic mode starts from its flat tiles instead
        (``_checks.BWD_CHOICE_BASE``: half the dQ reductions per step; measured faster on p3, p8,
        p9, p10).

    Returns:
      ``{o}`` in the input dtype, and the LSE when ``return_lse``.

    Example:
      >>> import jax, jax_na
      >>> q = k = v = jax.random.normal(jax.random.key(0), {example_shape})
      >>> jax_na.na{rank}d(q, k, v, kernel_size={example_k}).shape
      {example_out}
    """

_SHAPES = {
    1: dict(q="[B, X, H, D]", k="[B, X, H_kv, D]", v="[B, X, H_kv, D_v]", lse="[B, X, H]",
            o="[B, X, H, D_v]", example_shape="(2, 16, 4, 32)", example_k=5, example_out="(2, 16, 4, 32)"),
    2: dict(q="[B, X, Y, H, D]", k="[B, X, Y, H_kv, D]", v="[B, X, Y, H_kv, D_v]", lse="[B, X, Y, H]",
            o="[B, X, Y, H, D_v]", example_shape="(2, 8, 8, 4, 32)", example_k=3,
            example_out="(2, 8, 8, 4, 32)"),
    3: dict(q="[B, X, Y, Z, H, D]", k="[B, X, Y, Z, H_kv, D]", v="[B, X, Y, Z, H_kv, D_v]",
            lse="[B, X, Y, Z, H]", o="[B, X, Y, Z, H, D_v]", example_shape="(1, 4, 6, 6, 2, 16)",
            example_k="(2, 3, 3)", example_out="(1, 4, 6, 6, 2, 16)"),
}

_QK_DOC = """{rank}-D neighborhood attention scores (unfused), with optional relative positional bias.

    ``weights[..., h, w] = scale * q . k[neighbor w] + rpb[h, j - i + k - 1 per axis]``; ``w`` runs
    row-major over the window axes, counting from each query's window start (positions inside the
    dilation group). Entries outside a causal window are ``-inf`` (so a softmax gives them 0).

    Args:
      query: ``{q}``.
      key: ``{k}``.
      kernel_size, dilation, is_causal: as in ``na{rank}d`` (stride is always 1 here).
      rpb: optional ``[H, 2*k-1 per axis]`` bias in the input dtype.
      scale: default ``D ** -0.5``.
      backend: None/"auto" ("gemm" on CUDA where it is compiled, for float32/float16/bfloat16 with
        head dims up to 128, else the reference), "gemm" (tensor cores for float32/float16/bfloat16
        with head dims up to 128, zero-padded to 64/128, float32 at float32 accuracy through 3xTF32;
        larger head dims run on naive kernels inside its targets), "naive" or "reference"; the fused
        kernels have no unfused ops ("fused" is a ValueError).

    Returns:
      ``weights`` of shape ``{w}``.

    Example:
      >>> import jax, jax_na
      >>> q = k = jax.random.normal(jax.random.key(0), {example_shape})
      >>> jax_na.na{rank}d_qk(q, k, kernel_size={example_k}).shape[-1] == {example_w}
      True
    """

_AV_DOC = """{rank}-D neighborhood attention: apply weights to values (unfused).

    ``out[..., h, :] = sum_w weights[..., h, w] * value[neighbor w, h // (H // H_kv)]``; entries outside
    a causal window are ignored.

    Args:
      weights: ``{w}`` (e.g. the softmax of ``na{rank}d_qk``).
      value: ``{v}``.
      kernel_size, dilation, is_causal: as in ``na{rank}d_qk``.
      backend: None/"auto", "gemm", "naive" or "reference", as for ``na{rank}d_qk`` (the head dim
        that decides is ``D_v``; no "fused").

    Returns:
      ``{o}``.
    """


def _doc(template, rank):
    s = dict(_SHAPES[rank])
    ks = s["example_k"]
    s["example_w"] = ks ** rank if isinstance(ks, int) else 18
    s["w"] = s["q"].replace("D]", "prod(kernel_size)]")
    return template.format(rank=rank, **s)


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, return_lse=False, backend=None, q_tile_shape=None,
         kv_tile_shape=None, deterministic_backward=None, backward_q_tile_shape=None,
         backward_kv_tile_shape=None):
    return _na(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, return_lse, backend, q_tile_shape, kv_tile_shape, deterministic_backward,
               backward_q_tile_shape, backward_kv_tile_shape)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, return_lse=False, backend=None, q_tile_shape=None,
         kv_tile_shape=None, deterministic_backward=None, backward_q_tile_shape=None,
         backward_kv_tile_shape=None):
    return _na(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, return_lse, backend, q_tile_shape, kv_tile_shape, deterministic_backward,
               backward_q_tile_shape, backward_kv_tile_shape)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, return_lse=False, backend=None, q_tile_shape=None,
         kv_tile_shape=None, deterministic_backward=None, backward_q_tile_shape=None,
         backward_kv_tile_shape=None):
    return _na(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, return_lse, backend, q_tile_shape, kv_tile_shape, deterministic_backward,
               backward_q_tile_shape, backward_kv_tile_shape)


def na1d_qk(query, key, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, backend=None):
    return _na_qk(1, query, key, kernel_size, dilation, is_causal, rpb, scale, backend)


def na2d_qk(query, key, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, backend=None):
    return _na_qk(2, query, key, kernel_size, dilation, is_causal, rpb, scale, backend)


def na3d_qk(query, key, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None, backend=None):
    return _na_qk(3, query, key, kernel_size, dilation, is_causal, rpb, scale, backend)


def na1d_av(weights, value, kernel_size, dilation=1, is_causal=False, backend=None):
    return _na_av(1, weights, value, kernel_size, dilation, is_causal, backend)


def na2d_av(weights, value, kernel_size, dilation=1, is_causal=False, backend=None):
    return _na_av(2, weights, value, kernel_size, dilation, is_causal, backend)


def na3d_av(weights, value, kernel_size, dilation=1, is_causal=False, backend=None):
    return _na_av(3, weights, value, kernel_size, dilation, is_causal, backend)


def fused_tile_configs(rank: int, dtype="bfloat16", head_dim: int = 128, backward: bool = False,
                       deterministic_backward: bool | None = None) -> dict[str, list]:
    """The fused kernels' compiled tile configurations, the values ``q_tile_shape`` /
    ``kv_tile_shape`` (``backward_q_tile_shape`` / ``backward_kv_tile_shape`` with ``backward``) of
    ``na{rank}d`` may take, per kernel set.

    Args:
      rank: 1, 2 or 3.
      dtype: the inputs' dtype (float16, bfloat16 or float32).
      head_dim: the head dim (``max(D, D_v)``; padded as each kernel set pads it: to 32, 64, 128 or
        256 on the portable set (float32: 64 or 128), to 64 or 128 on the Hopper one).
      backward: False: the forward's; True: the backward's (its dK/dV kernel's query and key tiles).
      deterministic_backward: with ``backward``, the configurations of that mode of ``na{rank}d``
        (False: the Hopper set's non-deterministic kernel takes twice the keys per CTA; None: the
        mode ``na{rank}d`` takes by default at this dtype and head dim).

    Returns:
      ``{"fused_sm80": [(q_tile_shape, kv_tile_shape), ...], "fused_sm90": [...]}``, the default
      first in each list (the portable kernels and the Hopper ones; a set without kernels for the
      dtype and head dim has an empty list). Whether this machine can run a set:
      ``jax_na.available_backends()``.

    Example:
      >>> import jax_na
      >>> jax_na.fused_tile_configs(2)["fused_sm80"][0]
      ((16, 8), (8, 8))
      >>> jax_na.fused_tile_configs(2, backward=True)["fused_sm80"][0]
      ((4, 8), (8, 8))
      >>> jax_na.fused_tile_configs(1, backward=True, deterministic_backward=False)["fused_sm90"]
      [((64,), (128,))]
    """
    if rank not in (1, 2, 3):
        raise ValueError(f"rank must be 1, 2 or 3, got {rank!r}")
    if not any(jnp.dtype(dtype) == jnp.dtype(d) for d in _checks.FLOAT_DTYPES):
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
    if not isinstance(backward, (bool, np.bool_)):
        raise ValueError(f"backward must be True or False, got {backward!r}")
    backward = bool(backward)
    # checked whatever the direction; None resolves at this dtype and head dim, as na{rank}d's does
    deterministic = _checks.deterministic_arg(deterministic_backward, dtype,
                                              head_dim if isinstance(head_dim, int) else None)
    out = {}
    for backend, kernel_set in (("fused_sm80", "sm80"), ("fused_sm90", "sm90")):
        P = _checks.fused_head_dim(head_dim, head_dim, dtype, backend) if isinstance(head_dim, int) else None
        if P is None and backend == "fused_sm80":
            raise ValueError(f"head_dim must be an int in 1..{_checks.fused_head_dims(dtype)[-1]} for "
                             f"{jnp.dtype(dtype).name}, got {head_dim!r}")
        if backward:
            configs = _checks.fused_bwd_tile_configs(kernel_set, dtype, P, rank, deterministic) if P else ()
        else:
            configs = _checks.fused_fwd_tile_configs(kernel_set, dtype, P, rank) if P else ()
        out[backend] = list(configs)
    return out


for _rank, (_f, _fqk, _fav) in {1: (na1d, na1d_qk, na1d_av), 2: (na2d, na2d_qk, na2d_av),
                                3: (na3d, na3d_qk, na3d_av)}.items():
    _f.__doc__ = _doc(_NA_DOC, _rank)
    _fqk.__doc__ = _doc(_QK_DOC, _rank)
    _fav.__doc__ = _doc(_AV_DOC, _rank)
del _rank, _f, _fqk, _fav
