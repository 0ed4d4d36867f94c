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
heads ``H`` / ``H_kv``    sharded as given, no communication, when the query heads and the kv heads use
                          the same mesh axes (or only one of them is sharded) and both ``H`` and ``H_kv``
                          are divisible by the shard count, so every GQA group stays on one device. In the
                          Shardy rule the query heads are the compound factor ``(hk, g)`` of the kv heads
                          ``hk`` and the group size ``g``. ``rpb``/``d_rpb`` follow the heads. Otherwise
                          the heads are replicated (a one-time warning says so).
spatial ``X, Y, Z``       the Shardy rule passes them through (output keeps the query's sharding), but the
                          local kernel needs every key of each query's window, so for now the partition
                          requests them unsharded: XLA all-gathers the spatial axes before the op and slices
                          the result back (a one-time warning says so).
``D``, ``D_v``, window,   always replicated (gathered if they arrive sharded).
``N_add``, bias window
========================  =================================================================================

The output of every op keeps the sharding of its inputs on batch and heads; with batch/head sharding the
compiled program has no all-gather (checked by tests/test_sharding.py).

TODO(halo exchange): partition sharded spatial axes without gathering. Each device keeps its slab of
queries and receives from its neighbours (``lax.ppermute`` over the spatial mesh axis) the keys/values of
the halo its queries' windows reach into: ``(k // 2) * dilation`` tokens on each side, plus the border
shift of the window (a query near a border of the *global* axis sees a window shifted inward), the
stride leader offset, and for causal axes only the left side. The local kernel then runs on
``[halo_left | slab | halo_right]`` with global coordinates (the geometry takes an offset and the global
length, so ``start``/``leader`` and the dilation groups are those of the full axis), and the backward
sends the halo parts of ``dK``/``dV`` back with the reverse ``ppermute`` and adds them. Uneven shards and
``dilation * k`` larger than a shard need multi-hop halos or the gather fallback. Only
``_plan``/``_partition`` (and a ``halo`` argument to the local primitives) change; the Shardy rule already
passes spatial axes through.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from jax import ShapeDtypeStruct, lax
from jax.experimental.custom_partitioning import (
    CompoundFactor,
    SdyShardingRule,
    custom_partitioning,
)
from jax.interpreters import mlir
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["partitioned_lowering", "requires_devices", "manual_axes_rule", "KINDS"]

KINDS = ("fwd", "bwd", "qk", "qk_bwd", "av", "av_bwd")
LOCAL_PRIMITIVES: dict = {}  # kind -> the per-device primitive (filled by partitioned_lowering)

# Axis labels: "b" batch, "s0".."s2" spatial, "h" query heads, "hk" kv heads; every other label is an
# axis that is never sharded ("d", "dv" head dims, "na" additional tokens, "w" window, "r0".."r2" bias
# window, "e" the empty bias placeholder).
_SHARDABLE = ("b", "h", "hk")  # the Shardy rule calls the query heads "hk" or ("hk", "g")


def _layouts(kind: str, rank: int, in_shapes: Sequence[Sequence[int]]):
    """The axis labels of every operand and result of primitive ``kind``."""
    S = tuple(f"s{i}" for i in range(rank))
    Q, K, V = ("b", *S, "h", "d"), ("b", *S, "hk", "d"), ("b", *S, "hk", "dv")
    AK, AV = ("b", "na", "hk", "d"), ("b", "na", "hk", "dv")
    O, LSE, A = ("b", *S, "h", "dv"), ("b", *S, "h"), ("b", *S, "h", "w")

    def bias(shape):  # [H, 2k-1 per axis], or [0] for "no bias"
        return ("e",) if len(shape) == 1 else ("h", *(f"r{i}" for i in range(rank)))

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
    """The Shardy rule: batch, heads and spatial axes pass through; every other factor is replicated."""
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
                       if label not in _SHARDABLE and not label.startswith("s"))
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


# ----------------------------------------------------------------------------- partition plan

_WARNED: set[str] = set()


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
    """Mesh axes for the batch and the heads of one call (no other axis is sharded)."""
    shapes = [tuple(a.shape) for a in arg_shapes]
    specs = [_spec_of(a) for a in arg_shapes]
    ins, _ = _layouts(kind, params.rank, shapes)

    def given(label):  # the first operand's choice for this axis wins; the others are resharded to it
        for layout, spec in zip(ins, specs):
            for lab, axes in zip(layout, spec):
                if lab == label and axes:
                    return axes
        return ()

    B = _size_of("b", ins, shapes)
    batch = given("b")
    if batch and B % _count(mesh, batch):
        _warn_once(f"batch-{kind}", f"jax_na: the batch ({B}) is not divisible by its {_count(mesh, batch)} "
                   f"shards (mesh axes {batch}); the batch is replicated (gathered) for this op.")
        batch = ()

    H, Hkv = _heads(ins, shapes)
    q_heads, kv_heads = given("h"), given("hk")
    heads = q_heads or kv_heads
    reason = None
    if q_heads and kv_heads and q_heads != kv_heads:
        reason = f"query heads on mesh axes {q_heads} but kv heads on {kv_heads}"
    elif heads and set(heads) & set(batch):
        reason = f"heads and batch share mesh axes {sorted(set(heads) & set(batch))}"
    elif heads and (H % _count(mesh, heads) or Hkv % _count(mesh, heads)):
        reason = (f"{H} query heads and {Hkv} kv heads are not both divisible by the "
                  f"{_count(mesh, heads)} shards of mesh axes {heads} (a GQA group must stay on one device)")
    if reason:
        _warn_once(f"heads-{reason}", f"jax_na: heads cannot be sharded consistently ({reason}); the heads "
                   f"are replicated (gathered) for this op.")
        heads = ()

    spatial = sorted({lab for layout, spec in zip(ins, specs) for lab, axes in zip(layout, spec)
                      if lab.startswith("s") and axes})
    if spatial:
        _warn_once("spatial", "jax_na: a spatial axis is sharded; neighborhood attention does not exchange "
                   "halos yet, so the spatial axes are gathered (replicated) for the op and the result "
                   "is re-sliced. Shard batch or heads to avoid the communication.")
    return batch, heads


def _sharding(mesh, layout, batch, heads):
    def axes(label):
        if label == "b":
            return batch
        if label in ("h", "hk"):
            return heads
        return ()
    return NamedSharding(mesh, PartitionSpec(*(_entry(axes(lab)) for lab in layout)))


def _shardings(kind, params, mesh, arg_shapes):
    """(batch mesh axes, operand shardings, result shardings) that the per-device op runs with."""
    shapes = [tuple(a.shape) for a in arg_shapes]
    ins, outs = _layouts(kind, params.rank, shapes)
    batch, heads = _plan(kind, params, mesh, arg_shapes)
    arg_shardings = tuple(_sharding(mesh, layout, batch, heads) for layout in ins)
    out_shardings = tuple(_sharding(mesh, layout, batch, heads) for layout in outs)
    return batch, arg_shardings, out_shardings


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
    batch, arg_shardings, out_shardings = _shardings(kind, params, mesh, arg_shapes)
    sum_bias = kind == "qk_bwd" and bool(batch) and len(arg_shapes[3].shape) > 1

    def per_device(*operands):
        out = local_prim.bind(*operands, params=params, backend=backend)
        if sum_bias:  # d_rpb is a sum over the batch: add up the per-shard partial sums
            dq, dk, d_rpb = out
            out = (dq, dk, lax.psum(d_rpb, batch))
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
