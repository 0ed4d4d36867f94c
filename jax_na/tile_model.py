"""How many (query, key) pairs the fused kernels compute for a problem and a tile configuration.

A fused kernel computes whole tiles: every (query, key) pair of each (query block, key block) it
visits, masking the pairs outside the windows. This module counts the blocks the kernels visit,
following their schedules (cuda/fused/tile_scheduler.cuh) over the one window geometry
(jax_na.geometry):

- Query-stationary kernels (forward, backward dQ): a CTA owns a Q tile, walks the K/V tiles of the
  box ``[window_start(first query), window_end(last query))`` per axis (tiled from the box origin),
  and each of its MMA units (a warp of 16 or 32 queries in the portable kernels, a warpgroup of 64
  on Hopper) skips the tiles that none of its queries' windows meet.
- The key-stationary dK/dV kernel: a CTA owns a K/V tile and walks every Q tile of its inverse
  neighbourhood (the queries that see any of its keys), from the first such query per axis; in the
  portable kernels each of its MMA units (a warp of 16 keys: consecutive rows of the K/V tile, a
  sub-box of it) skips the products of the Q tiles none of its own keys meet. A Hopper dK/dV CTA
  is one warpgroup and takes every Q tile of its walk (per-warpgroup skips, when its CTAs had two,
  measured slower: cuda/fused/NOTES.md, session 31); with dQ added by that kernel, its dQ product runs on every Q tile of the walk.

Both walks are products of one walk per axis, so the counts are products of per-axis sums (summed
over the dK/dV kernel's units, whose boxes differ). A
Hopper warpgroup's four warps form a grid of boxes and neighbouring queries' windows overlap (stride
<= kernel size), so the tiles any of its warps meets are those that meet the bounding box of its
queries' windows: the counts are exact (tests/test_tile_model.py walks the schedules literally).

The useful pairs over the computed ones bound the fraction of ideal (BENCHMARKS.md) a kernel can
reach; the fused tile choosers (jax_na._checks) take the configuration that computes the fewest
(counting the dK/dV kernel's whole CTA walk, not its units' skips: ``backward_work``).

Example:
  >>> from jax_na import tile_model
  >>> axes = tile_model.problem_axes((128, 128), (31, 31))
  >>> round(tile_model.useful_pairs(axes) / tile_model.query_stationary_pairs(axes, (16, 8), (8, 8), (16, 8)), 2)
  0.57
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from jax_na import geometry

__all__ = ["AxisGroup", "problem_axes", "useful_pairs", "query_stationary_pairs", "key_stationary_pairs",
           "hopper_unit", "portable_unit", "mma_unit", "dq_unit", "dkdv_units", "backward_work", "forward_work"]

# Queries per MMA unit: a portable warp's 16 rows (its sub-box of the Q tile: 16, 2x8, 1x4x4; WarpBox
# in tile_shapes.cuh) or 32 (two MMA atoms, axis 0 doubled: the forward's configurations at 16-bit
# head dim 128 but 2-D 8x16, jax_na._checks.portable_fwd_warp_rows), and a Hopper warpgroup's 64
# (half the Q tile along axis 0).
PORTABLE_WARP_BOX = {1: (16,), 2: (2, 8), 3: (1, 4, 4)}
# MMA units of the dK/dV kernel that skip on their own (each owning K/V tile rows): 4 portable warps;
# Hopper's warpgroups do not skip (Sm90Gemm::kUnitSkips), so one unit: the CTA's walk.
DKDV_UNITS = {"sm80": 4, "sm90": 1}


@dataclasses.dataclass(frozen=True)
class AxisGroup:
    """One dilation group of one axis: its length and every query position's window [start, end)."""

    length: int
    start: np.ndarray
    end: np.ndarray


@functools.lru_cache(maxsize=512)
def _axis(L: int, k: int, s: int, d: int, causal: bool) -> tuple[AxisGroup, ...]:
    out = []
    for g in range(d):
        Lg = int(geometry.group_length(L, d, g))
        start, end = geometry.window_bounds(np.arange(Lg), Lg, k, s, causal)
        out.append(AxisGroup(Lg, start, end))
    return tuple(out)


def problem_axes(spatial: Sequence[int], kernel_size: Sequence[int], stride=None, dilation=None,
                 is_causal=None) -> tuple[tuple[AxisGroup, ...], ...]:
    """Per axis, its dilation groups (normalized window parameters, one entry per axis)."""
    r = len(spatial)
    stride = stride or (1,) * r
    dilation = dilation or (1,) * r
    is_causal = is_causal or (False,) * r
    return tuple(_axis(int(L), int(k), int(s), int(d), bool(c))
                 for L, k, s, d, c in zip(spatial, kernel_size, stride, dilation, is_causal))


def useful_pairs(axes) -> int:
    """(query, key) pairs inside the windows, per batch item and head."""
    return math.prod(sum(int(np.sum(g.end - g.start)) for g in groups) for groups in axes)


def _unit_tiles(g: AxisGroup, q_extent: int, unit_extent: int, kv_extent: int, halves: bool = False) -> int:
    """K/V tiles met by the units of every Q tile on one axis (summed over tiles and units); with
    ``halves``, the halves of those tiles (``kv_extent / 2`` positions each) that the units meet: a
    unit's window box leaves the first half of its first tile or the second half of its last one
    unmet where it starts or ends inside the other half."""
    Lg = g.length
    q0 = np.arange(0, Lg, q_extent)
    qlo = q0
    qhi = np.minimum(q0 + q_extent, Lg) - 1
    lo = g.start[qlo]
    total = 0
    for u in range(q_extent // unit_extent):
        ulo = q0 + u * unit_extent
        live = ulo < Lg
        ulo_c = np.minimum(ulo, Lg - 1)
        uhi = np.maximum(np.minimum(ulo + unit_extent, Lg) - 1, ulo_c)
        n_box = -((g.end[qhi] - lo) // -kv_extent)
        first = (g.start[ulo_c] - lo) // kv_extent
        last = np.minimum(-((g.end[uhi] - lo) // -kv_extent), n_box) - 1
        met = last - first + 1
        if halves:
            assert kv_extent % 2 == 0, kv_extent
            half = kv_extent // 2
            met = 2 * met - (g.start[ulo_c] - lo - first * kv_extent >= half) - (g.end[uhi] - lo - last * kv_extent <= half)
        total += int(np.sum(np.where(live, met, 0)))
    return total


def query_stationary_pairs(axes, q_tile, unit_box, kv_tile, half_tiles: bool = False) -> int:
    """Pairs a query-stationary kernel computes (per batch item and head): Q tiles ``q_tile``, whose
    MMA units of ``unit_box`` queries skip the K/V tiles (``kv_tile``) none of their windows meet.
    ``half_tiles``: a unit whose windows meet only one half of a tile along axis 0 computes that half
    alone (the forward kernels' experiment knobs; see forward_work)."""
    tiles = math.prod(sum(_unit_tiles(g, qe, ue, ke, half_tiles and a == 0) for g in groups)
                      for a, (groups, qe, ue, ke) in enumerate(zip(axes, q_tile, unit_box, kv_tile)))
    return tiles * math.prod(unit_box) * math.prod(kv_tile) // (2 if half_tiles else 1)


def _inverse_tiles(g: AxisGroup, q_extent: int, kv_extent: int, sub: tuple[int, int] | None = None) -> int:
    """Q tiles walked by the K/V tiles of one axis (summed over the K/V tiles); with ``sub`` =
    (first, count), only those the keys [k0 + first, k0 + first + count) of each K/V tile meet (the
    walk still tiled from the first query of the whole K/V tile)."""
    k0 = np.arange(0, g.length, kv_extent)
    k1 = np.minimum(k0 + kv_extent, g.length) - 1
    begin = np.searchsorted(g.end, k0, side="right")    # first query whose window ends past k0
    end = np.searchsorted(g.start, k1, side="right")    # first query whose window starts past k1
    if sub is None:
        return int(np.sum(-(np.maximum(end - begin, 0) // -q_extent)))
    j0 = k0 + sub[0]
    j1 = np.minimum(j0 + sub[1], g.length) - 1
    live = j0 <= j1
    j0c, j1c = np.minimum(j0, g.length - 1), np.maximum(np.minimum(j1, g.length - 1), 0)
    ub = np.searchsorted(g.end, j0c, side="right")
    ue = np.searchsorted(g.start, j1c, side="right")
    first = (ub - begin) // q_extent
    last = -((ue - begin) // -q_extent) - 1
    return int(np.sum(np.where(live & (ue > ub), last - first + 1, 0)))


def _unit_boxes(kv_tile, units: int) -> list[tuple[tuple[int, int], ...]]:
    """Per unit, (first, count) per axis: unit u owns rows [u n, (u + 1) n) of the row-major K/V box,
    n = size / units, an aligned power-of-two run: one interval of coordinates per axis."""
    size = math.prod(kv_tile)
    n = size // units
    assert n * units == size and n & (n - 1) == 0, (kv_tile, units)  # aligned power-of-two runs
    strides = [math.prod(kv_tile[a + 1:]) for a in range(len(kv_tile))]

    def coord(i, a):
        return (i // strides[a]) % kv_tile[a]
    return [tuple((coord(u * n, a), coord(u * n + n - 1, a) - coord(u * n, a) + 1) for a in range(len(kv_tile)))
            for u in range(units)]


def key_stationary_pairs(axes, q_tile, kv_tile, units: int = 1) -> int:
    """Pairs the key-stationary dK/dV kernel computes (per batch item and head) when each of its
    ``units`` MMA units (consecutive K/V tile rows) skips the Q tiles its keys do not meet; ``units``
    = 1: the CTA's whole walk."""
    if units == 1:
        steps = math.prod(sum(_inverse_tiles(g, qe, ke) for g in groups)
                          for groups, qe, ke in zip(axes, q_tile, kv_tile))
        return steps * math.prod(q_tile) * math.prod(kv_tile)
    steps = sum(math.prod(sum(_inverse_tiles(g, qe, ke, sub) for g in groups)
                          for groups, qe, ke, sub in zip(axes, q_tile, kv_tile, box))
                for box in _unit_boxes(kv_tile, units))
    return steps * math.prod(q_tile) * (math.prod(kv_tile) // units)


def hopper_unit(q_tile) -> tuple:
    """A Hopper consumer warpgroup's box: half the Q tile along axis 0."""
    return (q_tile[0] // 2, *q_tile[1:])


def portable_unit(q_tile, rows: int = 16) -> tuple:
    """A portable warp's box of ``rows`` (16 or 32) queries."""
    if rows not in (16, 32):
        raise ValueError(f"rows must be 16 or 32, got {rows!r}")
    box = PORTABLE_WARP_BOX[len(q_tile)]
    return (box[0] * rows // 16, *box[1:])


def mma_unit(kernel_set: str, q_tile, warp_rows: int = 16) -> tuple:
    """The box of queries that skips K/V tiles together in kernel set "sm90" or "sm80" (whose warps
    take ``warp_rows`` queries each)."""
    return hopper_unit(q_tile) if kernel_set == "sm90" else portable_unit(q_tile, warp_rows)


def forward_work(axes, kernel_set: str, q_tile, kv_tile, half_tiles: bool = False, idle_weight: float = 0.0,
                 warp_rows: int = 16):
    """Pairs the forward computes (one matrix product each way: S and P V). ``half_tiles``: the
    kernels compute both products over the halves of query_stationary_pairs' ``half_tiles`` (the
    portable 16-bit kernels at head dims up to 128, K/V tiles of two or more rows along axis 0).
    ``idle_weight``: also count the pairs of the tiles a CTA walks that its units skip (they wait for
    the others at the step's barrier), at this weight (an int count when 0, else a float).
    ``warp_rows``: queries per portable warp (16 or 32; ignored on "sm90")."""
    unit = mma_unit(kernel_set, q_tile, warp_rows)
    if not half_tiles or kv_tile[0] < 2:
        work = query_stationary_pairs(axes, q_tile, unit, kv_tile)
    else:
        work = query_stationary_pairs(axes, q_tile, unit, kv_tile, half_tiles=True)
    if not idle_weight:
        return work
    walked = query_stationary_pairs(axes, q_tile, q_tile, kv_tile)  # every unit through every tile walked
    return work + idle_weight * max(walked - work, 0)


def dq_unit(kernel_set: str, q_tile) -> tuple:
    """The box of queries of the backward's dQ kernel that skips K/V tiles together: a Hopper CTA's
    lone warpgroup (its whole Q tile of 64 queries), a portable warp's 16 queries."""
    return tuple(q_tile) if kernel_set == "sm90" else portable_unit(q_tile)


def dkdv_units(kernel_set: str) -> int:
    """MMA units of the dK/dV kernel of ``kernel_set`` each skipping the Q tiles its keys miss (1: none
    skips, the CTA's walk)."""
    return DKDV_UNITS[kernel_set]


def backward_work(axes, kernel_set: str, q_tile, kv_tile, dq_q_tile, dq_kv_tile, deterministic: bool = True,
                  unit_skips: bool = False) -> int:
    """Pair-products of the backward: the dK/dV kernel's four (S, dP, dV, dK) per pair it computes and
    the dQ kernel's three (S, dP, dQ); without determinism on Hopper, the dK/dV kernel's five (dQ
    added by it: its dQ product on every pair of the CTA's walk) and no dQ kernel. ``unit_skips``:
    count the dK/dV pairs its MMA units compute (each skipping the Q tiles its keys miss) rather than
    the CTA's whole walk (the same on Hopper, whose units do not skip). The tile choosers count the
    walk: a unit that skips waits at the CTA's barrier for the others, so its skipped pairs save only
    the tensor cores and issue slots it leaves to them (on Hopper a lone warpgroup's step took 81-84%
    of a pair's; the portable warps' skips are not timed yet)."""
    cta = key_stationary_pairs(axes, q_tile, kv_tile)
    dkdv = key_stationary_pairs(axes, q_tile, kv_tile, dkdv_units(kernel_set)) if unit_skips else cta
    if kernel_set == "sm90" and not deterministic:
        return 4 * dkdv + cta
    return 4 * dkdv + 3 * query_stationary_pairs(axes, dq_q_tile, dq_unit(kernel_set, dq_q_tile), dq_kv_tile)
