"""Argument normalization and validation: the one place every public entry point goes through.

Every invalid call raises ``ValueError`` or ``TypeError`` naming the argument, the axis and the
allowed values, before anything is traced into a kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from jax_na import _ext, tile_model

# Backends the library knows.
KNOWN_BACKENDS = ("fused", "fused_sm80", "fused_sm90", "gemm", "reference", "naive")
# The fused family: "fused" runs the Hopper kernels on compute capability 9.0 GPUs where they are
# faster and the portable ones elsewhere; "fused_sm80" / "fused_sm90" pin one set, forward and
# backward (to compare them, or to rule one out). Value: the FFI targets' ``arch`` attribute.
FUSED_BACKENDS = {"fused": 0, "fused_sm80": 80, "fused_sm90": 90}
# Backends with the unfused na*d_qk / na*d_av ops (the fused kernels have no unfused twin). "gemm"
# has nothing else: its na1d/na2d/na3d run qk -> float32 softmax -> av on these ops.
UNFUSED_BACKENDS = ("reference", "naive", "gemm")
FLOAT_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
# What each backend accepts: dtypes (head dims: see FUSED_HEAD_DIMS for "fused"; the others take any).
# float32 on the fused kernels: the portable set, 3xTF32 (float32 accuracy); the Hopper set is 16-bit only.
BACKEND_DTYPES = {
    "fused": FLOAT_DTYPES,
    "fused_sm80": FLOAT_DTYPES,
    "fused_sm90": (jnp.float16, jnp.bfloat16),
    "gemm": FLOAT_DTYPES,
    "reference": FLOAT_DTYPES + (jnp.float64,),
    "naive": FLOAT_DTYPES,
}
# Head dims the fused kernels are instantiated for (they need D == D_v): FUSED_HEAD_DIMS in float16/
# bfloat16 (32 and 256 on the portable set only: 256 computes its output columns in two passes of
# 128), FUSED_HEAD_DIMS_NARROW in float32 (tiles of 256 float32 columns exceed the shared memory; no
# 32: float32, the accuracy path, runs head dims up to 32 padded to 64, which keeps two of the
# build's slowest units out), HOPPER_HEAD_DIMS on the Hopper set. Smaller head dims run zero-padded
# to the next one (see fused_head_dim); larger ones are not supported. So backend "fused" runs 16-bit
# head dims up to 32 on the portable kernels unpadded, and "fused_sm90" pads them to 64 for its
# Hopper kernels.
FUSED_HEAD_DIMS = (32, 64, 128, 256)
FUSED_HEAD_DIMS_NARROW = (64, 128)
HOPPER_HEAD_DIMS = (64, 128)
# Head dims the gemm (tensor-core) kernels are instantiated for (float16, bfloat16, and float32 at
# float32 accuracy through 3xTF32): the head dim an unfused op contracts or produces (D for qk, D_v
# for av) runs zero-padded to the next one up to 128. The gemm targets take larger head dims too and
# run them on the naive kernels inside them.
GEMM_HEAD_DIMS = (64, 128)
# The fused forward's compiled tile configurations, (q_tile_shape, kv_tile_shape) per kernel set
# ("sm80": the portable kernels, "sm90": the Hopper ones) and rank, the default first. "narrow":
# float16/bfloat16 at head dims 64 and 128; "narrow32": the same at head dim 32 (portable only), with
# 64-query tiles (4 warps) appended in 1-D and 2-D for small windows; "wide": float32 and head dim
# 256 (32-key tiles; portable only). Mirrors cuda/fused/tile_shapes.cuh (tests/test_tiles.py checks
# the extension agrees).
_PORTABLE_NARROW_FWD = {1: (((128,), (64,)),),
                        2: (((16, 8), (8, 8)), ((8, 16), (8, 8))),
                        3: (((4, 4, 8), (2, 8, 4)), ((2, 8, 8), (4, 4, 4)))}
FUSED_FWD_TILES = {
    ("sm80", "narrow"): _PORTABLE_NARROW_FWD,
    ("sm80", "narrow32"): {1: _PORTABLE_NARROW_FWD[1] + (((64,), (64,)),),
                           2: _PORTABLE_NARROW_FWD[2] + (((8, 8), (8, 8)),),
                           3: _PORTABLE_NARROW_FWD[3]},
    ("sm80", "wide"): {1: (((128,), (32,)),),
                       2: (((16, 8), (4, 8)),),
                       3: (((2, 8, 8), (2, 4, 4)),)},
    ("sm90", "narrow"): {1: (((128,), (128,)),),
                         2: (((16, 8), (16, 8)), ((8, 16), (8, 16))),
                         3: (((4, 4, 8), (2, 8, 8)), ((2, 8, 8), (2, 8, 8)), ((4, 4, 8), (2, 8, 4)),
                             ((8, 4, 4), (1, 8, 16)), ((4, 4, 8), (2, 16, 4)), ((8, 2, 8), (1, 8, 16)))},
}
# The fused backward's compiled tile configurations: (backward_q_tile_shape, backward_kv_tile_shape)
# of its key-stationary dK/dV kernel (the queries it takes per step, the keys a CTA owns; each
# configuration also sets the dQ kernel's tiles) per kernel set and rank, the default first.
# Portable: 64 keys per CTA, 32 queries per step at head dims over 64 (any dtype), 64 at head dims
# 32 and 64; float32 has the default only (fused_bwd_tile_configs; PortableBwdTiles); Hopper
# (float16/bfloat16, head dims 64 and 128): 64 keys per CTA (one warpgroup, two CTAs per SM), 64
# queries per step: the portable head-dim-64 shapes. deterministic_backward=False on Hopper runs one
# warp-specialized kernel with CTAs of twice the keys: FUSED_BWD_TILES_NONDETERMINISTIC.
# Mirrors BwdTileConfigs in cuda/fused/tile_shapes.cuh (tests/test_bwd_tiles.py checks the extension
# agrees).
FUSED_BWD_TILES = {
    ("sm80", 32): {1: (((32,), (64,)),),
                   2: (((4, 8), (8, 8)), ((2, 16), (4, 16))),
                   3: (((2, 4, 4), (4, 4, 4)), ((1, 4, 8), (1, 8, 8)))},
    ("sm80", 64): {1: (((64,), (64,)),),
                   2: (((8, 8), (8, 8)), ((4, 16), (4, 16))),
                   3: (((4, 4, 4), (4, 4, 4)), ((2, 4, 8), (1, 8, 8)))},
    ("sm90", 64): {1: (((64,), (64,)),),
                   2: (((8, 8), (8, 8)), ((4, 16), (4, 16))),
                   3: (((4, 4, 4), (4, 4, 4)), ((2, 4, 8), (1, 8, 8)))},
}
# The Hopper backward's non-deterministic mode (one warp-specialized kernel adds dK, dV and dQ; no dQ
# kernel): 128 keys per CTA (two consumer warpgroups), 64 queries per step; configurations 0 and 1 are
# FUSED_BWD_TILES[("sm90", 64)]'s with twice their keys, 3-D adds 1x8x8 queries over 2x8x8 keys
# (lines of 8 queries: fewer steps where the window is 13 long on the last axes, p3 6400 against
# 7200). Mirrors HopperBwdWsTiles in cuda/fused/tile_shapes.cuh.
FUSED_BWD_TILES_NONDETERMINISTIC = {
    "sm90": {1: (((64,), (128,)),),
             2: (((8, 8), (16, 8)), ((4, 16), (8, 16))),
             3: (((4, 4, 4), (4, 4, 8)), ((2, 4, 8), (2, 8, 8)), ((1, 8, 8), (2, 8, 8)))},
}
# The dQ kernel's tiles in each backward configuration ((Q tile, K/V tile) of the query-stationary
# kernel, in FUSED_BWD_TILES' order; the same for both portable step sizes), per kernel set and
# queries per dQ CTA (fused_bwd_dq_tiles: portable 128, 64 at head dim 32; Hopper 64 on one
# warpgroup): read by the backward's chooser. Mirrors BwdTiles::DqTiles in
# cuda/fused/tile_shapes.cuh (tests/test_bwd_tiles.py).
FUSED_BWD_DQ_TILES = {
    ("sm80", 128): {1: (((128,), (32,)),),
                    2: (((16, 8), (4, 8)), ((8, 16), (2, 16))),
                    3: (((4, 4, 8), (2, 4, 4)), ((2, 8, 8), (1, 4, 8)))},
    ("sm80", 64): {1: (((64,), (32,)),),
                   2: (((8, 8), (4, 8)), ((4, 16), (2, 16))),
                   3: (((2, 4, 8), (2, 4, 4)), ((1, 8, 8), (1, 4, 8)))},
    ("sm90", 64): {1: (((64,), (64,)),),
                   2: (((8, 8), (8, 8)), ((4, 16), (4, 16))),
                   3: (((2, 4, 8), (2, 8, 4)), ((1, 8, 8), (4, 4, 4)))},
}


def fused_bwd_dq_tiles(kernel_set: str, head_dim: int, rank: int) -> tuple:
    """The dQ kernel's (Q tile, K/V tile) per backward configuration of kernel set "sm80" or "sm90" at
    a padded head dim: portable CTAs take 128 queries (64 at head dim 32: kPortableDqBlockMFor in
    tile_shapes.cuh), Hopper ones 64."""
    queries = 64 if kernel_set == "sm90" or head_dim <= 32 else 128
    return FUSED_BWD_DQ_TILES[(kernel_set, queries)].get(rank, ())
_KERNEL_SET_NAMES = {"sm80": "portable (fused_sm80)", "sm90": "Hopper (fused_sm90)"}
# Grid limits of the fused kernels: query heads (and batch, which the lowering splits into chunks
# of at most this size, so any batch works).
FUSED_MAX_HEADS = 65535
FUSED_MAX_BATCH = 65535


def backend_family(backend: str) -> str:
    """The kernel family of a backend name: "fused" for every FUSED_BACKENDS name, else itself."""
    return "fused" if backend in FUSED_BACKENDS else backend


def fused_head_dims(dtype, backend: str = "fused") -> tuple[int, ...]:
    """The head dims the kernels of a fused backend are instantiated for in ``dtype``."""
    if backend == "fused_sm90":
        return HOPPER_HEAD_DIMS
    return FUSED_HEAD_DIMS_NARROW if jnp.dtype(dtype) == jnp.dtype(jnp.float32) else FUSED_HEAD_DIMS


def fused_head_dim(D: int, Dv: int, dtype, backend: str = "fused", arch: int = 0) -> int | None:
    """The head dim P the fused kernels run a call with head dims (D, D_v) at: q/k are zero-padded
    from D to P and v from D_v to P (zero columns change no score and add only zero output columns).
    None when max(D, D_v) exceeds the largest head dim instantiated for ``dtype`` and ``backend``.
    ``arch`` 90: the call's tiles pinned the Hopper kernels (FusedTiles.arch), which pad as
    "fused_sm90" does (head dims up to 32 to 64: they have no 32)."""
    if D < 1 or Dv < 1:
        return None
    dims = fused_head_dims(dtype, "fused_sm90" if arch == 90 else backend)
    return next((p for p in dims if max(D, Dv) <= p), None)


def gemm_head_dim(dtype, d: int) -> int:
    """The head dim the gemm targets run an unfused op whose contracted/output head dim is ``d`` at:
    for ``d <= 128`` the next of GEMM_HEAD_DIMS (the tensor-core kernels; zero
    columns change no score and add only zero output columns), else ``d`` itself (unpadded)."""
    if gemm_tensor_cores(dtype, d):
        return next(p for p in GEMM_HEAD_DIMS if d <= p)
    return d


def gemm_tensor_cores(dtype, d: int) -> bool:
    """Whether the gemm targets run an op of this dtype and head dim (padded) on their tensor-core
    kernels rather than on the naive kernels inside them."""
    taken = any(jnp.dtype(dtype) == jnp.dtype(t) for t in (jnp.float16, jnp.bfloat16, jnp.float32))
    return taken and 1 <= d <= GEMM_HEAD_DIMS[-1]


def fused_supports(dtype, D: int, Dv: int, H: int) -> bool:
    """Whether the fused kernels take a call (batch size aside: it is split into chunks). Every
    scale runs (a scale <= 0 through an exact rewrite of q: primitives._fused_impl)."""
    return (any(jnp.dtype(dtype) == jnp.dtype(d) for d in BACKEND_DTYPES["fused"])
            and fused_head_dim(D, Dv, dtype) is not None and 1 <= H <= FUSED_MAX_HEADS)


def fused_fwd_tile_configs(kernel_set: str, dtype, head_dim: int, rank: int) -> tuple:
    """The compiled forward tile configurations ((q_tile_shape, kv_tile_shape), ...) of kernel set
    "sm80" (portable) or "sm90" (Hopper) for a dtype and a padded head dim (32, 64, 128 or 256), the
    default first; () where that set has no kernel for them."""
    if kernel_set == "sm90" and head_dim not in HOPPER_HEAD_DIMS:
        return ()
    kind = ("narrow32" if kernel_set == "sm80" and head_dim <= 32 else "narrow") if _narrow(dtype, head_dim) else "wide"
    return FUSED_FWD_TILES.get((kernel_set, kind), {}).get(rank, ())


def _narrow(dtype, head_dim: int) -> bool:
    """16-bit rows at head dims up to 128: the forward's 64-key tiles (portable) with alternatives,
    one pass of output columns; float32 and head dim 256 are "wide" (kernel_traits.cuh: kDPasses)."""
    return jnp.dtype(dtype).itemsize == 2 and head_dim <= 128


# Queries per warp of the portable forward's configurations (FUSED_FWD_TILES' order) at 16-bit head
# dims 65..128: 32 (two MMA atoms, 4-warp CTAs), except 2-D 8x16, whose windows (short on the first
# axis) meet fewer K/V tiles with 16-row warps' 2x8 boxes; 16 everywhere else. Mirrors
# kPortableFwdWarpRows / PortableFwdTiles in cuda/fused/tile_shapes.cuh (tests/test_tiles.py checks
# the extension's warp boxes).
_PORTABLE_FWD_WARP_ROWS_128 = {1: (32,), 2: (32, 16), 3: (32, 32)}


def portable_fwd_warp_rows(dtype, head_dim: int, rank: int) -> tuple[int, ...]:
    """Queries per warp (16 or 32) of each portable forward configuration at this dtype and padded
    head dim, in fused_fwd_tile_configs' order."""
    n = len(fused_fwd_tile_configs("sm80", dtype, head_dim, rank))
    rows = _PORTABLE_FWD_WARP_ROWS_128.get(rank, ()) if _narrow(dtype, head_dim) and head_dim > 64 else (16,) * n
    assert len(rows) == n, (rows, n)  # one per configuration
    return rows


def portable_half_tiles(dtype, head_dim: int) -> bool:
    """Whether the portable forward at this dtype and padded head dim computes over half K/V tiles
    where a warp's windows meet one half (its narrow kernels: kernel_traits.cuh, WithHalfTiles)."""
    return _narrow(dtype, head_dim)


def fused_bwd_tile_configs(kernel_set: str, dtype, head_dim: int, rank: int, deterministic: bool = True) -> tuple:
    """The compiled backward tile configurations ((backward_q_tile_shape, backward_kv_tile_shape),
    ...) of kernel set "sm80" or "sm90" for a dtype and a padded head dim, the default first (float32:
    the default only); () where that set has no kernel for them. ``deterministic`` False: the
    Hopper set's non-deterministic kernel's (FUSED_BWD_TILES_NONDETERMINISTIC; the portable set has
    one mode)."""
    if kernel_set == "sm90" and (jnp.dtype(dtype).itemsize != 2 or head_dim not in HOPPER_HEAD_DIMS):
        return ()
    if kernel_set == "sm90" and not deterministic:
        return FUSED_BWD_TILES_NONDETERMINISTIC["sm90"].get(rank, ())
    queries = 64 if kernel_set == "sm90" or head_dim <= 64 else 32
    configs = FUSED_BWD_TILES.get((kernel_set, queries), {}).get(rank, ())
    return configs[:1] if jnp.dtype(dtype) == jnp.dtype(jnp.float32) else configs


@dataclasses.dataclass(frozen=True)
class FusedTiles:
    """A tile choice for the fused kernels in one direction: the ``arch`` attribute of the FFI call (0 auto,
    80 or 90 when only that kernel set has the shapes asked for) and the configuration index in each
    set (-1: that set has none with those shapes and must not run)."""

    arch: int
    sm80: int
    sm90: int


@dataclasses.dataclass(frozen=True)
class NAParams:
    """Normalized, hashable window parameters (one entry per spatial axis)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    scale: float
    # The unfused QK op's scores in float32 whatever the input dtype (na*d on the "gemm" backend: the
    # softmax then sees the scores as the fused kernels do); False: in the input dtype (na*d_qk).
    scores_f32: bool = False
    # The fused forward's tile configuration (q_tile_shape / kv_tile_shape); None: the default. Only
    # the fused kernels read it.
    fwd_tiles: FusedTiles | None = None
    # The fused backward's (backward_q_tile_shape / backward_kv_tile_shape); None: the default.
    bwd_tiles: FusedTiles | None = None
    # False lets the fused backward add dQ in its warp-specialized Hopper kernel where it runs those
    # (fused_bwd_adds_dq; na*d's deterministic_backward). Only the fused kernels read it.
    deterministic: bool = True

    @property
    def rank(self) -> int:
        return len(self.kernel_size)

    @property
    def window_size(self) -> int:
        return math.prod(self.kernel_size)


def scores_dtype(dtype, params: NAParams):
    """The unfused QK op's result dtype: the input's, or float32 for 16-bit inputs when
    ``params.scores_f32``."""
    return jnp.dtype(jnp.float32) if params.scores_f32 and jnp.dtype(dtype).itemsize == 2 else jnp.dtype(dtype)


def _dtype_name(dt) -> str:
    return jnp.dtype(dt).name


def _per_axis(name: str, value: Any, rank: int) -> tuple:
    """An int/bool or a sequence of one entry per spatial axis -> tuple of length ``rank``."""
    if isinstance(value, (list, tuple)):
        if len(value) != rank:
            raise ValueError(f"{name} must be a single value or a tuple of {rank} (one per spatial axis), "
                             f"got {len(value)} entries: {tuple(value)!r}")
        return tuple(value)
    return (value,) * rank


def _int_per_axis(name: str, value: Any, rank: int) -> tuple[int, ...]:
    vals = _per_axis(name, value, rank)
    out = []
    for axis, v in enumerate(vals):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be a Python int per spatial axis; axis {axis} got {v!r} "
                            f"of type {type(v).__name__}")
        out.append(int(v))
    return tuple(out)


def _bool_per_axis(name: str, value: Any, rank: int) -> tuple[bool, ...]:
    vals = _per_axis(name, value, rank)
    out = []
    for axis, v in enumerate(vals):
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool per spatial axis; axis {axis} got {v!r} "
                            f"of type {type(v).__name__}")
        out.append(bool(v))
    return tuple(out)


def window_params(rank: int, spatial: Sequence[int], kernel_size, stride=1, dilation=1,
                  is_causal=False, scale=None, head_dim: int | None = None) -> NAParams:
    """Normalize and check the window parameters against the spatial shape."""
    ks = _int_per_axis("kernel_size", kernel_size, rank)
    st = _int_per_axis("stride", stride, rank)
    dl = _int_per_axis("dilation", dilation, rank)
    ca = _bool_per_axis("is_causal", is_causal, rank)
    for axis, (L, k, s, d) in enumerate(zip(spatial, ks, st, dl)):
        if k < 2:
            raise ValueError(f"kernel_size must be >= 2 on every axis; axis {axis} got {k}")
        if d < 1:
            raise ValueError(f"dilation must be >= 1 on every axis; axis {axis} got {d}")
        if k * d > L:
            fixes = [f"kernel_size <= {L // d} with this dilation" if L >= d else None,
                     f"dilation <= {L // k} with this kernel_size" if L >= k else None]
            allowed = " or ".join(f for f in fixes if f) or f"kernel_size * dilation <= {L}"
            raise ValueError(f"kernel_size * dilation must be <= the axis length; axis {axis} has length "
                             f"{L}, kernel_size {k}, dilation {d} (allowed: {allowed})")
        if not 1 <= s <= k:
            raise ValueError(f"stride must be in [1, kernel_size] on every axis; axis {axis} got "
                             f"stride {s} with kernel_size {k} (allowed: 1..{k})")
    if scale is None:
        if head_dim is None:
            raise ValueError("scale is required when the head dim is unknown")
        scale = float(head_dim) ** -0.5
    elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a Python float (a static value) or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return NAParams(ks, st, dl, ca, scale)


def _check_array(name: str, x, ndim: int, layout: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim} with layout {layout}, got shape {tuple(x.shape)}")
    if not any(jnp.dtype(x.dtype) == jnp.dtype(d) for d in FLOAT_DTYPES + (jnp.float64,)):
        raise TypeError(f"{name} must be float32, float16, bfloat16 (or float64 on the reference backend), "
                        f"got {_dtype_name(x.dtype)}")


def _layout(rank: int, heads: str, dim: str) -> str:
    axes = ", ".join("XYZ"[:rank])
    return f"[B, {axes}, {heads}, {dim}]"


def _supporting(dtype) -> list[str]:
    return [b for b, ds in BACKEND_DTYPES.items() if any(jnp.dtype(dtype) == jnp.dtype(d) for d in ds)]


def resolve_backend(backend: str | None, dtype, what: str = "na", query=None, value=None) -> str:
    """Check the backend name; returns "auto" or a concrete backend usable here for ``dtype``.

    ``what`` is "na" (na1d/na2d/na3d, whose ``query``/``value`` then give the head dims for the
    fused kernels' limits) or the name of an unfused op ("na2d_qk", ...), which only the
    UNFUSED_BACKENDS implement. What the call asks for is checked before what this installation
    has, so a call that no installation could run says so everywhere."""
    if backend is None or backend == "auto":
        return "auto"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"backend must be one of None, 'auto', "
                         f"{', '.join(repr(b) for b in KNOWN_BACKENDS)}; got {backend!r}")
    if what != "na" and backend not in UNFUSED_BACKENDS:
        raise ValueError(f"backend {backend!r} has no unfused kernels: {what} supports backend None, "
                         f"'auto', {', '.join(repr(b) for b in UNFUSED_BACKENDS)} (the fused kernels "
                         f"compute the whole attention; use na{what[2]}d for them)")
    allowed = BACKEND_DTYPES[backend]
    if not any(jnp.dtype(dtype) == jnp.dtype(d) for d in allowed):
        raise TypeError(f"backend {backend!r} does not support dtype {_dtype_name(dtype)} of the inputs "
                        f"(allowed: {', '.join(_dtype_name(d) for d in allowed)}); backends that "
                        f"support {_dtype_name(dtype)}: {_supporting(dtype)}")
    if backend in FUSED_BACKENDS and query is not None:
        _check_fused(query, value, backend)
    if backend != "reference" and not _ext.has_cuda_kernels():
        raise ValueError(f"backend {backend!r} needs jax_na's CUDA kernels, which this installation "
                         f"does not have (built without nvcc); available: {_ext.available_backends()}")
    if backend in FUSED_BACKENDS and not _ext.has_fused_kernels():
        raise ValueError(f"backend {backend!r} needs jax_na's fused CUDA kernels, which this installation "
                         "does not have (built without the CUTLASS headers: pip install nvidia-cutlass, then "
                         f"reinstall jax_na); available: {_ext.available_backends()}")
    if backend == "gemm" and not _ext.has_gemm_kernels():
        raise ValueError("backend 'gemm' needs jax_na's gemm (tensor-core) CUDA kernels, which this "
                         "installation does not have (built without the CUTLASS headers, or before the gemm "
                         "kernels existed: pip install nvidia-cutlass, then reinstall jax_na); available: "
                         f"{_ext.available_backends()}")
    if backend == "fused_sm90" and not _ext.has_hopper_kernels():
        raise ValueError("backend 'fused_sm90' needs a compute capability 9.0 GPU (H100/H200) and a build "
                         "with 90a in JAX_NA_CUDA_ARCHS (this one: "
                         f"{_ext.cuda_archs() or 'none'}); available: {_ext.available_backends()}")
    return backend


def _check_fused(query, value, backend="fused"):
    """Limits of the fused kernels, checked for an explicit fused backend."""
    B, *_, H, D = query.shape
    Dv = value.shape[-1]
    if fused_head_dim(D, Dv, query.dtype, backend) is None:
        dims = fused_head_dims(query.dtype, backend)
        others = [b for b in ("fused", "fused_sm80") if b != backend and fused_head_dim(D, Dv, query.dtype, b)]
        raise ValueError(f"backend {backend!r} supports head dims up to {dims[-1]} in {_dtype_name(query.dtype)} "
                         f"(query/key head dim D and value head dim D_v; allowed: 1..{dims[-1]}, run zero-padded "
                         f"to {' or '.join(map(str, dims))}), got D={D}, D_v={Dv}; backends that support "
                         f"these head dims: {others + ['gemm', 'reference', 'naive']}")
    if H > FUSED_MAX_HEADS:
        raise ValueError(f"backend {backend!r} supports at most {FUSED_MAX_HEADS} query heads (allowed: "
                         f"1..{FUSED_MAX_HEADS}), query has H={H}; backends that support it: "
                         f"['gemm', 'reference', 'naive']")


def fused_bwd_adds_dq(dtype, P: int, window_size: int, backend: str, tiles: FusedTiles | None = None) -> bool:
    """Whether a non-deterministic fused backward at padded head dim ``P`` runs the Hopper kernels,
    whose warp-specialized dK/dV/dQ kernel then adds dQ into a float32 workspace of ``P + 8`` floats per
    query row (primitives.DQ_ACCUM_PAD; the mirror of dispatch.cu's use_hopper for the backward; where the two disagree the
    kernels stay correct: an unused workspace, or the deterministic Hopper backward). ``tiles``: the
    call's backward tile choice (a configuration only the portable set has runs that set)."""
    arch = tiles.arch if tiles is not None else FUSED_BACKENDS.get(backend, 0)  # 0: auto ("auto", "fused")
    if tiles is not None and tiles.sm90 < 0:
        return False
    if arch == 80 or not _ext.has_hopper_kernels() or jnp.dtype(dtype).itemsize != 2 or P not in HOPPER_HEAD_DIMS:
        return False
    return arch == 90 or P == 128 or window_size >= 256


# XLA's own switches for deterministic GPU ops. XLA requires determinism when either is set (each
# flag's last occurrence in XLA_FLAGS counts, as in XLA's parser).
XLA_DETERMINISM_FLAGS = ("--xla_gpu_deterministic_ops", "--xla_gpu_exclude_nondeterministic_ops")


def xla_requests_determinism() -> bool:
    """Whether ``XLA_FLAGS`` asks XLA for deterministic GPU ops (``--xla_gpu_deterministic_ops=true``
    or ``--xla_gpu_exclude_nondeterministic_ops=true``, read when a call is traced): the default
    ``deterministic_backward`` then follows it, as XLA's own scatter and convolution algorithms do."""
    on = dict.fromkeys(XLA_DETERMINISM_FLAGS, False)
    for flag in os.environ.get("XLA_FLAGS", "").split():
        name, eq, value = flag.partition("=")
        if name in on:
            on[name] = not eq or value.lower() in ("true", "1")
    return any(on.values())


# Padded head dims at which the default backward is the non-deterministic one: there the Hopper
# warp-specialized dK/dV/dQ kernel takes less time than the deterministic dQ + dK/dV kernels (H100,
# bf16, backward alone; cuda/fused/NOTES.md): at 128 4-32% less (forward+backward through JAX 4-26%
# less; sessions 45-46), at 64 11-22% less since its dQ reductions go by runs of tokens (p11 2.77 vs
# 3.34 ms, p1 2.24 vs 2.88, p2 1.03 vs 1.27, p3 2.24 vs 2.50; session 47; 5-9% more before).
NONDETERMINISTIC_DEFAULT_HEAD_DIMS = (64, 128)


def deterministic_arg(value, dtype=None, head_dim: int | None = None, head_dim_v: int | None = None) -> bool:
    """``deterministic_backward`` checked: a bool, or None for the default: deterministic when
    ``XLA_FLAGS`` asks XLA for deterministic ops (:func:`xla_requests_determinism`) or where the
    Hopper backward would run at a padded head dim outside ``NONDETERMINISTIC_DEFAULT_HEAD_DIMS``
    (``dtype``, ``head_dim`` and ``head_dim_v``: the call's; without a head dim: False, the mode of
    head dim 128)."""
    if value is None:
        if xla_requests_determinism():
            return True
        if head_dim is None:
            return False
        if dtype is not None and jnp.dtype(dtype).itemsize != 2:
            return True  # no Hopper kernel: the portable kernels have one (deterministic) mode
        P = fused_head_dim(head_dim, head_dim if head_dim_v is None else head_dim_v, dtype, "fused_sm90")
        return P not in NONDETERMINISTIC_DEFAULT_HEAD_DIMS
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"deterministic_backward must be True, False or None (the default: non-deterministic "
                         f"at 16-bit head dims up to 128 unless XLA_FLAGS sets --xla_gpu_deterministic_ops or "
                         f"--xla_gpu_exclude_nondeterministic_ops), got {value!r}")
    return bool(value)


def _tile_shape(name: str, value, rank: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if rank == 1 and isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        value = (value,)
    if not isinstance(value, (tuple, list)) or len(value) != rank or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v > 0 for v in value):
        raise ValueError(f"{name} must be None or a tuple of {rank} positive ints (one extent per spatial "
                         f"axis), got {value!r}")
    return tuple(int(v) for v in value)


# The tile choosers for calls that give no tile shapes: per kernel set, the configuration whose tile
# walk computes the fewest (query, key) pairs for the call's problem (jax_na.tile_model; the first
# on ties, configuration 0 being the default). The forward compares the configurations with as many
# keys per K/V tile as its default only: a smaller tile costs more per key outside the matrix
# products than the pairs it saves (Hopper 3-D, 2x8x4 keys against 2x8x8: 2.5% fewer pairs on p8,
# 24% slower). The model's choices match what was measured (H200, bf16, D = 128; ms, the chosen
# configuration first; cuda/fused/NOTES.md sessions 20, 22, 24, 27):
# - forward, 2-D 7x31 window over 64x256: 8x16 Q tiles, Hopper 0.348 vs 0.462, portable 0.571 vs
#   0.617; square windows (p2, p6): the default. The portable set counts its half tiles
#   (portable_half_tiles), which on p8 picks 2x8x8 / 4x4x4: 105.0 vs 108.8 (H100, session 36).
# - backward (fwd+bwd), Hopper one-warpgroup CTAs (H100, session 33; see BWD_CHOICE_MARGIN): p2
#   default 2.34 vs 2.56, p3 default 4.44 vs 4.48, p10 default 3.77 vs 3.88, p8 default 235.6 vs
#   248.1, p9 default 149.5 vs 152.8, 3x13x13 over 16x32x32 flat 2.61 vs 3.16. Portable (H100): p3
#   flat 8.04 vs 8.48, p10 flat 6.81 vs 7.12, p9 flat 298.7 vs 307.9, p2 default 4.73 vs 4.82, p8
#   default 423 vs 452, 3x13x13 flat 4.07 vs 5.18.
# What a portable warp's step through a K/V tile it skips costs (it waits at the step's barrier for
# the warps that compute), as a fraction of computing the tile, where it shows: at head dim 32 a
# tile's products are short beside a step's barrier and loads. Fitted to the 64- against 128-query
# tiles (H100, bf16, D = 32; the fits ranged 0.1-0.5): with 0.25 the chooser takes 64 queries on p4
# (0.262 vs 0.292 ms), p5 (0.055 vs 0.080), 13x13 on 56x56, p2's and 1-D k255 windows, and keeps 128
# in 3-D (p3's window: 0.630 vs 0.659 for 4x4x4 queries, a tile set not compiled). Not measured at
# larger head dims, where the products dominate: 0 there.
PORTABLE_IDLE_WEIGHT = 0.25
# What a pair costs on the portable forward's warps of 16 and 32 queries, relative to 16 (the 32-row
# warps read each K/V fragment once for two MMA atoms). Measured per pair (H100, bf16, D = 128,
# session 40): 0.78-0.86 on problems of long windows (p1, p2, p3, p6-p10), 0.96-1.0 on 7x31 over
# 64x256 (short walks); 0.9 keeps the measured choices: p2's 16x8 on 32-row warps (0.92 ms against
# 1.06 for 8x16 on 16-row ones), 7x31's 8x16 on 16-row warps (1.80 against 2.14).
PORTABLE_WARP_PAIR_COST = {16: 1.0, 32: 0.9}


def _least_work(configs, work, eligible=lambda c: True, margin: float = 0.0, base: int = 0) -> int:
    """Index of the eligible configuration with the least work (the first of equals; ``base`` when
    fewer than two are eligible). An alternative must do less than ``1 - margin`` of the work of
    configuration ``base`` (0, the default, unless BWD_CHOICE_BASE names another), when eligible,
    to replace it."""
    if sum(bool(eligible(c)) for c in configs) < 2:
        return base
    costs = [work(*c) if eligible(c) else math.inf for c in configs]
    best = costs.index(min(costs))
    return base if costs[base] < math.inf and costs[best] >= (1.0 - margin) * costs[base] else best


# Per kernel set, the fraction of the default's pair-products a backward alternative must save to
# replace it: a flat configuration costs more per product (smaller boxes along the first axis, more
# steps). Hopper's one-warpgroup CTAs (H100, forward+backward, session 33): the flat 3-D tiles save
# 0.5% on p3, 0.4% on p10 and 5.3% on p9 but ran 0.9%, 2.7% and 2.2% slower (4.48 vs 4.44 ms, 3.88
# vs 3.77, 152.8 vs 149.5); saving 28.5% (3x13x13 over 16x32x32) they ran 18% faster (2.61 vs 3.16).
# Portable: saving 6-10% (p3, p10, p9) the flat tiles ran 3-6% faster.
BWD_CHOICE_MARGIN = {"sm80": 0.02, "sm90": 0.08}
# (kernel set, deterministic, rank): the configuration the alternatives are measured against where it
# is not configuration 0 (the kernels' default). Hopper's non-deterministic 3-D kernel runs faster
# per pair on its flat tiles (2x4x8 queries, 2x8x8 keys: 8 runs of consecutive tokens per Q tile, so
# 8 dQ reductions per step against 16 for 4x4x4): H100, bf16, backward alone (standalone, session
# 47), flat against the default, ms: D = 128 p3 3.02 vs 3.31 (the same pairs), p8 138.2 vs 149.5
# (4.6% fewer pairs, inside the margin), p9 84.2 vs 101.2, p10 2.16 vs 2.61; D = 64 p3 2.10 vs 2.23.
BWD_CHOICE_BASE = {("sm90", False, 3): 1}


@functools.lru_cache(maxsize=1024)
def _chosen_fwd_tiles(rank: int, dtype, P: int, fam: str, spatial: tuple, window: tuple) -> FusedTiles | None:
    """The forward chooser's FusedTiles for a call without tile shapes on fused backend ``fam`` at
    padded head dim ``P`` over ``spatial`` (``window``: kernel_size, stride, dilation, is_causal,
    normalized), or None for the defaults."""
    axes = lambda: tile_model.problem_axes(spatial, *window)  # per-axis arrays, cached; built only on a choice
    index = []
    for ks in ("sm80", "sm90"):
        configs = fused_fwd_tile_configs(ks, dtype, P, rank)
        keys = math.prod(configs[0][1]) if configs else 0
        half = ks == "sm80" and portable_half_tiles(dtype, P)
        idle = PORTABLE_IDLE_WEIGHT if ks == "sm80" and P <= 32 else 0.0
        rows = portable_fwd_warp_rows(dtype, P, rank) if ks == "sm80" else (16,) * len(configs)
        index.append(_least_work([(*c, r) for c, r in zip(configs, rows)],
                                 lambda q, kv, r: PORTABLE_WARP_PAIR_COST[r] * tile_model.forward_work(
                                     axes(), ks, q, kv, half, idle, r),
                                 lambda c: math.prod(c[1]) == keys))
    return FusedTiles(FUSED_BACKENDS[fam], *index) if any(index) else None


def bwd_choice_base(kernel_set: str, deterministic: bool, rank: int, n_configs: int) -> int:
    """The backward configuration of ``kernel_set`` that a call without backward tile shapes runs
    unless an alternative saves BWD_CHOICE_MARGIN of its pair-products (BWD_CHOICE_BASE; 0 where it
    names none or the set has fewer configurations)."""
    base = BWD_CHOICE_BASE.get((kernel_set, bool(deterministic), rank), 0)
    return base if base < n_configs else 0


@functools.lru_cache(maxsize=1024)
def _chosen_bwd_tiles(rank: int, dtype, P: int, fam: str, spatial: tuple, window: tuple,
                      deterministic: bool = True) -> FusedTiles | None:
    """The backward chooser's FusedTiles for a call without backward tile shapes (as
    _chosen_fwd_tiles; ``deterministic``: without it the Hopper dK/dV kernel adds dQ itself), or None
    for the defaults."""
    axes = lambda: tile_model.problem_axes(spatial, *window)
    index = []
    for ks in ("sm80", "sm90"):
        configs = fused_bwd_tile_configs(ks, dtype, P, rank, deterministic)
        # (the non-deterministic Hopper kernel runs no dQ kernel: its configurations have no dQ tiles)
        dq = fused_bwd_dq_tiles(ks, P, rank) if deterministic or ks != "sm90" else ()
        index.append(_least_work(
            [(q, kv, *(dq[i] if i < len(dq) else (None, None))) for i, (q, kv) in enumerate(configs)],
            lambda q, kv, dq_q, dq_kv: tile_model.backward_work(axes(), ks, q, kv, dq_q, dq_kv, deterministic),
            margin=BWD_CHOICE_MARGIN[ks], base=bwd_choice_base(ks, deterministic, rank, len(configs))))
    return FusedTiles(FUSED_BACKENDS[fam], *index) if any(index) else None


def fwd_tiles_args(rank: int, query, value, backend: str, q_tile_shape, kv_tile_shape,
                   window=None) -> FusedTiles | None:
    """Validate a call's q_tile_shape / kv_tile_shape (either may be None) against the fused forward's
    configurations (FUSED_FWD_TILES) for its dtype, head dim, rank and backend. Returns the
    FusedTiles the fused kernels run with, or None for the defaults. A shape given alone picks the
    first configuration that has it; none picks by the chooser above (``window``: the call's
    normalized (kernel_size, stride, dilation, is_causal); None: the defaults)."""
    return _tiles_args("forward", "", fused_fwd_tile_configs, rank, query, value, backend, q_tile_shape,
                       kv_tile_shape, lambda dtype, P, fam: None if window is None else _chosen_fwd_tiles(
                           rank, dtype, P, fam, tuple(query.shape[1:-2]), window))


def bwd_tiles_args(rank: int, query, value, backend: str, q_tile_shape, kv_tile_shape,
                   window=None, deterministic: bool = True) -> FusedTiles | None:
    """Validate a call's backward_q_tile_shape / backward_kv_tile_shape against the fused backward's
    compiled tile configurations (FUSED_BWD_TILES), as fwd_tiles_args (none given: the backward's
    chooser above, from the normalized ``window`` and ``deterministic_backward``); None: the defaults."""
    return _tiles_args("backward", "backward_",
                       lambda ks, dtype, P, r: fused_bwd_tile_configs(ks, dtype, P, r, deterministic), rank,
                       query, value, backend, q_tile_shape, kv_tile_shape,
                       lambda dtype, P, fam: None if window is None else _chosen_bwd_tiles(
                           rank, dtype, P, fam, tuple(query.shape[1:-2]), window, deterministic),
                       f" with deterministic_backward={deterministic}")


def _tiles_args(direction: str, prefix: str, configs_of, rank: int, query, value, backend: str, q_tile_shape,
                kv_tile_shape, chooser, mode_note: str = "") -> FusedTiles | None:
    """fwd_tiles_args / bwd_tiles_args: ``configs_of(kernel_set, dtype, P, rank)`` lists a set's
    configurations, ``chooser(dtype, P, fam)`` picks for a call that gives no shapes; the
    arguments are named ``{prefix}q_tile_shape`` / ``{prefix}kv_tile_shape``; ``mode_note`` goes into
    the error for shapes nothing compiled has (the backward's mode)."""
    q_name, kv_name = f"{prefix}q_tile_shape", f"{prefix}kv_tile_shape"
    q_shape = _tile_shape(q_name, q_tile_shape, rank)
    kv_shape = _tile_shape(kv_name, kv_tile_shape, rank)
    given = q_shape is not None or kv_shape is not None
    if backend != "auto" and backend not in FUSED_BACKENDS:
        if given:
            raise ValueError(f"{q_name} / {kv_name} choose the tiles of the fused kernels; backend "
                             f"{backend!r} has none (allowed backends with tile shapes: None, 'auto', "
                             f"{', '.join(repr(b) for b in FUSED_BACKENDS)})")
        return None
    dtype = query.dtype
    fam = "fused" if backend == "auto" else backend
    P = fused_head_dim(query.shape[-1], value.shape[-1], dtype, fam)
    if P is None:
        return None  # no fused kernel takes the call (auto then runs the reference; an explicit backend raised)
    if not given:
        return chooser(dtype, P, fam)
    sets = {"fused": ("sm80", "sm90"), "fused_sm80": ("sm80",), "fused_sm90": ("sm90",)}[fam]
    index, listing = {"sm80": -1, "sm90": -1}, []
    for ks in sets:
        # each set at its own padded head dim (the Hopper set has no 32: a configuration only it
        # has runs the call padded to 64, primitives._fused_impl)
        P_set = fused_head_dim(query.shape[-1], value.shape[-1], dtype, fam, FUSED_BACKENDS[f"fused_{ks}"])
        configs = configs_of(ks, dtype, P_set, rank) if P_set else ()
        if configs:
            listing.append(f"{_KERNEL_SET_NAMES[ks]}: {', '.join(f'{q} with {kv}' for q, kv in configs)}")
        index[ks] = next((i for i, (q, kv) in enumerate(configs)
                          if q_shape in (None, q) and kv_shape in (None, kv)), -1)
    sm80, sm90 = index["sm80"], index["sm90"]
    if sm80 < 0 and sm90 < 0:
        raise ValueError(f"no compiled fused {direction} tile configuration has {q_name}={q_shape}, "
                         f"{kv_name}={kv_shape} for {_dtype_name(dtype)} at head dim {P} in {rank}-D on "
                         f"backend {fam!r}{mode_note}; allowed ({q_name} with {kv_name}): {'; '.join(listing)}")
    arch = FUSED_BACKENDS[fam]
    if arch == 0 and (sm80 < 0) != (sm90 < 0):
        arch = 80 if sm90 < 0 else 90
    if arch == 90 and _ext.has_cuda_device() and not _ext.has_hopper_kernels():
        raise ValueError(f"{q_name}={q_shape}, {kv_name}={kv_shape} is a configuration of the Hopper "
                         f"kernels only, which need a compute capability 9.0 GPU and a build with 90a "
                         f"(this one: {_ext.cuda_archs() or 'none'}); allowed here: "
                         f"{listing[0] if listing else 'none'}")
    return FusedTiles(arch, sm80, sm90)


def attention_args(rank: int, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                   additional_keys, additional_values, backend, q_tile_shape=None, kv_tile_shape=None,
                   deterministic_backward=None, backward_q_tile_shape=None, backward_kv_tile_shape=None):
    """Validate a na{1,2,3}d call. Returns (NAParams, backend)."""
    _check_array("query", query, rank + 3, _layout(rank, "H", "D"))
    _check_array("key", key, rank + 3, _layout(rank, "H_kv", "D"))
    _check_array("value", value, rank + 3, _layout(rank, "H_kv", "D_v"))
    B, *spatial, H, D = query.shape
    if tuple(key.shape[:-2]) != (B, *spatial):
        raise ValueError(f"key must have the batch and spatial shape of query {(B, *spatial)}, "
                         f"got key shape {tuple(key.shape)}")
    Hkv = key.shape[-2]
    if key.shape[-1] != D:
        raise ValueError(f"key head dim must equal query head dim {D}, got key shape {tuple(key.shape)}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"key heads must divide query heads (grouped-query attention): query has {H} "
                         f"heads, key has {Hkv}; allowed key heads: "
                         f"{[h for h in range(1, H + 1) if H % h == 0]}")
    if tuple(value.shape[:-1]) != tuple(key.shape[:-1]):
        raise ValueError(f"value must have shape [B, *spatial, H_kv, D_v] = {(*key.shape[:-1], 'D_v')}, "
                         f"got {tuple(value.shape)}")
    for name, x in (("key", key), ("value", value)):
        if x.dtype != query.dtype:
            raise TypeError(f"{name} dtype {_dtype_name(x.dtype)} differs from query dtype "
                            f"{_dtype_name(query.dtype)}; all inputs must share one dtype")
    if (additional_keys is None) != (additional_values is None):
        missing = "additional_values" if additional_values is None else "additional_keys"
        raise ValueError(f"additional_keys and additional_values must be given together; {missing} is missing")
    if additional_keys is not None:
        _check_array("additional_keys", additional_keys, 4, "[B, N_add, H_kv, D]")
        _check_array("additional_values", additional_values, 4, "[B, N_add, H_kv, D_v]")
        Na = additional_keys.shape[1]
        if tuple(additional_keys.shape) != (B, Na, Hkv, D):
            raise ValueError(f"additional_keys must have shape [B, N_add, H_kv, D] = {(B, 'N_add', Hkv, D)}, "
                             f"got {tuple(additional_keys.shape)}")
        if tuple(additional_values.shape) != (B, Na, Hkv, value.shape[-1]):
            raise ValueError(f"additional_values must have shape [B, N_add, H_kv, D_v] = "
                             f"{(B, Na, Hkv, value.shape[-1])}, got {tuple(additional_values.shape)}")
        for name, x in (("additional_keys", additional_keys), ("additional_values", additional_values)):
            if x.dtype != query.dtype:
                raise TypeError(f"{name} dtype {_dtype_name(x.dtype)} differs from query dtype "
                                f"{_dtype_name(query.dtype)}")
    params = window_params(rank, spatial, kernel_size, stride, dilation, is_causal, scale, D)
    backend = resolve_backend(backend, query.dtype, "na", query, value)
    window = (params.kernel_size, params.stride, params.dilation, params.is_causal)
    deterministic = deterministic_arg(deterministic_backward, query.dtype, D, value.shape[-1])
    tiles = fwd_tiles_args(rank, query, value, backend, q_tile_shape, kv_tile_shape, window)
    try:
        bwd_tiles = bwd_tiles_args(rank, query, value, backend, backward_q_tile_shape, backward_kv_tile_shape,
                                   window, deterministic)
    except ValueError as e:
        # The default mode (None) with backward tile shapes only the deterministic mode has: that mode
        # runs them (a non-deterministic default never refuses the deterministic kernels' shapes);
        # shapes it refuses too keep the first error.
        if deterministic_backward is not None or deterministic:
            raise
        try:
            bwd_tiles = bwd_tiles_args(rank, query, value, backend, backward_q_tile_shape, backward_kv_tile_shape,
                                       window, True)
        except ValueError:
            raise e from None
        deterministic = True
    return dataclasses.replace(params, fwd_tiles=tiles, bwd_tiles=bwd_tiles, deterministic=deterministic), backend


def qk_args(rank: int, query, key, kernel_size, dilation, is_causal, rpb, scale, backend):
    """Validate a na{1,2,3}d_qk call. Returns (NAParams, backend)."""
    _check_array("query", query, rank + 3, _layout(rank, "H", "D"))
    _check_array("key", key, rank + 3, _layout(rank, "H_kv", "D"))
    B, *spatial, H, D = query.shape
    if tuple(key.shape[:-2]) != (B, *spatial) or key.shape[-1] != D:
        raise ValueError(f"key must have shape [B, *spatial, H_kv, D] with B, spatial and D of query "
                         f"{tuple(query.shape)}, got {tuple(key.shape)}")
    if H % key.shape[-2] != 0:
        raise ValueError(f"key heads must divide query heads: query has {H}, key has {key.shape[-2]}")
    if key.dtype != query.dtype:
        raise TypeError(f"key dtype {_dtype_name(key.dtype)} differs from query dtype {_dtype_name(query.dtype)}")
    params = window_params(rank, spatial, kernel_size, 1, dilation, is_causal, scale, D)
    if rpb is not None:
        want = (H, *(2 * k - 1 for k in params.kernel_size))
        if not hasattr(rpb, "shape") or tuple(rpb.shape) != want:
            raise ValueError(f"rpb must have shape [H, 2*k-1 per axis] = {want}, "
                             f"got {tuple(getattr(rpb, 'shape', ())) or type(rpb).__name__}")
        if rpb.dtype != query.dtype:
            raise TypeError(f"rpb dtype {_dtype_name(rpb.dtype)} differs from query dtype "
                            f"{_dtype_name(query.dtype)}")
    return params, resolve_backend(backend, query.dtype, f"na{rank}d_qk")


def av_args(rank: int, weights, value, kernel_size, dilation, is_causal, backend):
    """Validate a na{1,2,3}d_av call. Returns (NAParams, backend)."""
    _check_array("value", value, rank + 3, _layout(rank, "H_kv", "D_v"))
    _check_array("weights", weights, rank + 3, _layout(rank, "H", "prod(kernel_size)"))
    B, *spatial, Hkv, _ = value.shape
    params = window_params(rank, spatial, kernel_size, 1, dilation, is_causal, 1.0)
    H = weights.shape[-2]
    if tuple(weights.shape[:-2]) != (B, *spatial) or weights.shape[-1] != params.window_size:
        raise ValueError(f"weights must have shape [B, *spatial, H, prod(kernel_size)] = "
                         f"{(B, *spatial, 'H', params.window_size)}, got {tuple(weights.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"value heads must divide weights heads: weights have {H}, value has {Hkv}")
    if weights.dtype != value.dtype:
        raise TypeError(f"weights dtype {_dtype_name(weights.dtype)} differs from value dtype "
                        f"{_dtype_name(value.dtype)}")
    return params, resolve_backend(backend, value.dtype, f"na{rank}d_av")
