"""Window geometry of neighborhood attention: the one Python implementation.

This mirrors ``cuda/geometry/window.cuh`` exactly (see SEMANTICS.md in the docs). Everything works on
one axis at a time; the mask of a multi-dimensional problem is the AND over axes.

On an axis of length ``L`` with dilation ``d``, token ``i`` lives in group ``g = i % d`` at position
``p = i // d``. A query attends to the keys of its own group whose positions lie in
``[start(p), end(p))``. Both bounds are non-decreasing in ``p``, so the keys of a query are a
contiguous range of positions, and so are the queries that see a given key.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

__all__ = ["AxisGeometry", "axis_geometry", "neighborhood", "group_length"]


def group_length(length: int, dilation: int, group: np.ndarray | int) -> np.ndarray | int:
    """Number of tokens of dilation group ``group`` on an axis of ``length`` tokens."""
    return length // dilation + 1 - ((group + (dilation - length % dilation)) // dilation)


def window_bounds(pos, group_len, kernel_size: int, stride: int, is_causal: bool):
    """Window ``[start, end)`` (group positions) of the queries at positions ``pos``.

    ``pos`` and ``group_len`` are integer arrays (broadcastable); returns two int64 arrays.
    """
    pos = np.asarray(pos, dtype=np.int64)
    group_len = np.asarray(group_len, dtype=np.int64)
    k, s = kernel_size, stride
    if is_causal:
        leader = np.minimum((pos // s) * s + s - 1, group_len - 1)
        start = np.maximum(leader - (k - 1), 0)
        end = np.minimum(pos + 1, group_len)
    else:
        wl = k // 2
        wr = k // 2 + (k % 2) - 1
        leader = np.minimum((pos // s) * s + s // 2, group_len - 1)
        start = np.maximum(leader - wl, 0) + (leader + wr >= group_len) * (group_len - wr - leader - 1)
        end = start + k
    return start.astype(np.int64), end.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class AxisGeometry:
    """Per-query tables of one axis, in *group-major* order.

    Group-major order lists group 0's tokens, then group 1's, ...; in that order every query's keys
    form one contiguous range ``[key_begin, key_end)`` and dilation disappears.

    Attributes:
      perm: ``[L]`` token index at each group-major slot (``x_gm = x[perm]``).
      inv_perm: ``[L]`` inverse permutation.
      key_begin, key_end: ``[L]`` key range (group-major slots) of the query at each slot.
      window_start: ``[L]`` the window start of the query at each slot, as a group-major slot; the
        window entry index of key slot ``j`` is ``j - window_start`` (always in ``[0, k)``).
    """

    length: int
    kernel_size: int
    stride: int
    dilation: int
    is_causal: bool
    perm: np.ndarray
    inv_perm: np.ndarray
    key_begin: np.ndarray
    key_end: np.ndarray
    window_start: np.ndarray


@functools.lru_cache(maxsize=256)
def axis_geometry(length: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                  is_causal: bool = False) -> AxisGeometry:
    """Geometry tables of one axis (cached; all arguments are Python scalars)."""
    idx = np.arange(length, dtype=np.int64)
    group = idx % dilation
    pos = idx // dilation
    glen = group_length(length, dilation, group)
    start, end = window_bounds(pos, glen, kernel_size, stride, is_causal)
    # Group-major slot of token i: tokens of earlier groups, then its position.
    group_offset = np.array([sum(group_length(length, dilation, h) for h in range(g))
                             for g in range(dilation)], dtype=np.int64)
    slot = group_offset[group] + pos
    perm = np.empty(length, np.int64)
    perm[slot] = idx
    kb = np.empty(length, np.int64)
    ke = np.empty(length, np.int64)
    ws = np.empty(length, np.int64)
    kb[slot] = group_offset[group] + start
    ke[slot] = group_offset[group] + end
    ws[slot] = group_offset[group] + start
    for a in (perm, slot, kb, ke, ws):
        a.setflags(write=False)
    return AxisGeometry(length, kernel_size, stride, dilation, bool(is_causal), perm, slot, kb, ke, ws)


def neighborhood(length: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 is_causal: bool = False) -> list[list[int]]:
    """Key indices (sorted) attended by each query index of one axis.

    Example:
      >>> neighborhood(7, 3)[0], neighborhood(7, 3)[3]
      ([0, 1, 2], [2, 3, 4])
    """
    geo = axis_geometry(length, kernel_size, stride, dilation, is_causal)
    out = []
    for i in range(length):
        slot = geo.inv_perm[i]
        out.append(sorted(int(geo.perm[j]) for j in range(geo.key_begin[slot], geo.key_end[slot])))
    return out
