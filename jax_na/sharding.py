"""Multi-device partitioning of the jax_na primitives (``custom_partitioning`` with a Shardy rule).

Every primitive of ``primitives.py`` (fwd, bwd, qk, qk_bwd, av, av_bwd) lowers through
:func:`partitioned_lowering`: a ``jax.experimental.custom_partitioning`` function whose body binds the
primitive's per-device twin (``jax_na_fwd_local``, ...). The twin carries the platform lowerings (CUDA:
the FFI custom call; elsewhere: the reference), so both lowerings are partitioned the same way. Where
there is nothing to partition (one device, ``pmap``, inside a fully manual ``shard_map``) the twin is
inlined as it is.

How each logical axis is partitioned (every array's axes are labelled in ``_layouts``):

========================  =================================================================================
axis                      partitioning
========================  =================================================================================
batch ``B``               sharded as given, no communication (``add_k``/``add_v`` follow it). ``d_rpb``
                          of ``qk_bwd`` is a sum over the batch: the one collective is a ``psum`` of
                          ``d_rpb`` over the batch mesh axes.
leading ``V0, V1, ...``   the axes ``vmap`` adds in front of ``B`` of every operand and result
                          (:func:`leading_batch_axes`; in front of the bias too, which is per instance):
                          sharded as given like the batch, no communication. The per-device lowering
                          folds them into the batch (into the heads for qk/qk_bwd, so that ``d_rpb``
                          stays per instance: it is not summed over them).
heads ``H`` / ``H_kv``    sharded as given, no communication, when the query heads and the kv heads use
                          the same mesh axes (or only one of them is sharded) and both ``H`` and ``H_kv``
                          are divisible by the shard count, so every GQA group stays on one device. In the
                          Shardy rule the query heads are the compound factor ``(hk, g)`` of the kv heads
                          ``hk`` and the group size ``g``. ``rpb``/``d_rpb`` follow the heads. Otherwise
                          the heads are replicated (a one-time warning says so).
spatial ``X, Y, Z``       every primitive: sharded spatial axes (one, two or three) stay sharded and are
                          partitioned with halo exchanges (below), uneven shards too (below). An axis
                          that cannot be -- the mesh axes of batch/heads, or a multi-hop halo that
                          would bring in more than all the other shards hold -- is gathered on its own
                          (the others keep their halos): the partition requests it unsharded, XLA
                          all-gathers it before the op and slices the result back (a one-time warning
                          per reason says so).
``D``, ``D_v``, window,   always replicated (gathered if they arrive sharded).
``N_add``, bias window
========================  =================================================================================

The output of every op keeps the sharding of its inputs on leading, batch, heads and halo-exchanged
spatial axes; with leading/batch/head sharding the compiled program has no all-gather (checked by
tests/test_sharding.py).

Halo exchange (``halo_widths``, ``_halo_plan``, ``_halo_ops``), per sharded spatial axis (windows are
products of per-axis windows, so the axes are independent). The window of a query depends on the
global axis only through the clamping at its borders, the stride-group leaders and the dilation groups.
So the local op, unchanged (same kernels, same params), run on an extended slab ``[start - left,
end + right)`` of the global axis as if that were the whole axis, gives the slab's queries exactly their
global windows for the right ``(left, right)``. ``halo_widths`` finds, per shard and on the host, the
smallest such halo by brute force with the window functions of geometry.py (O(L) numpy per candidate;
cached). A halo may be wider than a shard (a window wider than a shard): it then comes from
``ceil(width / shard)`` neighbours per side (multi-hop). Each device then:

- receives the last ``max(left)`` key/value tokens before its shard and the first ``max(right)`` after
  it: one ``lax.ppermute`` per hop and side, the k-th moving each device's whole shard (the farthest
  hop: only the part needed) k devices along the axis (the border devices get zeros they never read),
  concatenated in axis order; one sharded axis after the other, so a later exchange carries the
  earlier ones' halos (the corners). A multi-hop exchange whose halos (``max(left) + max(right)``) exceed
  what all the other shards hold is not done: an all-gather moves no more, in one collective;
- runs the local op on the extended slab of its own halo: the interior shards share one ``(left,
  right)``, the border shards (and the short last one of an uneven axis) have their own, and
  ``lax.switch`` on ``lax.axis_index`` picks among these few static shapes. The halo queries are zeros
  and their results are dropped;
- backward: the halo queries also get zero output cotangents (``d_out``, ``d_lse``), so they add nothing
  to dK/dV (their owners compute them); the halo parts of dK/dV go back to their owners with the reverse
  ``ppermute`` of each hop and are added there; ``d_add_k``/``d_add_v`` are ``psum``-ed over the spatial
  mesh axes.

The compiled program of a halo-partitioned call has collective-permutes of at most a shard each (one
per hop, side and exchanged operand) and no all-gather (tests/sharding_checks.py ``spatial_halo``,
``spatial_halo_multihop``). The unfused ops do the same with their operands: qk
pads q and crops k, av pads the attention weights and crops v, their backwards pad the cotangent rows
with zeros, fold the dK/dV halos back and sum the bias gradient over the spatial (and batch) shards.

Uneven shards (``L`` tokens on ``n`` shards, ``n`` not dividing ``L``): XLA gives every shard ``s =
ceil(L / n)`` tokens, shard ``i`` holding the tokens ``[i * s, min((i + 1) * s, L))`` followed by
padding of unspecified contents: the last shard with tokens is short, any after it are all padding
(9 tokens on 8 shards: shard 4 holds one token, shards 5..7 none). ``halo_widths`` plans every shard
on its own tokens, and a slab holds real tokens only: the left neighbours of a shard with tokens are
whole, and no halo reaches past ``L``, so the short shard has no right halo and the padding that the
(unchanged) exchange of ``s``-token blocks carries is cropped off, as are the padding rows of the
queries and cotangents. Padding is never a key and gets no gradient from a real token; results at
padding positions are zeros (XLA drops them). A shard that is all padding (on any sharded axis) has no
query: its ``lax.switch`` branch runs no op and returns zeros, while it still takes part in the
exchanges. Checked in tests/sharding_checks.py ``spatial_halo_uneven`` (values, gradients, no
all-gather) for every primitive, the unfused ones included.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from jax import ShapeDtypeStruct, eval_shape, lax, tree_util
from jax.experimental.custom_partitioning import (
    CompoundFactor,
    SdyShardingRule,
    custom_partitioning,
)
from jax.interpreters import mlir
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_na.geometry import group_length, window_bounds

__all__ = ["partitioned_lowering", "requires_devices", "manual_axes_rule", "halo_widths",
           "leading_batch_axes", "KINDS"]

KINDS = ("fwd", "bwd", "qk", "qk_bwd", "av", "av_bwd")
LOCAL_PRIMITIVES: dict = {}  # kind -> the per-device primitive (filled by partitioned_lowering)

# Axis labels: "v0", "v1", ... leading batch axes (vmap's), "b" batch, "s0".."s2" spatial, "h" query
# heads, "hk" kv heads; every other label is an axis that is never sharded ("d", "dv" head dims, "na"
# additional tokens, "w" window, "r0".."r2" bias window, "e" the empty bias placeholder).
_SHARDABLE = ("b", "h", "hk")  # the Shardy rule calls the query heads "hk" or ("hk", "g")


def leading_batch_axes(rank: int, shape0: Sequence[int]) -> int:
    """How many batch axes (added by ``vmap``) a call of a ``rank``-D primitive has in front of ``B``,
    given the shape of its operand 0: ``[*leading, B, *S, H, C]`` for every primitive (q, the
    attention weights or their cotangent, or d_out). Every operand and result has the same leading
    axes, except an absent bias (``[0]``)."""
    return len(shape0) - (3 + rank)


def _is_leading(label: str) -> bool:
    return label[0] == "v" and label[1:].isdigit()


def _batch_like(label: str) -> bool:
    """Axes sharded like the batch: passed through, never gathered."""
    return label == "b" or _is_leading(label)


def _layouts(kind: str, rank: int, in_shapes: Sequence[Sequence[int]]):
    """The axis labels of every operand and result of primitive ``kind``."""
    L = tuple(f"v{i}" for i in range(leading_batch_axes(rank, in_shapes[0])))
    S = tuple(f"s{i}" for i in range(rank))
    Q, K, V = (*L, "b", *S, "h", "d"), (*L, "b", *S, "hk", "d"), (*L, "b", *S, "hk", "dv")
    AK, AV = (*L, "b", "na", "hk", "d"), (*L, "b", "na", "hk", "dv")
    O, LSE, A = (*L, "b", *S, "h", "dv"), (*L, "b", *S, "h"), (*L, "b", *S, "h", "w")

    def bias(shape):  # [*leading, H, 2k-1 per axis], or [0] for "no bias"
        return ("e",) if len(shape) == 1 else (*L, "h", *(f"r{i}" for i in range(rank)))

    if kind == "fwd":
        return (Q, K, V, AK, AV), (O, LSE)
    if kind == "bwd":
        return (Q, K, V, AK, AV, O, LSE, O, LSE), (Q, K, V, AK, AV)
    if kind == "qk":
        return (Q, K, bias(in_shapes[2])), (A,)
    if kind == "qk_bwd":
        R = bias(in_shapes[3])
        return (A, Q, K, R), (Q, K, R)
    if kind == "av":
        return (A, V), (O,)
    if kind == "av_bwd":
        return (O, A, V), (A, V)
    raise ValueError(f"unknown primitive kind {kind!r}")


def _size_of(label, layouts, shapes):
    for layout, shape in zip(layouts, shapes):
        if label in layout:
            return shape[layout.index(label)]
    return None


def _heads(layouts, shapes):
    """(H, H_kv) of a call; a call without kv-head operands (none yet) counts as H_kv = H."""
    H = _size_of("h", layouts, shapes)
    Hkv = _size_of("hk", layouts, shapes)
    return H, (H if Hkv is None else Hkv)


# ----------------------------------------------------------------------------- Shardy rule

def _sharding_rule(kind, params, value_types):
    """The Shardy rule: leading, batch, heads and spatial axes pass through; every other factor is
    replicated."""
    in_shapes = [tuple(t.shape) for t in value_types]
    ins, outs = _layouts(kind, params.rank, in_shapes)
    H, Hkv = _heads(ins, in_shapes)
    G = H // Hkv
    factor_sizes = {}
    if G == 1:
        heads = "hk"
    elif Hkv > 1:  # query head h = kv head (h // G) major, position in the group minor
        factor_sizes["g"] = G
        heads = CompoundFactor("hk", "g")
    else:  # one kv head (Shardy takes no size-1 factor in a compound): a factor of its own
        heads = "h"

    def mapping(layout):
        return tuple(heads if label == "h" else label for label in layout)

    # Factors that are never sharded, in order of first appearance (Shardy wants them sorted so).
    labels = dict.fromkeys(label for layout in ins + outs for label in layout)
    replicated = tuple(label for label in labels
                       if label not in _SHARDABLE and not _is_leading(label) and not label.startswith("s"))
    return SdyShardingRule(tuple(mapping(x) for x in ins), tuple(mapping(x) for x in outs),
                           need_replication_factors=replicated, **factor_sizes)


# ----------------------------------------------------------------------------- shard_map typing

# The operand whose gradient each result of a backward primitive is (fwd/qk/av results have none).
_GRADIENT_OF = {"bwd": (0, 1, 2, 3, 4), "qk_bwd": (1, 2, 3), "av_bwd": (1, 2)}


def _varying(aval):
    """The manual mesh axes (inside ``shard_map``) that ``aval`` varies over, or None if untyped."""
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if mat is not None:
        return frozenset(mat.varying)
    vma = getattr(aval, "vma", None)  # older jax
    return None if vma is None else frozenset(vma)


def _with_varying(out, varying, like):
    if not varying:
        return out
    if hasattr(like, "manual_axis_type"):
        from jax._src.core import ManualAxisType  # the constructor is not public yet
        return out.update(sharding=NamedSharding(like.sharding.mesh, PartitionSpec()),
                          manual_axis_type=ManualAxisType(varying=varying))
    return out.update(vma=varying)


def manual_axes_rule(kind: str, abstract):
    """Wrap an abstract-eval rule so that, inside ``shard_map`` (``check_vma``), every result varies
    over the manual axes that any operand varies over (the op mixes all of them). A zero-size gradient
    (absent additional KV or bias) is typed like its operand, so ``custom_vjp`` accepts it."""
    grad_of = _GRADIENT_OF.get(kind)

    def rule(*avals, **params):
        out = abstract(*avals, **params)
        varying = [_varying(a) for a in avals]
        typed = [(a, v) for a, v in zip(avals, varying) if v]
        if not typed:
            return out
        like, union = typed[0][0], frozenset().union(*(v for _, v in typed))
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        for i, o in enumerate(outs):
            mine = union
            if grad_of is not None and math.prod(o.shape) == 0:
                mine = varying[grad_of[i]] or frozenset()
            outs[i] = _with_varying(o, mine, like)
        return tuple(outs) if isinstance(out, (tuple, list)) else outs[0]

    return rule


# ----------------------------------------------------------------------------- halo plan (host side)

def _global_windows(length, kernel_size, stride, dilation, is_causal):
    """(first key token, key count) of every query token of one axis (the keys of a query are the
    tokens ``first, first + d, ..., first + (count - 1) * d``)."""
    t = np.arange(length, dtype=np.int64)
    g = t % dilation
    start, end = window_bounds(t // dilation, group_length(length, dilation, g), kernel_size, stride,
                               is_causal)
    return g + dilation * start, end - start


def _exact(length, kernel_size, stride, dilation, is_causal, lo, hi, q0, q1, first, count):
    """Whether the op run alone on tokens ``[lo, hi)`` of the axis (an axis of ``hi - lo`` tokens, the
    same parameters) gives every query of ``[q0, q1)`` its global window, key for key."""
    n = hi - lo
    if kernel_size * dilation > n:
        return False
    t = np.arange(q0 - lo, q1 - lo, dtype=np.int64)
    g = t % dilation
    start, end = window_bounds(t // dilation, group_length(n, dilation, g), kernel_size, stride, is_causal)
    # group g of the slab is global group (g + lo) % d, so equal first tokens mean equal groups too
    return (np.array_equal(g + dilation * start + lo, first[q0:q1])
            and np.array_equal(end - start, count[q0:q1]))


def _shard_extents(length: int, shards: int):
    """The tokens ``[q0, q1)`` of every shard of an axis of ``length`` tokens split over ``shards``
    devices as XLA splits it: ``ceil(length / shards)`` per shard. With uneven shards the last shard
    that has tokens holds fewer (XLA pads it) and any after it hold none (``q0 == q1``)."""
    m = -(-length // shards)
    return tuple((min(i * m, length), min((i + 1) * m, length)) for i in range(shards))


@functools.lru_cache(maxsize=512)
def halo_widths(length: int, shards: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                is_causal: bool = False):
    """The halo of every shard of an axis of ``length`` tokens split over ``shards`` devices
    (:func:`_shard_extents`; the shards need not be even).

    Returns ``((left, right), ...)`` per shard, the fewest extra tokens (any number of neighbours'
    shards on each side, within the axis) such that the local op on ``[q0 - left, q1 + right)``, an
    axis of that length with the same kernel size, stride, dilation and causality, computes exactly the
    global window of every query of the shard's tokens ``[q0, q1)`` (decided by brute force with the
    geometry of SEMANTICS.md); ``None`` for a shard without tokens. The slab never reaches past the
    axis, so it holds no padding: a shard with padding (the last one with tokens) has ``right == 0``.
    A string says why there is no exact halo (never, so far: the whole axis is always a candidate).
    """
    first, count = _global_windows(length, kernel_size, stride, dilation, is_causal)
    last = first + dilation * (count - 1)
    reach = 2 * stride * dilation + 2  # how far beyond the minimal halo the search goes
    widths = []
    for i, (q0, q1) in enumerate(_shard_extents(length, shards)):
        if q0 == q1:
            widths.append(None)
            continue
        max_l, max_r = q0, length - q1  # up to the axis' borders: (max_l, max_r) is the global op
        need_l = max(q0 - int(first[q0:q1].min()), 0)
        need_r = max(int(last[q0:q1].max()) + 1 - q1, 0)
        # The slab must also hold a whole dilated kernel (l + r >= fit), which can take more than the
        # windows reach (a causal window at the start of the axis): those candidates too.
        fit = kernel_size * dilation - (q1 - q0)
        near_l, near_r = range(need_l, need_l + reach + 1), range(need_r, need_r + reach + 1)
        pairs = {(l, r) for l in near_l for r in near_r}
        pairs |= {(l, max(need_r, fit - l) + j) for l in near_l for j in range(reach + 1)}
        pairs |= {(max(need_l, fit - r) + j, r) for r in near_r for j in range(reach + 1)}
        pairs = {(min(l, max_l), min(r, max_r)) for l, r in pairs}
        pairs |= {(max_l, r) for _, r in pairs} | {(l, max_r) for l, _ in pairs} | {(max_l, max_r)}
        pairs = sorted(pairs, key=lambda lr: (lr[0] + lr[1], lr[0]))
        found = next((lr for lr in pairs if _exact(length, kernel_size, stride, dilation, is_causal,
                                                    q0 - lr[0], q1 + lr[1], q0, q1, first, count)), None)
        if found is None:
            return f"no halo makes the windows of shard {i} exact"
        widths.append(found)
    return tuple(widths)


@dataclasses.dataclass(frozen=True)
class _Halo:
    """How a sharded spatial axis is partitioned with a halo exchange (see :func:`_halo_ops`)."""

    label: str                   # "s0".."s2"
    mesh_axes: tuple[str, ...]   # the mesh axes the spatial axis is split over
    shards: int
    size: int                    # tokens per shard, ceil(length / shards): XLA pads uneven shards to it
    left: int                    # tokens exchanged from the left / right (max over shards; may span
    right: int                   # several neighbours' shards)
    # the distinct (left, right, own) the shards run with: halo widths and the shard's own tokens (less
    # than size on the last shard with tokens of an uneven axis; (0, 0, 0): a shard without tokens)
    configs: tuple[tuple[int, int, int], ...]
    branch: tuple[int, ...]      # index into configs of every shard
    leading: int = 0             # leading batch axes (vmap's) in front of the batch

    @property
    def axis(self) -> int:       # the spatial axis of q/k/v/out/lse/attn: after the leading axes and B
        return self.leading + 1 + int(self.label[1:])


def _halo_plan(kind, params, mesh, spatial, used, leading=0):
    """(tuple of ``_Halo`` for the sharded spatial axes that take a halo exchange, reasons for the ones
    that do not: those are gathered). ``used``: the mesh axes of the batch-like axes and heads;
    ``leading``: the call's leading batch axes."""
    if not HALO_EXCHANGE:
        return (), ["jax_na.sharding.HALO_EXCHANGE is False"]
    halos, reasons = [], []
    for label, axes, length in spatial:
        if set(axes) & set(used):
            reasons.append(f"the spatial axis shares mesh axes {sorted(set(axes) & set(used))} with batch/heads")
            continue
        i = int(label[1:])
        n = _count(mesh, axes)
        widths = halo_widths(length, n, params.kernel_size[i], params.stride[i], params.dilation[i],
                             bool(params.is_causal[i]))
        if isinstance(widths, str):
            reasons.append(widths)
            continue
        real = [w for w in widths if w is not None]
        m, left, right = -(-length // n), max(l for l, _ in real), max(r for _, r in real)
        if max(left, right) > m and left + right > (n - 1) * m:
            # the exchange is sized for the widest halos of any shard: past the other shards' tokens
            # an all-gather moves no more, in one collective instead of one ppermute per hop and side
            reasons.append(f"a multi-hop halo of {left} + {right} tokens, more than the other shards hold "
                           f"({n - 1} x {m} tokens)")
            continue
        per_shard = [(0, 0, 0) if w is None else (*w, q1 - q0)
                     for w, (q0, q1) in zip(widths, _shard_extents(length, n))]
        configs = tuple(dict.fromkeys(per_shard))
        halos.append(_Halo(label, tuple(axes), n, m, left, right, configs,
                           tuple(configs.index(c) for c in per_shard), leading))
    return tuple(halos), reasons


# ----------------------------------------------------------------------------- halo ops (per device)

def _slice(x, axis, lo, hi):
    if lo == 0 and hi == x.shape[axis]:
        return x
    return lax.slice_in_dim(x, lo, hi, axis=axis)


def _pad(x, axis, lo, hi):
    if not lo and not hi:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (lo, hi)
    return jnp.pad(x, widths)


def _from_left(x, halo, hop=1):
    """On every device, ``x`` of the device ``hop`` positions before it (zeros on the first ``hop``)."""
    return lax.ppermute(x, halo.mesh_axes, [(j, j + hop) for j in range(halo.shards - hop)])


def _from_right(x, halo, hop=1):
    """On every device, ``x`` of the device ``hop`` positions after it (zeros on the last ``hop``)."""
    return lax.ppermute(x, halo.mesh_axes, [(j + hop, j) for j in range(halo.shards - hop)])


def _hop_widths(width, size):
    """The tokens a halo of ``width`` takes from the 1st, 2nd, ... neighbour on its side: whole shards
    of ``size`` tokens, the rest from the farthest one."""
    return [min(size, width - start) for start in range(0, width, size)]


def _extend(x, halo):
    """``[left halo | own slab | right halo]`` of a key/value shard: the last ``halo.left`` tokens
    before it and the first ``halo.right`` tokens after it, one ppermute per neighbour they come from
    (zeros past the borders, which no shard reads). With uneven shards a shard's left neighbours are
    whole (only the last shard with tokens is short) and no right halo reaches past the axis, so
    the padding received here is never in a slab either (``crop_kv`` in :func:`_halo_ops`)."""
    ax, m = halo.axis, halo.size
    parts = [x]
    for hop, width in enumerate(_hop_widths(halo.left, m), 1):  # the nearest first: prepend
        parts.insert(0, _from_left(_slice(x, ax, m - width, m), halo, hop))
    for hop, width in enumerate(_hop_widths(halo.right, m), 1):
        parts.append(_from_right(_slice(x, ax, 0, width), halo, hop))
    return jnp.concatenate(parts, axis=ax) if len(parts) > 1 else x


def _fold_back(dx, halo):
    """The gradient of an extended key/value shard -> the gradient of the own slab: the own part plus
    the halo parts the neighbours computed for this shard's tokens (the reverse exchange, hop by hop)."""
    ax, m, L, R = halo.axis, halo.size, halo.left, halo.right
    own = _slice(dx, ax, L, L + m)
    end = L  # the left halo is [hop h | ... | hop 1]: each part is the last tokens of its owner
    for hop, width in enumerate(_hop_widths(L, m), 1):
        own = own + _pad(_from_right(_slice(dx, ax, end - width, end), halo, hop), ax, m - width, 0)
        end -= width
    start = L + m  # the right halo is [hop 1 | ... | hop h]: each part is the first tokens of its owner
    for hop, width in enumerate(_hop_widths(R, m), 1):
        own = own + _pad(_from_left(_slice(dx, ax, start, start + width), halo, hop), ax, 0, m - width)
        start += width
    return own


def _per_shard(halos, run, *operands):
    """``run(halo configs of this shard)(*operands)``: shards at the borders of a sharded axis run other
    static halos than the interior ones (and the short last shard of an uneven axis fewer own tokens),
    so a ``lax.switch`` over the combinations (one (left, right, own) per axis) picks this shard's. A
    shard without tokens on some axis (all padding) has no query: it returns zeros."""
    combos = [tuple(h.configs[c] for h, c in zip(halos, combo))
              for combo in itertools.product(*(range(len(h.configs)) for h in halos))]
    branches = [run(configs) if all(own for _, _, own in configs) else None for configs in combos]
    if None in branches:
        results = eval_shape(next(b for b in branches if b is not None), *operands)

        def nothing(*_):
            return tree_util.tree_map(lambda r: jnp.zeros(r.shape, r.dtype), results)
        branches = [b or nothing for b in branches]
    if len(branches) == 1:
        return branches[0](*operands)
    index, stride = 0, 1
    for h in reversed(halos):  # itertools.product order: the last axis fastest
        table = jnp.asarray(np.asarray(h.branch, np.int32))
        index = index + stride * table[lax.axis_index(h.mesh_axes)]
        stride *= len(h.configs)
    return lax.switch(index, branches, *operands)


def _halo_ops(kind, local_prim, params, backend, halos, bias_sum_axes=()):
    """The per-device function of primitive ``kind`` with a halo exchange along every sharded spatial
    axis (``bias_sum_axes``: the batch mesh axes, over which qk_bwd's bias gradient is summed too).

    Every shard receives the key/value halos from its neighbours (``ppermute``, one per hop and side,
    one axis after the other: a later exchange moves the earlier ones' halos too, so the corners
    arrive), then runs the local op, unchanged, on ``[start - left, end + right)`` per axis with the
    (left, right) halo of its position (``halo_widths``; the interior shards share one, the border
    shards have their own, so a ``lax.switch`` on the shard indices picks among a few static shapes).
    The queries of the halo are zeros and are dropped from the results. In the backward their output
    cotangents are zero too, so they add nothing to dK/dV; the halo parts of dK/dV go back to their
    owners with the reverse exchanges (in reverse order), and d_add_k/d_add_v are summed over the
    shards of the axes. Uneven shards: the slab holds a shard's own tokens only, not XLA's padding
    after them (queries, keys and cotangents alike), so padding is never attended and gets no
    gradient from a real token; the results there are zeros (XLA drops them).
    """
    def bind(*operands):
        return local_prim.bind(*operands, params=params, backend=backend)

    def extend(x):
        for h in halos:
            x = _extend(x, h)
        return x

    def fold_back(dx):
        for h in reversed(halos):
            dx = _fold_back(dx, h)
        return dx

    # Along every axis: a shard's own tokens are the first ``own`` of its ``h.size`` (the rest is
    # padding); a shard with padding has no right halo, so its slab ends at its last token.
    def crop_kv(x, configs):  # the extended keys -> this shard's slab
        for h, (left, right, own) in zip(halos, configs):
            x = _slice(x, h.axis, h.left - left, h.left + own + right)
        return x

    def pad_q(x, configs):  # queries/rows -> the slab's length (zeros in the halo)
        for h, (left, right, own) in zip(halos, configs):
            x = _pad(_slice(x, h.axis, 0, own), h.axis, left, right)
        return x

    def own_rows(x, configs):  # slab results -> this shard's rows (zeros in the padding)
        for h, (left, _, own) in zip(halos, configs):
            x = _pad(_slice(x, h.axis, left, left + own), h.axis, 0, h.size - own)
        return x

    def pad_kv(x, configs):  # the slab's dK/dV -> the extended layout (zeros in the padding)
        for h, (left, right, own) in zip(halos, configs):
            x = _pad(x, h.axis, h.left - left, h.size - own + h.right - right)
        return x

    spatial_axes = tuple(a for h in halos for a in h.mesh_axes)

    # The unfused ops: rows of q / attention weights / d_out are padded (zeros in the halo, whose
    # results are dropped and whose cotangents are zero), keys/values cropped from the extension.
    if kind == "qk":
        def run(configs):
            return lambda q, k, rpb: own_rows(bind(pad_q(q, configs), crop_kv(k, configs), rpb), configs)
        return lambda q, k, rpb: _per_shard(halos, run, q, extend(k), rpb)
    if kind == "av":
        def run(configs):
            return lambda attn, v: own_rows(bind(pad_q(attn, configs), crop_kv(v, configs)), configs)
        return lambda attn, v: _per_shard(halos, run, attn, extend(v))
    if kind == "qk_bwd":
        def run(configs):
            def f(d_attn, q, k, rpb):
                dq, dk, d_rpb = bind(pad_q(d_attn, configs), pad_q(q, configs), crop_kv(k, configs), rpb)
                return own_rows(dq, configs), pad_kv(dk, configs), d_rpb
            return f

        def per_device(d_attn, q, k, rpb):
            dq, dk, d_rpb = _per_shard(halos, run, d_attn, q, extend(k), rpb)
            if len(rpb.shape) > 1:  # the bias gradient sums over every query: over the shards too
                d_rpb = lax.psum(d_rpb, (*bias_sum_axes, *spatial_axes))
            return dq, fold_back(dk), d_rpb
        return per_device
    if kind == "av_bwd":
        def run(configs):
            def f(d_out, attn, v):
                d_attn, dv = bind(pad_q(d_out, configs), pad_q(attn, configs), crop_kv(v, configs))
                return own_rows(d_attn, configs), pad_kv(dv, configs)
            return f

        def per_device(d_out, attn, v):
            d_attn, dv = _per_shard(halos, run, d_out, attn, extend(v))
            return d_attn, fold_back(dv)
        return per_device

    if kind == "fwd":
        def run(configs):
            def f(q, k, v, add_k, add_v):
                out, lse = bind(pad_q(q, configs), crop_kv(k, configs), crop_kv(v, configs), add_k, add_v)
                return own_rows(out, configs), own_rows(lse, configs)
            return f

        def per_device(q, k, v, add_k, add_v):
            return tuple(_per_shard(halos, run, q, extend(k), extend(v), add_k, add_v))
        return per_device

    def run(configs):
        def f(q, k, v, add_k, add_v, out, lse, d_out, d_lse):
            q, out, lse, d_out, d_lse = (pad_q(x, configs) for x in (q, out, lse, d_out, d_lse))
            dq, dk, dv, d_add_k, d_add_v = bind(q, crop_kv(k, configs), crop_kv(v, configs), add_k, add_v,
                                                out, lse, d_out, d_lse)
            return own_rows(dq, configs), pad_kv(dk, configs), pad_kv(dv, configs), d_add_k, d_add_v
        return f

    def per_device(q, k, v, add_k, add_v, out, lse, d_out, d_lse):
        dq, dk, dv, d_add_k, d_add_v = _per_shard(halos, run, q, extend(k), extend(v), add_k, add_v, out, lse,
                                                  d_out, d_lse)
        d_add_k, d_add_v = lax.psum((d_add_k, d_add_v), spatial_axes)
        return dq, fold_back(dk), fold_back(dv), d_add_k, d_add_v
    return per_device


# ----------------------------------------------------------------------------- partition plan

_WARNED: set[str] = set()
# Set to False to gather sharded spatial axes instead of exchanging halos (for comparisons; the results
# are the same). Read when a call is partitioned (compiled).
HALO_EXCHANGE = True


def _warn_once(key: str, message: str):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=2)


def _axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, an axis name or a tuple of them) as a tuple of axis names."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _spec_of(arg) -> tuple[tuple[str, ...], ...]:
    sharding = getattr(arg, "sharding", None)
    ndim = len(arg.shape)
    if sharding is None:
        return ((),) * ndim
    spec = tuple(sharding.spec)
    return tuple(_axes(e) for e in spec) + ((),) * (ndim - len(spec))


def _count(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _entry(axes):
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def _plan(kind, params, mesh, arg_shapes):
    """(mesh axes of each batch-like axis by label -- the leading axes "v0", ... and the batch "b" --,
    head mesh axes, tuple of ``_Halo`` or None) of one call: no other axis is sharded."""
    shapes = [tuple(a.shape) for a in arg_shapes]
    specs = [_spec_of(a) for a in arg_shapes]
    ins, _ = _layouts(kind, params.rank, shapes)

    def given(label):  # the first operand's choice for this axis wins; the others are resharded to it
        for layout, spec in zip(ins, specs):
            for lab, axes in zip(layout, spec):
                if lab == label and axes:
                    return axes
        return ()

    batch = {}  # the leading axes (outermost first), then the batch
    for label in (lab for lab in ins[0] if _batch_like(lab)):
        axes, size = given(label), _size_of(label, ins, shapes)
        what = "the batch" if label == "b" else f"the vmapped batch axis {label}"
        # operands may disagree (each label takes its first sharded operand's): a mesh axis can split
        # only one of them
        shared = set(axes) & {a for outer in batch.values() for a in outer}
        if shared:
            _warn_once(f"batch-shared-{kind}", f"jax_na: {what} shares mesh axes {sorted(shared)} with an "
                       f"outer batch axis; it is replicated (gathered) for this op.")
            axes = ()
        elif axes and size % _count(mesh, axes):
            _warn_once(f"batch-{kind}", f"jax_na: {what} ({size}) is not divisible by its "
                       f"{_count(mesh, axes)} shards (mesh axes {axes}); it is replicated (gathered) for "
                       f"this op.")
            axes = ()
        batch[label] = axes
    batch_axes = tuple(a for axes in batch.values() for a in axes)

    H, Hkv = _heads(ins, shapes)
    q_heads, kv_heads = given("h"), given("hk")
    heads = q_heads or kv_heads
    reason = None
    if q_heads and kv_heads and q_heads != kv_heads:
        reason = f"query heads on mesh axes {q_heads} but kv heads on {kv_heads}"
    elif heads and set(heads) & set(batch_axes):
        reason = f"heads and batch share mesh axes {sorted(set(heads) & set(batch_axes))}"
    elif heads and (H % _count(mesh, heads) or Hkv % _count(mesh, heads)):
        reason = (f"{H} query heads and {Hkv} kv heads are not both divisible by the "
                  f"{_count(mesh, heads)} shards of mesh axes {heads} (a GQA group must stay on one device)")
    if reason:
        _warn_once(f"heads-{reason}", f"jax_na: heads cannot be sharded consistently ({reason}); the heads "
                   f"are replicated (gathered) for this op.")
        heads = ()

    spatial = [(lab, given(lab), _size_of(lab, ins, shapes))
               for lab in dict.fromkeys(lab for layout in ins for lab in layout if lab.startswith("s"))
               if given(lab)]
    halo = None
    if spatial:
        halos, reasons = _halo_plan(kind, params, mesh, spatial, (*batch_axes, *heads),
                                    leading_batch_axes(params.rank, shapes[0]))
        for reason in reasons:
            _warn_once(f"spatial-{reason}", f"jax_na: a spatial axis is sharded but no halo exchange applies "
                       f"({reason}); that axis is gathered (replicated) for this op and the result is "
                       f"re-sliced.")
        halo = halos or None
    return batch, heads, halo


def _sharding(mesh, layout, batch, heads, halos=None):
    spatial = {h.label: h.mesh_axes for h in halos or ()}

    def axes(label):
        if label in batch:
            return batch[label]
        if label in ("h", "hk"):
            return heads
        return spatial.get(label, ())
    return NamedSharding(mesh, PartitionSpec(*(_entry(axes(lab)) for lab in layout)))


def _shardings(kind, params, mesh, arg_shapes):
    """(mesh axes of each batch-like axis by label, halo plan, operand shardings, result shardings)
    the per-device op runs with."""
    shapes = [tuple(a.shape) for a in arg_shapes]
    ins, outs = _layouts(kind, params.rank, shapes)
    batch, heads, halo = _plan(kind, params, mesh, arg_shapes)
    arg_shardings = tuple(_sharding(mesh, layout, batch, heads, halo) for layout in ins)
    out_shardings = tuple(_sharding(mesh, layout, batch, heads, halo) for layout in outs)
    return batch, halo, arg_shardings, out_shardings


# ----------------------------------------------------------------------------- the lowering

def requires_devices(prim):
    """Tell jax that lowering ``prim`` needs the device assignment (as custom_partitioning does), so
    that an eager call or a jit without shardings lowers with its devices known."""
    try:
        from jax._src import dispatch
        dispatch.prim_requires_devices_during_lowering.add(prim)
    except (ImportError, AttributeError):  # pragma: no cover - a jax that no longer needs it
        pass


def _partition(kind, local_prim, params, backend, mesh, arg_shapes):
    """The partition callback: (mesh, per-device function, result shardings, operand shardings)."""
    known = [a.sharding for a in arg_shapes if a.sharding is not None]  # None: not decided yet
    if mesh.empty or not all(isinstance(s, NamedSharding) for s in known):
        # Shardings without mesh axis names (no mesh in context): run the op replicated.
        _warn_once("no-mesh", "jax_na: the operands' shardings name no mesh axes; the op runs replicated.")
        devices = sorted({d for s in known for d in s.device_set}, key=lambda d: d.id)
        mesh = Mesh(np.array(devices), ("jax_na_devices",))
        arg_shapes = [ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
                      for a in arg_shapes]
    batch, halo, arg_shardings, out_shardings = _shardings(kind, params, mesh, arg_shapes)
    if halo is not None:
        if not local_prim.multiple_results:
            out_shardings = out_shardings[0]
        return (mesh, _halo_ops(kind, local_prim, params, backend, halo, batch["b"]), out_shardings,
                arg_shardings)
    # Not over the leading axes: the bias has them too (one bias per vmapped instance).
    sum_bias = kind == "qk_bwd" and bool(batch["b"]) and len(arg_shapes[3].shape) > 1

    def per_device(*operands):
        out = local_prim.bind(*operands, params=params, backend=backend)
        if sum_bias:  # d_rpb is a sum over the batch: add up the per-shard partial sums
            dq, dk, d_rpb = out
            out = (dq, dk, lax.psum(d_rpb, batch["b"]))
        return tuple(out) if local_prim.multiple_results else out

    if not local_prim.multiple_results:
        out_shardings = out_shardings[0]
    return mesh, per_device, out_shardings, arg_shardings


def partitioned_lowering(kind: str, local_prim):
    """The lowering rule of primitive ``kind``: ``local_prim`` (same operands, params and results)
    under ``custom_partitioning``. Register the primitive with :func:`requires_devices` too."""
    if kind not in KINDS:
        raise ValueError(f"unknown primitive kind {kind!r}")
    LOCAL_PRIMITIVES[kind] = local_prim
    multiple = local_prim.multiple_results

    def local(params, backend, *operands):
        out = local_prim.bind(*operands, params=params, backend=backend)
        return tuple(out) if multiple else out

    def partition(params, backend, mesh, arg_shapes, result_shape):
        return _partition(kind, local_prim, params, backend, mesh, arg_shapes)

    def infer_sharding_from_operands(params, backend, mesh, arg_shapes, result_shape):
        return partition(params, backend, mesh, arg_shapes, result_shape)[2]

    def sharding_rule(params, backend, mesh, value_types, result_types):
        return _sharding_rule(kind, params, value_types)

    partitioned = custom_partitioning(local, static_argnums=(0, 1))
    partitioned.def_partition(partition=partition,
                              infer_sharding_from_operands=infer_sharding_from_operands,
                              sharding_rule=sharding_rule)

    def impl(*operands, params, backend):
        return partitioned(params, backend, *operands)

    return mlir.lower_fun(impl, multiple_results=multiple)
