"""Pure-JAX reference backend: exact SEMANTICS.md on every platform, memory linear in the tokens.

How it stays small: every spatial axis is put in *group-major* order (dilation groups one after the
other, see ``geometry.AxisGeometry``), where each query's keys are one contiguous range. Queries are
cut into tiles; a tile attends to the bounding box of its queries' windows (a static size, a dynamic
offset), masked per axis. Tiles run in a ``lax.map`` whose body is rematerialized under autodiff, so
neither the forward nor the backward ever holds more than a few tiles' scores.

Softmax and accumulation run in float32 (float64 for float64 inputs); float32 matmuls use the
highest precision (no TF32).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_na._checks import NAParams, scores_dtype
from jax_na.geometry import AxisGeometry, axis_geometry

# Budget for the scores of one lax.map step (elements); keeps CPU memory in the tens of MiB.
_STEP_SCORE_ELEMENTS = 1 << 23


def _compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) in (jnp.float32, jnp.float64) else None


def _matmul(spec, a, b, cdt):
    """Half-precision operands go to the matrix units as they are, accumulating in float32 (as the
    kernels do); float32/float64 operands run at full precision (never TF32)."""
    if a.dtype == b.dtype and jnp.dtype(a.dtype).itemsize == 2:
        return jnp.einsum(spec, a, b, preferred_element_type=cdt)
    return jnp.einsum(spec, a.astype(cdt), b.astype(cdt), precision=_precision(cdt))


@dataclasses.dataclass(frozen=True)
class _AxisTiling:
    """Static tiling of one axis (group-major order)."""

    geo: AxisGeometry
    tile: int            # queries per tile
    num_tiles: int
    box: int             # keys per bounding box
    box_start: np.ndarray  # [num_tiles] first key slot of each tile's box
    key_begin: np.ndarray  # [num_tiles * tile] padded per-query tables
    key_end: np.ndarray
    window_start: np.ndarray
    query_slot: np.ndarray  # group-major slot of each (padded) query

    @property
    def padded(self) -> int:
        return self.num_tiles * self.tile


_TILE_TARGETS = {1: (128,), 2: (16, 16), 3: (4, 8, 8)}


@functools.lru_cache(maxsize=128)
def _tiling(length, kernel_size, stride, dilation, is_causal, tile) -> _AxisTiling:
    geo = axis_geometry(length, kernel_size, stride, dilation, is_causal)
    tile = max(1, min(tile, length))
    num_tiles = -(-length // tile)
    pad = num_tiles * tile - length

    def padded(a):  # padded queries repeat the last one; their outputs are cropped away
        return np.concatenate([a, np.full(pad, a[-1], a.dtype)])

    kb, ke, ws = padded(geo.key_begin), padded(geo.key_end), padded(geo.window_start)
    lo = kb.reshape(num_tiles, tile).min(axis=1)
    hi = ke.reshape(num_tiles, tile).max(axis=1)
    box = int((hi - lo).max())
    box_start = np.minimum(lo, length - box)
    qs = padded(np.arange(length, dtype=np.int64))
    return _AxisTiling(geo, tile, num_tiles, box, box_start, kb, ke, ws, qs)


def _tilings(spatial, params: NAParams, tile_shape=None):
    targets = tile_shape or _TILE_TARGETS[len(spatial)]
    return [
        _tiling(L, k, s, d, c, t)
        for L, k, s, d, c, t in zip(spatial, params.kernel_size, params.stride, params.dilation,
                                    params.is_causal, targets)
    ]


def _to_group_major(x, tilings, axis0=1):
    """Permute each spatial axis into group-major order and pad it to whole tiles."""
    for a, t in enumerate(tilings):
        ax = axis0 + a
        if t.geo.dilation > 1:
            x = jnp.take(x, jnp.asarray(t.geo.perm), axis=ax)
    return x


def _pad_queries(x, tilings, axis0=1):
    pads = [(0, 0)] * x.ndim
    for a, t in enumerate(tilings):
        pads[axis0 + a] = (0, t.padded - t.geo.length)
    return jnp.pad(x, pads) if any(p != (0, 0) for p in pads) else x


def _from_tiles(y, tilings, batch: int):
    """[num_tiles_total, B, T1*...*Tr, ...rest] -> [B, L1, ..., Lr, ...rest] in token order."""
    r = len(tilings)
    nts = [t.num_tiles for t in tilings]
    ts = [t.tile for t in tilings]
    rest = y.shape[3:]
    y = y.reshape(*nts, batch, *ts, *rest)
    # [nt1..ntr, B, T1..Tr, rest] -> [B, nt1, T1, ..., ntr, Tr, rest]
    perm = [r] + [i for a in range(r) for i in (a, r + 1 + a)] + list(range(2 * r + 1, y.ndim))
    y = y.transpose(perm).reshape(batch, *(n * t for n, t in zip(nts, ts)), *rest)
    y = y[(slice(None),) + tuple(slice(0, t.geo.length) for t in tilings)]
    for a, t in enumerate(tilings):
        if t.geo.dilation > 1:
            y = jnp.take(y, jnp.asarray(t.geo.inv_perm), axis=1 + a)
    return y


def _tile_index(tid, tilings):
    """Flat tile id -> per-axis tile indices (row-major)."""
    idx = []
    for t in reversed(tilings):
        idx.append(tid % t.num_tiles)
        tid = tid // t.num_tiles
    return idx[::-1]


def _window_mask(tix, tilings):
    """Per-axis [T_a, box_a] masks of the tile's queries against its box, ANDed: [Tq, box]."""
    mask = None
    boxes = []
    for ti, t in zip(tix, tilings):
        bs = jnp.asarray(t.box_start)[ti]
        keys = bs + jnp.arange(t.box)
        kb = lax.dynamic_slice(jnp.asarray(t.key_begin), (ti * t.tile,), (t.tile,))
        ke = lax.dynamic_slice(jnp.asarray(t.key_end), (ti * t.tile,), (t.tile,))
        m = (keys[None, :] >= kb[:, None]) & (keys[None, :] < ke[:, None])
        boxes.append(bs)
        if mask is None:
            mask = m
        else:
            a, b = mask.shape, m.shape
            mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(a[0] * b[0], a[1] * b[1])
    return mask, boxes


def _slice_tile(x, starts, sizes):
    """x[:, starts[0]:+sizes[0], ..., :, :] for a [B, *spatial, heads, dim] array."""
    return lax.dynamic_slice(x, (0, *starts, 0, 0), (x.shape[0], *sizes, *x.shape[-2:]))


def _tile_queries(tix, tilings):
    return [i * t.tile for i, t in zip(tix, tilings)], [t.tile for t in tilings]


def _lse_dtype(cdt):
    # float32 per SEMANTICS.md; float64 only when the whole computation is float64 (the oracle).
    return jnp.float64 if cdt == jnp.float64 else jnp.float32


def _map_tiles(body, num_tiles: int, step_elements: int):
    if step_elements == 0:  # an empty call (zero batch or heads): batching would reshape empty results by -1
        return lax.map(body, jnp.arange(num_tiles))
    batch = max(1, min(num_tiles, _STEP_SCORE_ELEMENTS // step_elements))
    return lax.map(body, jnp.arange(num_tiles), batch_size=batch)


def attention_forward(q, k, v, add_k, add_v, params: NAParams, tile_shape=None):
    """Neighborhood attention forward. Returns ``(out [B,*S,H,Dv] q.dtype, lse [B,*S,H] float32)``.

    ``add_k``/``add_v`` are ``[B, Na, Hkv, D/Dv]`` (``Na`` may be 0).
    """
    B, *spatial, H, D = q.shape
    Hkv, Dv = k.shape[-2], v.shape[-1]
    G = H // Hkv
    Na = add_k.shape[1]
    cdt = _compute_dtype(q.dtype)
    tilings = _tilings(spatial, params, tile_shape)
    Tq = math.prod(t.tile for t in tilings)
    box = math.prod(t.box for t in tilings)

    qg = _pad_queries(_to_group_major(q, tilings), tilings)
    # Keys/values are read by several tiles: upcast them outside the tile loop so that their
    # gradients accumulate across tiles in float32 (one rounding to the input dtype at the end).
    kg = _to_group_major(k, tilings).astype(cdt)
    vg = _to_group_major(v, tilings).astype(cdt)
    add_k, add_v = add_k.astype(cdt), add_v.astype(cdt)

    @jax.checkpoint
    def tile_fn(tid):
        tix = _tile_index(tid, tilings)
        mask, box_starts = _window_mask(tix, tilings)
        box_sizes = [t.box for t in tilings]
        qt = _slice_tile(qg, *_tile_queries(tix, tilings)).reshape(B, Tq, Hkv, G, D)
        kt = _slice_tile(kg, box_starts, box_sizes).reshape(B, box, Hkv, D)
        vt = _slice_tile(vg, box_starts, box_sizes).reshape(B, box, Hkv, Dv)
        # Back to the input dtype (exact) so half-precision operands reach the matrix units as such.
        keys = jnp.concatenate([kt, add_k], axis=1).astype(k.dtype)
        vals = jnp.concatenate([vt, add_v], axis=1).astype(v.dtype)
        full_mask = jnp.concatenate([mask, jnp.ones((Tq, Na), bool)], axis=1)
        s = _matmul("bqhgd,bkhd->bhgqk", qt, keys, cdt) * jnp.asarray(params.scale, cdt)
        s = jnp.where(full_mask, s, -jnp.inf)
        m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)  # [B, Hkv, G, Tq, 1]
        o = _matmul("bhgqk,bkhd->bqhgd", p.astype(q.dtype), vals, cdt) / jnp.transpose(l, (0, 3, 1, 2, 4))
        lse = jnp.transpose((m + jnp.log(l))[..., 0], (0, 3, 1, 2)).reshape(B, Tq, H)
        return o.reshape(B, Tq, H, Dv).astype(q.dtype), lse.astype(_lse_dtype(cdt))

    num_tiles = math.prod(t.num_tiles for t in tilings)
    o, lse = _map_tiles(tile_fn, num_tiles, B * H * Tq * (box + Na))
    return _from_tiles(o, tilings, B), _from_tiles(lse, tilings, B)


def _window_index(tix, tilings):
    """Per-axis window tables of a tile: box-local key index, validity, and rpb index.

    Each is a list over axes of ``[T_a, k_a]`` arrays.
    """
    local, valid, bias = [], [], []
    for ti, t in zip(tix, tilings):
        k = t.geo.kernel_size
        bs = jnp.asarray(t.box_start)[ti]
        rows = lambda a: lax.dynamic_slice(jnp.asarray(a), (ti * t.tile,), (t.tile,))[:, None]
        ws, ke, qs = rows(t.window_start), rows(t.key_end), rows(t.query_slot)
        w = jnp.arange(k)[None, :]
        local.append(jnp.clip(ws + w - bs, 0, t.box - 1))
        valid.append(ws + w < ke)
        # Slots of one group differ exactly as positions do, so this is key pos - query pos + k - 1.
        bias.append(jnp.clip(ws + w - qs + k - 1, 0, 2 * k - 2))
    return local, valid, bias


def _outer(arrays):
    """Index arrays [T_a, k_a] -> broadcastable to [T_1..T_r, k_1..k_r]."""
    r = len(arrays)
    out = []
    for a, x in enumerate(arrays):
        shape = [1] * (2 * r)
        shape[a], shape[r + a] = x.shape
        out.append(x.reshape(shape))
    return out


def _gather_window(x_box, local):
    """[B, box_1..box_r, Hkv, C] -> [B, T_1..T_r, k_1..k_r, Hkv, C] (each query's window)."""
    return x_box[(slice(None), *_outer(local))]


def _valid_window(valid):
    m = functools.reduce(jnp.logical_and, _outer(valid))
    return m.reshape(math.prod(m.shape[: len(valid)]), -1)  # [Tq, W]


def qk_forward(q, k, rpb, params: NAParams, tile_shape=None):
    """Unfused scores ``[B, *S, H, W]``: ``scale * q.k (+ rpb)``, ``-inf`` outside causal windows; in
    the input dtype, or float32 for 16-bit inputs when ``params.scores_f32``."""
    B, *spatial, H, D = q.shape
    Hkv = k.shape[-2]
    G = H // Hkv
    W = params.window_size
    cdt = _compute_dtype(q.dtype)
    tilings = _tilings(spatial, params, tile_shape)
    Tq = math.prod(t.tile for t in tilings)
    qg = _pad_queries(_to_group_major(q, tilings), tilings)
    kg = _to_group_major(k, tilings).astype(cdt)  # float32 gradient accumulation across tiles
    rpb = None if rpb is None else rpb.astype(cdt)

    @jax.checkpoint
    def tile_fn(tid):
        tix = _tile_index(tid, tilings)
        local, valid, bias = _window_index(tix, tilings)
        box_starts = [jnp.asarray(t.box_start)[i] for i, t in zip(tix, tilings)]
        qt = _slice_tile(qg, *_tile_queries(tix, tilings)).reshape(B, Tq, Hkv, G, D).astype(cdt)
        kt = _slice_tile(kg, box_starts, [t.box for t in tilings])
        kw = _gather_window(kt, local).reshape(B, Tq, W, Hkv, D).astype(cdt)
        s = jnp.einsum("bqhgd,bqwhd->bqhgw", qt, kw, precision=_precision(cdt)).reshape(B, Tq, H, W)
        s = s * jnp.asarray(params.scale, cdt)
        if rpb is not None:
            rb = rpb[(slice(None), *_outer(bias))]  # [H, T.., k..]
            s = s + jnp.moveaxis(rb.reshape(H, Tq, W), 0, 1)[None]
        s = jnp.where(_valid_window(valid)[None, :, None, :], s, -jnp.inf)
        return s.astype(scores_dtype(q.dtype, params))

    num_tiles = math.prod(t.num_tiles for t in tilings)
    out = _map_tiles(tile_fn, num_tiles, B * Tq * W * max(H, Hkv * D))
    return _from_tiles(out, tilings, B)


def av_forward(weights, v, params: NAParams, tile_shape=None):
    """Unfused ``out[q] = sum_w weights[q, w] * v[key(q, w)]``; masked entries are ignored."""
    B, *spatial, H, W = weights.shape
    Hkv, Dv = v.shape[-2:]
    G = H // Hkv
    cdt = _compute_dtype(v.dtype)
    tilings = _tilings(spatial, params, tile_shape)
    Tq = math.prod(t.tile for t in tilings)
    wg = _pad_queries(_to_group_major(weights, tilings), tilings)
    vg = _to_group_major(v, tilings).astype(cdt)  # float32 gradient accumulation across tiles

    @jax.checkpoint
    def tile_fn(tid):
        tix = _tile_index(tid, tilings)
        local, valid, _ = _window_index(tix, tilings)
        box_starts = [jnp.asarray(t.box_start)[i] for i, t in zip(tix, tilings)]
        a = _slice_tile(wg, *_tile_queries(tix, tilings)).reshape(B, Tq, H, W).astype(cdt)
        a = jnp.where(_valid_window(valid)[None, :, None, :], a, 0).reshape(B, Tq, Hkv, G, W)
        vt = _slice_tile(vg, box_starts, [t.box for t in tilings])
        vw = _gather_window(vt, local).reshape(B, Tq, W, Hkv, Dv).astype(cdt)
        o = jnp.einsum("bqhgw,bqwhd->bqhgd", a, vw, precision=_precision(cdt))
        return o.reshape(B, Tq, H, Dv).astype(v.dtype)

    num_tiles = math.prod(t.num_tiles for t in tilings)
    out = _map_tiles(tile_fn, num_tiles, B * Tq * W * Hkv * Dv)
    return _from_tiles(out, tilings, B)
