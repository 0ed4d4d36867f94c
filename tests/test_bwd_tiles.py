"""The fused backward's tile configurations (backward_q_tile_shape / backward_kv_tile_shape of
na1d/na2d/na3d and of the Flax layers), on CPU: the public listing
(jax_na.fused_tile_configs(..., backward=True)) against the table (_checks.FUSED_BWD_TILES) and the
C++ templates it mirrors, how a call's shapes resolve to the FFI attributes
(_checks.bwd_tiles_args), the errors, the attributes of the CUDA lowering of jax_na_fused_bwd (and
that the forward's are independent of them), the deterministic mode of a portable-only
configuration, that the reference computes the same gradients with them, the Flax fields, and (in
builds with the fused kernels) that the extension's compiled list agrees with the table.

The kernels themselves (every configuration against the float64 reference) are in
tests/gpu/test_gpu_tiles.py."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import jax_na
import jax_na._ext as ext
import oracle
from helpers import Case
from jax_na import _checks, functional
from jax_na._checks import FusedTiles

# The default mode here is the deterministic one (XLA_FLAGS' flag, which na*d's default follows);
# the non-deterministic lists and attributes are asked for with deterministic_backward=False.
pytestmark = pytest.mark.usefixtures("xla_deterministic_ops")

RANKS = (1, 2, 3)
DTYPES = ("float16", "bfloat16", "float32")
SETS = {"fused_sm80": "sm80", "fused_sm90": "sm90"}
QN, KVN = "backward_q_tile_shape", "backward_kv_tile_shape"
# A forward argument name not preceded by "backward_" (a backward error must never name those).
FWD_NAME = re.compile(r"(?<!backward_)\b(q|kv)_tile_shape")


def _arr(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _spec(rank, dtype="bfloat16", D=128):
    """query / value stand-ins for bwd_tiles_args (it reads only shape and dtype)."""
    x = jax.ShapeDtypeStruct((1, *(8,) * rank, 2, D), jnp.dtype(dtype))
    return x, x


def _padded(head_dim, dims=(32, 64, 128, 256)):
    """The head dim a kernel set runs ``head_dim`` at: the portable set's instantiations by default,
    the Hopper set's with ``dims=(64, 128)``."""
    return next(p for p in dims if head_dim <= p)


def _from_templates(rank, M, N):
    """BwdTileConfigs<rank, M, N> of cuda/fused/tile_shapes.cuh written out: the compact default
    (BwdTileShapes) first, then (2-D, 3-D) the flatter alternative; M queries per step, N keys per CTA."""
    default = {1: ((M,), (N,)), 2: ((M // 8, 8), (N // 8, 8)), 3: ((M // 16, 4, 4), (4, 4, N // 16))}[rank]
    alt = {1: [], 2: [((M // 16, 16), (N // 16, 16))], 3: [((M // 32, 4, 8), (N // 64, 8, 8))]}[rank]
    return [default, *alt]


def _nd_from_templates(rank):
    """HopperBwdWsTiles written out: BwdTileConfigs at 64 queries per step and 128 keys per CTA, and
    in 3-D 1x8x8 queries over 2x8x8 keys after them."""
    return _from_templates(rank, 64, 128) + ([((1, 8, 8), (2, 8, 8))] if rank == 3 else [])


_expect = helpers.expect_error


def _dq_from_templates(rank, N, M):
    """BwdTileConfigs' dQ Tiles (Q tile, K/V tile) written out for dQ CTAs of M queries (portable 128,
    Hopper 64) over K/V tiles of N keys (portable 32, Hopper 64): DqTileShapes by default, then the
    flat configuration's."""
    default = {1: ((M,), (N,)), 2: ((M // 8, 8), (N // 8, 8)), 3: ((M // 32, 4, 8), (2, N // 8, 4))}[rank]
    flat_kv = (1, 4, 8) if N == 32 else (N // 16, 4, 4)
    alt = {1: [], 2: [((M // 16, 16), (N // 16, 16))], 3: [((M // 64, 8, 8), flat_kv)]}[rank]
    return [default, *alt]


@pytest.mark.parametrize("rank", RANKS)
def test_dq_tiles_equal_the_templates(rank):
    """FUSED_BWD_DQ_TILES (the backward chooser's view of the dQ kernel) lists one dQ tiling per
    backward configuration of each set, as the C++ templates give them; fused_bwd_dq_tiles takes the
    portable 64-query CTAs at head dim 32 only."""
    for ks, n, m in (("sm80", 32, 128), ("sm80", 32, 64), ("sm90", 64, 64)):
        assert list(_checks.FUSED_BWD_DQ_TILES[(ks, m)][rank]) == _dq_from_templates(rank, n, m)
        for (kset, _), by_rank in _checks.FUSED_BWD_TILES.items():
            if kset == ks:
                assert len(by_rank[rank]) == len(_checks.FUSED_BWD_DQ_TILES[(ks, m)][rank])
    for head_dim, m in ((32, 64), (64, 128), (128, 128), (256, 128)):
        assert _checks.fused_bwd_dq_tiles("sm80", head_dim, rank) == _checks.FUSED_BWD_DQ_TILES[("sm80", m)][rank]
    for head_dim in (64, 128):
        assert _checks.fused_bwd_dq_tiles("sm90", head_dim, rank) == _checks.FUSED_BWD_DQ_TILES[("sm90", 64)][rank]


# ----------------------------------------------------------------------------- the listing

@pytest.mark.parametrize("rank", RANKS)
def test_listing_equals_the_table(rank):
    """fused_tile_configs(..., backward=True) is FUSED_BWD_TILES: the portable set's 64-query list at
    head dims 32 and 64 and its 32-query list above (any dtype), the Hopper set's list for 16-bit at
    head dims up to 128 (padded to 64 or 128; empty for float32 and head dim 256); float32 has the
    default only (padded to 64 at least); and it is what the C++ templates give."""
    T = _checks.FUSED_BWD_TILES
    for dtype in DTYPES:
        for head_dim in (1, 8, 32, 64, 65, 100, 128, 129, 200, 256):
            if dtype == "float32" and head_dim > 128:
                continue
            f32 = dtype == "float32"
            P = _padded(head_dim, (64, 128) if f32 else (32, 64, 128, 256))
            got = jax_na.fused_tile_configs(rank, dtype, head_dim, backward=True)
            assert set(got) == {"fused_sm80", "fused_sm90"}, got
            assert all(isinstance(v, list) for v in got.values()), got
            M80 = 64 if P <= 64 else 32
            n80 = 1 if f32 else None
            assert got["fused_sm80"] == list(T[("sm80", M80)][rank])[:n80], (dtype, head_dim)
            assert got["fused_sm80"] == _from_templates(rank, M80, 64)[:n80], (dtype, head_dim)
            hopper = dtype != "float32" and head_dim <= 128
            assert got["fused_sm90"] == (list(T[("sm90", 64)][rank]) if hopper else []), (dtype, head_dim)
            assert got["fused_sm90"] == (_from_templates(rank, 64, 64) if hopper else []), (dtype, head_dim)
            # deterministic_backward=False: the Hopper set's warp-specialized kernel, 128 keys per CTA
            # (HopperBwdWsTiles); the portable set has one mode
            nd = jax_na.fused_tile_configs(rank, dtype, head_dim, backward=True, deterministic_backward=False)
            assert nd["fused_sm80"] == got["fused_sm80"], (dtype, head_dim)
            want_nd = list(_checks.FUSED_BWD_TILES_NONDETERMINISTIC["sm90"][rank]) if hopper else []
            assert nd["fused_sm90"] == want_nd == (_nd_from_templates(rank) if hopper else []), (dtype, head_dim)
            assert list(_checks.fused_bwd_tile_configs("sm80", dtype, P, rank)) == got["fused_sm80"]
            if hopper:
                P90 = _padded(head_dim, (64, 128))
                assert list(_checks.fused_bwd_tile_configs("sm90", dtype, P90, rank)) == got["fused_sm90"]
            # backend "fused" runs head dims up to 32 at 32: the portable kernels only
            assert not _checks.fused_bwd_tile_configs("sm90", dtype, P, rank) or P in (64, 128)
            assert len(got["fused_sm80"]) == (1 if rank == 1 or f32 else 2)
            # jnp dtypes name the same thing; the forward's list is another one
            assert jax_na.fused_tile_configs(rank, jnp.dtype(dtype), head_dim, backward=True) == got
            fwd = jax_na.fused_tile_configs(rank, dtype, head_dim)
            assert fwd == jax_na.fused_tile_configs(rank, dtype, head_dim, backward=False)
            assert fwd["fused_sm80"] != got["fused_sm80"], (dtype, head_dim)
    assert jax_na.fused_tile_configs(rank, backward=True) == jax_na.fused_tile_configs(rank, "bfloat16", 128,
                                                                                          backward=True)


@pytest.mark.parametrize("rank", RANKS)
def test_listing_shapes(rank):
    """Every configuration: rank extents per tile, powers of two, 32 or 64 queries per step (portable;
    64 on the Hopper set), 64 keys per CTA (both sets); no duplicate; the compact
    default first (the documented example too)."""
    for dtype, head_dim in (("bfloat16", 128), ("float16", 64), ("float32", 64), ("float32", 128),
                            ("bfloat16", 256), ("float16", 32), ("float32", 32)):
        got = jax_na.fused_tile_configs(rank, dtype, head_dim, backward=True)
        for backend, configs in got.items():
            helpers.check_tile_listing(configs, rank)
            for q, kv in configs:
                if backend == "fused_sm80":
                    # float32 at head dim 32 runs padded to 64: 64 queries per step as 16-bit
                    assert math.prod(q) == (64 if head_dim <= 64 else 32), (dtype, head_dim, q)
                    assert math.prod(kv) == 64, kv
                else:
                    assert math.prod(q) == 64 and math.prod(kv) == 64, (q, kv)
            if configs:
                M = math.prod(configs[0][0])
                N = math.prod(configs[0][1])
                assert configs[0] == _from_templates(rank, M, N)[0], (backend, configs)
    assert jax_na.fused_tile_configs(2, backward=True)["fused_sm80"][0] == ((4, 8), (8, 8))  # the docstring's
    assert jax_na.fused_tile_configs(2, backward=True)["fused_sm90"][0] == ((8, 8), (8, 8))
    assert jax_na.fused_tile_configs(1, "float16", 64, backward=True) == {"fused_sm80": [((64,), (64,))],
                                                                         "fused_sm90": [((64,), (64,))]}


@pytest.mark.parametrize("value", ["yes", 1, 0, None, "True"])
def test_listing_backward_must_be_a_bool(value):
    with pytest.raises(ValueError) as ei:
        jax_na.fused_tile_configs(2, "bfloat16", 128, backward=value)
    assert "backward" in str(ei.value) and repr(value) in str(ei.value), str(ei.value)


def test_listing_backward_takes_numpy_bools():
    """numpy bools are bools (as deterministic_backward's)."""
    for value in (True, False):
        assert (jax_na.fused_tile_configs(2, "bfloat16", 128, backward=np.bool_(value))
                == jax_na.fused_tile_configs(2, "bfloat16", 128, backward=value))
    assert jax_na.fused_tile_configs(2, backward=np.bool_(True)) != jax_na.fused_tile_configs(2)


# (the other bad arguments with backward=True: test_tiles.py's test_listing_bad_arguments)


# ----------------------------------------------------------------------------- resolution

def _resolve(rank, backend, q=None, kv=None, dtype="bfloat16", D=128, deterministic=True):
    """bwd_tiles_args as attention_args calls it (backend None: resolve_backend's "auto")."""
    query, value = _spec(rank, dtype, D)
    return _checks.bwd_tiles_args(rank, query, value, "auto" if backend is None else backend, q, kv,
                                  deterministic=deterministic)


# (rank, backward_q_tile_shape, backward_kv_tile_shape, dtype, D) -> FusedTiles under None / "fused".
RESOLVED = [
    # head dim 64: both sets have the same shapes (64 queries per step, 64 keys per CTA): arch 0
    (2, (8, 8), None, "bfloat16", 64, FusedTiles(0, 0, 0)),
    (2, (4, 16), None, "float16", 64, FusedTiles(0, 1, 1)),
    (2, None, (8, 8), "bfloat16", 64, FusedTiles(0, 0, 0)),
    (2, None, (4, 16), "bfloat16", 64, FusedTiles(0, 1, 1)),
    (2, [4, 16], [4, 16], "bfloat16", 64, FusedTiles(0, 1, 1)),
    (3, (2, 4, 8), None, "bfloat16", 64, FusedTiles(0, 1, 1)),
    (3, None, (1, 8, 8), "bfloat16", 64, FusedTiles(0, 1, 1)),
    (3, (4, 4, 4), (4, 4, 4), "bfloat16", 64, FusedTiles(0, 0, 0)),
    (1, 64, None, "bfloat16", 64, FusedTiles(0, 0, 0)),
    (1, (64,), (64,), "bfloat16", 64, FusedTiles(0, 0, 0)),
    # head dim 128: portable 32-query tiles, no (Q, K/V) pair in common; a K/V shape alone can match both
    (2, (4, 8), None, "bfloat16", 128, FusedTiles(80, 0, -1)),
    (2, (2, 16), (4, 16), "bfloat16", 100, FusedTiles(80, 1, -1)),
    (2, None, (4, 16), "bfloat16", 128, FusedTiles(0, 1, 1)),
    (2, (8, 8), None, "bfloat16", 128, FusedTiles(90, -1, 0)),
    (2, (4, 16), None, "float16", 128, FusedTiles(90, -1, 1)),
    (2, (4, 16), (4, 16), "bfloat16", 128, FusedTiles(90, -1, 1)),
    (3, (1, 4, 8), None, "bfloat16", 128, FusedTiles(80, 1, -1)),
    (3, None, (4, 4, 4), "bfloat16", 128, FusedTiles(0, 0, 0)),
    (3, (4, 4, 4), None, "bfloat16", 128, FusedTiles(90, -1, 0)),
    (3, (2, 4, 8), (1, 8, 8), "bfloat16", 128, FusedTiles(90, -1, 1)),
    (1, 32, None, "bfloat16", 128, FusedTiles(80, 0, -1)),
    (1, np.int64(64), 64, "bfloat16", 128, FusedTiles(90, -1, 0)),
    # float32 and head dim 256: the portable set only
    (2, (4, 8), None, "float32", 128, FusedTiles(80, 0, -1)),
    (2, (8, 8), None, "float32", 16, FusedTiles(80, 0, -1)),
    (3, None, (1, 8, 8), "bfloat16", 256, FusedTiles(80, 1, -1)),
]


@pytest.mark.parametrize("backend", [None, "fused"])
@pytest.mark.parametrize("rank,q,kv,dtype,D,want", RESOLVED,
                         ids=[f"{r}d-{q}-{kv}-{dt}-D{D}" for r, q, kv, dt, D, _ in RESOLVED])
def test_resolution(rank, q, kv, dtype, D, want, backend, any_gpu):
    assert _resolve(rank, backend, q, kv, dtype, D) == want


@pytest.mark.parametrize("backend", [None, "fused", "fused_sm80", "fused_sm90"])
def test_no_tile_shapes_resolve_to_none(backend):
    """No backward shapes and no window (the chooser's input): None (each set's default), whatever
    the forward's (test_chooser_without_backward_tile_shapes: the chooser)."""
    for rank in RANKS:
        for dtype, D in (("bfloat16", 128), ("float16", 64)):
            assert _resolve(rank, backend, dtype=dtype, D=D) is None
    x = jax.ShapeDtypeStruct((1, 32, 64, 2, 128), jnp.bfloat16)
    window = ((3, 31), (1, 1), (1, 1), (False, False))
    assert _checks.fwd_tiles_args(2, x, x, backend or "auto", None, None, window) is not None  # the chooser
    assert _checks.bwd_tiles_args(2, x, x, backend or "auto", None, None) is None


def _expected(listed, fam, q, kv):
    """FusedTiles that the shapes (either may be None) resolve to on backend ``fam``, by the rule
    (the first configuration of each set that has them; a configuration only one set has forces its
    arch), or None where no configuration of ``fam``'s sets has them."""
    idx = {}
    for backend, ks in SETS.items():
        runs = fam == "fused" or fam == backend
        idx[ks] = next((i for i, (a, b) in enumerate(listed[backend]) if q in (None, a) and kv in (None, b)),
                       -1) if runs else -1
    if idx["sm80"] < 0 and idx["sm90"] < 0:
        return None
    arch = _checks.FUSED_BACKENDS[fam]
    if arch == 0 and (idx["sm80"] < 0) != (idx["sm90"] < 0):
        arch = 80 if idx["sm90"] < 0 else 90
    return FusedTiles(arch, idx["sm80"], idx["sm90"])


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype,D", [("bfloat16", 128), ("float16", 64), ("bfloat16", 100), ("float32", 64),
                                     ("float32", 128), ("bfloat16", 256)])
def test_resolution_of_every_listed_configuration(rank, dtype, D, any_gpu):
    """Every configuration of the listing, given whole and by one shape alone, on backends None,
    "fused", "fused_sm80" and "fused_sm90": its index in each set that has it (-1 in the other),
    the arch of the one set that has it (0 where both do, the pinned set's on a pinned backend); a
    configuration of the other set only is a ValueError on a pinned backend."""
    listed = jax_na.fused_tile_configs(rank, dtype, D, backward=True)
    union = list(dict.fromkeys(listed["fused_sm80"] + listed["fused_sm90"]))
    assert union
    seen_arch = set()
    for q, kv in union:
        for shapes in ((q, kv), (q, None), (None, kv)):
            for backend in (None, "fused", "fused_sm80", "fused_sm90"):
                if backend == "fused_sm90" and not listed["fused_sm90"]:
                    continue   # no Hopper kernel (resolve_backend / the head-dim check reject the call first)
                want = _expected(listed, backend or "fused", *shapes)
                if want is None:
                    with pytest.raises(ValueError, match="allowed") as ei:
                        _resolve(rank, backend, *shapes, dtype=dtype, D=D)
                    assert QN in str(ei.value) and not FWD_NAME.search(str(ei.value)), str(ei.value)
                    continue
                got = _resolve(rank, backend, *shapes, dtype=dtype, D=D)
                assert got == want, (backend, shapes, got, want)
                if backend in SETS:
                    assert got.arch == _checks.FUSED_BACKENDS[backend]
                    other = "sm90" if backend == "fused_sm80" else "sm80"
                    assert getattr(got, other) == -1, got
                if shapes == (q, kv):
                    mine = [listed[b].index((q, kv)) if (q, kv) in listed[b] else -1 for b in SETS]
                    if backend is None:
                        assert (got.sm80, got.sm90) == tuple(mine), (q, kv, got)
                seen_arch.add(got.arch)
    # the cases above include configurations of one set only, pinned ones and, where a Q shape is
    # shared (head dim 64 in 16-bit), arch 0
    assert {80, 90} <= seen_arch or not listed["fused_sm90"]
    if listed["fused_sm90"] and D <= 64:
        assert 0 in seen_arch


def test_pinned_kernel_sets(any_gpu):
    """A configuration only the other set has, on a pinned backend: a ValueError listing this set's
    configurations only, naming the backward arguments and the direction."""
    with pytest.raises(ValueError) as ei:
        _resolve(2, "fused_sm80", (8, 8), (8, 8), D=128)     # Hopper only
    msg = str(ei.value)
    assert "allowed" in msg and "(4, 8) with (8, 8)" in msg and "(2, 16) with (4, 16)" in msg, msg
    assert "Hopper" not in msg and "(8, 8) with (8, 8)" not in msg, msg
    assert f"{QN}=(8, 8)" in msg and f"{KVN}=(8, 8)" in msg and "fused_sm80" in msg and "backward" in msg, msg
    assert not FWD_NAME.search(msg), msg
    with pytest.raises(ValueError) as ei:
        _resolve(3, "fused_sm90", (1, 4, 8), None, D=128)    # portable only
    msg = str(ei.value)
    assert "(4, 4, 4) with (4, 4, 4)" in msg and "(2, 4, 8) with (1, 8, 8)" in msg, msg
    assert "portable" not in msg and "(1, 4, 8) with" not in msg and f"{QN}=(1, 4, 8)" in msg, msg
    assert _resolve(3, "fused_sm90", (2, 4, 8), D=128) == FusedTiles(90, -1, 1)
    assert _resolve(3, "fused_sm80", (2, 4, 4), D=128) == FusedTiles(80, 0, -1)
    assert _resolve(2, "fused_sm80", (8, 8), D=64) == FusedTiles(80, 0, -1)
    assert _resolve(2, "fused_sm90", (8, 8), D=64) == FusedTiles(90, -1, 0)


def test_attention_args_stores_the_tiles(any_gpu):
    """attention_args puts the backward choice in NAParams.bwd_tiles, apart from the forward's
    fwd_tiles (None without shapes); a distinct static argument of the primitives."""
    q = _arr((1, 32, 32, 2, 64), jnp.bfloat16)  # the choosers keep the defaults
    common = (3, 1, 1, False, None, None, None, None)
    params, backend = _checks.attention_args(2, q, q, q, *common, backward_q_tile_shape=(8, 8),
                                             backward_kv_tile_shape=(8, 8))
    assert backend == "auto" and params.bwd_tiles == FusedTiles(0, 0, 0) and params.fwd_tiles is None
    params0, _ = _checks.attention_args(2, q, q, q, *common)
    assert params0.bwd_tiles is None and params0.fwd_tiles is None
    assert params0 == dataclasses.replace(params, bwd_tiles=None)
    assert hash(params) != hash(params0)
    both, _ = _checks.attention_args(2, q, q, q, *common, (8, 16), (8, 8), False, (4, 16), None)
    assert both.fwd_tiles == FusedTiles(80, 1, -1) and both.bwd_tiles == FusedTiles(0, 1, 1)
    assert both.deterministic is False
    fwd_only, _ = _checks.attention_args(2, q, q, q, *common, (8, 16), (8, 8))
    assert fwd_only.fwd_tiles == both.fwd_tiles and fwd_only.bwd_tiles is None
    # the same shapes, forward or backward, are different things
    with pytest.raises(ValueError, match="backward_kv_tile_shape"):
        _checks.attention_args(2, q, q, q, *common, backward_q_tile_shape=(8, 16), backward_kv_tile_shape=(8, 8))


@pytest.mark.parametrize("rank,q,kv", [(2, (8, 8), None), (3, (4, 4, 4), None), (1, 64, 64)])
def test_hopper_only_needs_hopper(monkeypatch, rank, q, kv):
    """On a GPU without the Hopper kernels a Hopper-only backward configuration is a ValueError naming
    the backward arguments and listing the portable set's; without a GPU it resolves."""
    monkeypatch.setattr(ext, "has_hopper_kernels", lambda: False)
    monkeypatch.setattr(ext, "has_cuda_device", lambda: True)
    with pytest.raises(ValueError) as ei:
        _resolve(rank, None, q, kv)
    msg = str(ei.value)
    assert "Hopper" in msg and "allowed here" in msg and "portable (fused_sm80)" in msg, msg
    assert QN in msg and KVN in msg and not FWD_NAME.search(msg), msg
    portable = jax_na.fused_tile_configs(rank, backward=True)["fused_sm80"][0]
    assert _resolve(rank, None, *portable) == FusedTiles(80, 0, -1)
    monkeypatch.setattr(ext, "has_cuda_device", lambda: False)
    assert _resolve(rank, None, q, kv).arch == 90


# ----------------------------------------------------------------------------- errors, public API

Q2 = _arr((1, 16, 8, 2, 64), jnp.bfloat16)
Q2F = _arr((1, 16, 8, 2, 8), jnp.float32)
Q3 = _arr((1, 4, 5, 6, 2, 64), jnp.bfloat16)
Q1 = _arr((1, 12, 2, 64), jnp.bfloat16)


# (malformed shapes in 2-D: test_tiles.py's test_bad_extents)


def test_bad_extents_other_ranks():
    _expect(lambda: jax_na.na3d(Q3, Q3, Q3, 3, backward_q_tile_shape=(4, 4)), [QN, "3 positive ints"])
    _expect(lambda: jax_na.na3d(Q3, Q3, Q3, 3, backward_kv_tile_shape=(4, 4, 0)), KVN)
    _expect(lambda: jax_na.na1d(Q1, Q1, Q1, 3, backward_q_tile_shape=(64, 1)), [QN, "1 positive ints"])
    _expect(lambda: jax_na.na1d(Q1, Q1, Q1, 3, backward_kv_tile_shape=True), KVN)
    _expect(lambda: jax_na.na1d(Q1, Q1, Q1, 3, backward_kv_tile_shape=64.0), KVN)
    # the valid one is checked too when the other is bad
    _expect(lambda: jax_na.na2d(Q2, Q2, Q2, 3, backward_q_tile_shape=(8, 8), backward_kv_tile_shape=(8,)), KVN)
    # a bad forward shape is named as the forward's, a bad backward one as the backward's
    msg = _expect(lambda: jax_na.na2d(Q2, Q2, Q2, 3, q_tile_shape=(16,), backward_q_tile_shape=(8, 8)),
                  "q_tile_shape")
    assert QN not in msg and KVN not in msg, msg
    msg = _expect(lambda: jax_na.na2d(Q2, Q2, Q2, 3, q_tile_shape=(16, 8), backward_q_tile_shape=(16,)), QN)
    assert not FWD_NAME.search(msg), msg


def test_uncompiled_shapes():
    """A shape no compiled backward configuration has: a ValueError naming the backward argument(s)
    and listing the allowed backward configurations of the dtype's kernel sets."""
    # the forward's default Q shape is no backward one
    msg = _expect(lambda: jax_na.na2d(Q2, Q2, Q2, 3, backward_q_tile_shape=(16, 8)), [f"{QN}=(16, 8)", "allowed"])
    listed = jax_na.fused_tile_configs(2, "bfloat16", 64, backward=True)
    for q, kv in listed["fused_sm80"] + listed["fused_sm90"]:
        assert f"{q} with {kv}" in msg, msg
    assert "portable" in msg and "Hopper" in msg and "bfloat16" in msg and "head dim 64" in msg, msg
    assert "backward" in msg.split("allowed")[0] and not FWD_NAME.search(msg), msg
    fwd = jax_na.fused_tile_configs(2, "bfloat16", 64)
    for q, kv in fwd["fused_sm80"] + fwd["fused_sm90"]:   # no forward configuration is listed
        assert f"{q} with {kv}" not in msg, msg
    # each shape exists, but not together
    _expect(lambda: jax_na.na2d(Q2, Q2, Q2, 3, backward_q_tile_shape=(8, 8), backward_kv_tile_shape=(4, 16)),
            [f"{QN}=(8, 8)", f"{KVN}=(4, 16)", "allowed"])
    # float32 (head dim 8 -> 64): the portable set's default only
    msg = _expect(lambda: jax_na.na2d(Q2F, Q2F, Q2F, 3, backward_kv_tile_shape=(16, 8)), [KVN, "allowed", "float32"])
    assert "(8, 8) with (8, 8)" in msg and "(4, 16) with (4, 16)" not in msg and "Hopper" not in msg, msg
    # head dim 128: the 32-query portable shapes beside the Hopper set's 64-query ones
    Q2H = _arr((1, 16, 8, 2, 128), jnp.bfloat16)
    msg = _expect(lambda: jax_na.na2d(Q2H, Q2H, Q2H, 3, backward_q_tile_shape=(8, 8), backward_kv_tile_shape=(4, 16)),
                  [QN, KVN, "allowed", "head dim 128"])
    assert "(4, 8) with (8, 8)" in msg and "(2, 16) with (4, 16)" in msg, msg
    _expect(lambda: jax_na.na3d(Q3, Q3, Q3, 3, backward_q_tile_shape=(4, 4, 8)), [QN, "allowed", "(2, 4, 8)"])
    _expect(lambda: jax_na.na1d(Q1, Q1, Q1, 3, backward_q_tile_shape=128), [QN, "allowed", "(64,)"])
    _expect(lambda: jax_na.na1d(Q1, Q1, Q1, 3, backward_kv_tile_shape=(32,)), [KVN, "allowed"])


@pytest.mark.parametrize("name", [QN, KVN])
def test_tiles_with_the_reference_backend(name):
    shape = {QN: (8, 8), KVN: (8, 8)}[name]
    for q in (Q2, Q2F):
        msg = _expect(lambda: jax_na.na2d(q, q, q, 3, backend="reference", **{name: shape}), name)
        assert "'reference'" in msg and "fused" in msg, msg
    # forward tiles alone still fail with the forward's names
    msg = _expect(lambda: jax_na.na2d(Q2, Q2, Q2, 3, backend="reference", kv_tile_shape=(8, 8)), "kv_tile_shape")
    assert "'reference'" in msg


# (gemm / naive with backward tile shapes: test_tiles.py's test_tiles_with_the_unfused_kernel_backends)


# ----------------------------------------------------------------------------- CUDA lowering

_cuda_hlo, _calls, _int_attr = helpers.cuda_hlo, helpers.custom_calls, helpers.int_attr


def _tile_attrs(line):
    return tuple(_int_attr(line, a) for a in ("arch", "tiles_sm80", "tiles_sm90"))


_workspace_elems = helpers.workspace_elems


# The problems the backward configurations were measured on (H100, bf16, D = 128, fwd+bwd; _checks'
# chooser comment, cuda/fused/NOTES.md session 33), with whether (portable, Hopper) take their flat
# tiles: the faster ones, which the tile model with BWD_CHOICE_MARGIN picks.
# (spatial, kernel_size, stride, is_causal, flat)
MEASURED_BWD = [
    ((128, 128), (31, 31), 1, False, (False, False)),                          # p2
    # Hopper flat computes 0.5% fewer pair-products on p3/p10, 5.3% on p9: within BWD_CHOICE_MARGIN
    ((16, 32, 32), (7, 13, 13), 1, False, (True, False)),                      # p3
    ((16, 32, 32), (7, 13, 13), 1, (True, False, False), (True, False)),       # p10
    ((16, 32, 32), (3, 13, 13), 1, False, (True, True)),
    ((30, 48, 80), (18, 24, 24), 1, False, (False, False)),                    # p8
    ((30, 48, 80), (18, 24, 24), (16, 8, 8), False, (True, False)),            # p9
]


@pytest.mark.parametrize("spatial,kernel_size,stride,is_causal,flat", MEASURED_BWD,
                         ids=[f"{'x'.join(map(str, c[0]))}-k{'x'.join(map(str, c[1]))}-{i}"
                              for i, c in enumerate(MEASURED_BWD)])
@pytest.mark.parametrize("backend", [None, "fused", "fused_sm80", "fused_sm90"])
def test_chooser_without_backward_tile_shapes(any_gpu, spatial, kernel_size, stride, is_causal, flat, backend):
    """Calls without backward shapes take, per kernel set, the configuration whose tile walk computes
    the fewest pairs (jax_na.tile_model; the default unless an alternative saves more than
    BWD_CHOICE_MARGIN): on the measured problems the faster one."""
    fam = backend or "fused"
    rank = len(spatial)
    query = jax.ShapeDtypeStruct((1, *spatial, 2, 128), jnp.bfloat16)
    params = _checks.window_params(rank, spatial, kernel_size, stride, 1, is_causal, head_dim=128)
    window = (params.kernel_size, params.stride, params.dilation, params.is_causal)
    got = _checks.bwd_tiles_args(rank, query, query, backend or "auto", None, None, window)
    if not any(flat):
        assert got is None
        return
    assert got.arch == _checks.FUSED_BACKENDS[fam], got
    assert (got.sm80, got.sm90) == tuple(int(f) for f in flat), got
    # a flat configuration of each set: its keys shorter on the first axis
    listed = jax_na.fused_tile_configs(rank, "bfloat16", 128, backward=True)
    for name, index in (("fused_sm80", got.sm80), ("fused_sm90", got.sm90)):
        kv = listed[name][index][1]
        assert (kv[0] < kv[1]) == bool(index), (name, kv)


# The same problems in the Hopper non-deterministic mode (H100, bf16, D = 128, backward alone,
# session 47; BWD_CHOICE_BASE): its flat 3-D tiles (configuration 1) ran faster on all four 3-D
# problems, the default 2-D tiles on p2. (spatial, kernel_size, stride, is_causal, Hopper index)
MEASURED_BWD_NONDETERMINISTIC = [
    ((128, 128), (31, 31), 1, False, 0),                    # p2: 1.45 vs 1.48 ms
    ((16, 32, 32), (7, 13, 13), 1, False, 2),               # p3: 1x8x8 queries, 6400 steps: 2.53 vs 3.03 ms for 1
    ((16, 32, 32), (7, 13, 13), 1, (True, False, False), 1),  # p10: 2.16 vs 2.61
    ((30, 48, 80), (18, 24, 24), 1, False, 1),              # p8: 138.2 vs 149.5
    ((30, 48, 80), (18, 24, 24), (16, 8, 8), False, 1),     # p9: 84.2 vs 101.2
]


@pytest.mark.parametrize("spatial,kernel_size,stride,is_causal,want", MEASURED_BWD_NONDETERMINISTIC,
                         ids=[f"{'x'.join(map(str, c[0]))}-k{'x'.join(map(str, c[1]))}-{i}"
                              for i, c in enumerate(MEASURED_BWD_NONDETERMINISTIC)])
def test_chooser_nondeterministic_hopper(any_gpu, spatial, kernel_size, stride, is_causal, want):
    """Without backward tile shapes and with deterministic_backward=False, the Hopper set takes the
    configuration measured faster: in 3-D its flat tiles unless another saves BWD_CHOICE_MARGIN."""
    rank = len(spatial)
    query = jax.ShapeDtypeStruct((1, *spatial, 2, 128), jnp.bfloat16)
    params = _checks.window_params(rank, spatial, kernel_size, stride, 1, is_causal, head_dim=128)
    window = (params.kernel_size, params.stride, params.dilation, params.is_causal)
    got = _checks.bwd_tiles_args(rank, query, query, "fused_sm90", None, None, window, False)
    assert (got.sm90 if got is not None else 0) == want, got
    if got is not None:
        assert got.arch == 90, got
        listed = jax_na.fused_tile_configs(rank, "bfloat16", 128, backward=True, deterministic_backward=False)
        assert listed["fused_sm90"][got.sm90] == (None, ((2, 4, 8), (2, 8, 8)), ((1, 8, 8), (2, 8, 8)))[want]


def test_backward_chooser_modes_and_dtypes(any_gpu):
    """The choice depends on the kernel set's configurations for the dtype and head dim (float32: the
    portable set only) and, on Hopper, on deterministic_backward (without it the dK/dV kernel adds
    dQ: five products per pair it computes and no dQ kernel); it is the least-work configuration, or
    the default where none saves more than BWD_CHOICE_MARGIN of its work."""
    from jax_na import tile_model
    spatial, window = (16, 32, 32), ((7, 13, 13), (1, 1, 1), (1, 1, 1), (False, False, False))
    axes = tile_model.problem_axes(spatial, *window)
    for dtype, D in (("bfloat16", 128), ("float16", 64), ("float32", 64)):
        x = jax.ShapeDtypeStruct((1, *spatial, 2, D), jnp.dtype(dtype))
        for det in (True, False):
            got = _checks.bwd_tiles_args(3, x, x, "fused", None, None, window, det) or FusedTiles(0, 0, 0)
            for ks, index in (("sm80", got.sm80), ("sm90", got.sm90)):
                configs = _checks.fused_bwd_tile_configs(ks, dtype, D, 3, det)
                if not configs:
                    continue
                dq = _checks.fused_bwd_dq_tiles(ks, D, 3)  # (unused by the non-deterministic Hopper work)
                work = [tile_model.backward_work(axes, ks, q, kv, *(dq[i] if det or ks == "sm80" else dq[0]), det)
                        for i, (q, kv) in enumerate(configs)]
                least = work.index(min(work))
                base = _checks.bwd_choice_base(ks, det, 3, len(configs))
                want = least if work[least] < (1 - _checks.BWD_CHOICE_MARGIN[ks]) * work[base] else base
                assert index == want, (dtype, det, ks, work)
                if ks == "sm90" and not det:
                    assert index == 2, (dtype, work)  # 1x8x8 queries: 11% fewer steps on p3
    # 1-D has one configuration: nothing to choose
    x = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.bfloat16)
    assert _checks.bwd_tiles_args(1, x, x, "fused", None, None, ((255,), (1,), (1,), (False,))) is None


def _inputs():
    r = np.random.default_rng(0)
    mk = lambda *s, dt=jnp.bfloat16: jnp.asarray(r.standard_normal(s), dt)
    return dict(q2=mk(1, 32, 32, 4, 64), k2=mk(1, 32, 32, 2, 64), q2h=mk(1, 32, 32, 4, 128), k2h=mk(1, 32, 32, 2, 128),
                q3=mk(1, 4, 5, 6, 2, 128), q1=mk(2, 20, 2, 64), q2f=mk(1, 16, 8, 2, 8, dt=jnp.float32),
                q2c=mk(1, 32, 64, 4, 64), k2c=mk(1, 32, 64, 2, 64), q3c=mk(1, 6, 16, 16, 2, 128))


# Expected attributes of a call whose shapes the chooser picks (whatever it picks; the choices
# themselves: test_chooser_without_backward_tile_shapes, test_tiles.py).
CHOSEN = "chosen"

# (fn, q, k, kernel, backend, forward (q, kv), backward (q, kv), forward attributes, backward attributes)
LOWERED = [
    ("na2d", "q2", "k2", 3, None, (None, None), ((8, 8), None), (0, 0, 0), (0, 0, 0)),
    ("na2d", "q2", "k2", 3, None, (None, None), ((4, 16), None), (0, 0, 0), (0, 1, 1)),
    ("na2d", "q2", "k2", 3, None, (None, None), (None, (8, 8)), (0, 0, 0), (0, 0, 0)),
    ("na2d", "q2", "k2", 3, None, (None, None), ((8, 8), (8, 8)), (0, 0, 0), (0, 0, 0)),
    ("na2d", "q2", "k2", 3, "fused", (None, None), ((4, 16), (4, 16)), (0, 0, 0), (0, 1, 1)),
    ("na2d", "q2", "k2", 3, "fused_sm80", (None, None), ((4, 16), None), (80, 0, 0), (80, 1, -1)),
    ("na2d", "q2", "k2", 3, "fused_sm90", (None, None), ((4, 16), None), (90, 0, 0), (90, -1, 1)),
    # head dim 128, 3x3: the portable forward's chooser takes 8x16 (16-query warps' 2x8 boxes meet
    # fewer K/V tiles than the default's 32-query 4x8 ones)
    ("na2d", "q2h", "k2h", 3, None, (None, None), ((2, 16), None), (0, 1, 0), (80, 1, -1)),
    ("na2d", "q2h", "k2h", 3, None, (None, None), ((8, 8), None), (0, 1, 0), (90, -1, 0)),
    ("na2d", "q2h", "k2h", 3, "fused_sm80", (None, None), (None, (4, 16)), (80, 1, 0), (80, 1, -1)),
    ("na2d", "q2h", "k2h", 3, "fused_sm90", (None, None), (None, (4, 16)), (90, 1, 0), (90, -1, 1)),
    ("na3d", "q3", "q3", 3, None, (None, None), ((1, 4, 8), (1, 8, 8)), (0, 0, 0), (80, 1, -1)),
    ("na3d", "q3", "q3", 3, None, (None, None), ((2, 4, 8), (1, 8, 8)), (0, 0, 0), (90, -1, 1)),
    ("na1d", "q1", "q1", 3, None, (None, None), (64, None), (0, 0, 0), (0, 0, 0)),
    ("na1d", "q1", "q1", 3, "fused_sm90", (None, None), (None, 64), (90, 0, 0), (90, -1, 0)),
    ("na2d", "q2f", "q2f", 3, None, (None, None), ((8, 8), None), (0, 0, 0), (80, 0, -1)),  # float32: the default only
    # forward and backward shapes together: each call gets its own
    ("na2d", "q2", "k2", 3, None, ((8, 16), (8, 8)), ((8, 8), (8, 8)), (80, 1, -1), (0, 0, 0)),
    ("na2d", "q2h", "k2h", 3, None, ((16, 8), (16, 8)), ((2, 16), (4, 16)), (90, -1, 0), (80, 1, -1)),
    ("na3d", "q3", "q3", 3, "fused_sm90", ((2, 8, 8), None), ((4, 4, 4), None), (90, -1, 1), (90, -1, 0)),
    # no backward shapes: the backward's chooser (here the flat tiles of both sets)
    ("na3d", "q3c", "q3c", (2, 5, 5), None, (None, None), (None, None), (0, 0, 0), CHOSEN),
    ("na3d", "q3c", "q3c", (2, 5, 5), "fused_sm80", (None, None), (None, None), (80, 0, 0), CHOSEN),
    ("na3d", "q3c", "q3c", (2, 5, 5), None, (None, None), ((4, 4, 4), None), (0, 0, 0), (90, -1, 0)),
    # forward shapes only: the backward keeps its defaults (k = 3 over 16x8) or its chooser's
    ("na2d", "q2", "k2", 3, None, ((8, 16), None), (None, None), (0, 1, 1), (0, 0, 0)),
    ("na2d", "q2c", "k2c", (3, 31), "fused_sm80", (None, None), (None, None), CHOSEN, CHOSEN),
    ("na2d", "q2c", "k2c", (3, 31), None, (None, None), ((4, 16), (4, 16)), CHOSEN, (0, 1, 1)),
]


@pytest.mark.parametrize("fn,qn,kn,kernel,backend,fwd,bwd,want_fwd,want_bwd", LOWERED,
                         ids=[f"{c[0]}-{c[1]}-{c[4]}-f{c[5]}-b{c[6]}" for c in LOWERED])
def test_cuda_lowering_tile_attributes(pretend_kernels, fn, qn, kn, kernel, backend, fwd, bwd, want_fwd, want_bwd):
    """Under jax.grad, jax_na_fused_bwd carries arch / tiles_sm80 / tiles_sm90 as the backward shapes
    resolve, jax_na_fused_fwd as the forward's: neither direction's shapes change the other's
    attributes (nor the forward-only program)."""
    pretend_kernels()
    X = _inputs()
    q, k = X[qn], X[kn]
    na = getattr(jax_na, fn)

    def f(bq, bkv):
        return lambda q, k: na(q, k, k, kernel, backend=backend, q_tile_shape=fwd[0], kv_tile_shape=fwd[1],
                               backward_q_tile_shape=bq, backward_kv_tile_shape=bkv, return_lse=True)

    def loss(bq, bkv):
        def run(q, k):
            out, lse = f(bq, bkv)(q, k)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)
        return run

    if CHOSEN in (want_fwd, want_bwd):
        params, _ = _checks.attention_args(q.ndim - 3, q, k, k, kernel, 1, 1, False, None, None, None, backend,
                                           *fwd, True, *bwd)
        default = (_checks.FUSED_BACKENDS[backend or "fused"], 0, 0)
        attrs = lambda t: default if t is None else (t.arch, t.sm80, t.sm90)
        if want_fwd == CHOSEN:
            want_fwd = attrs(params.fwd_tiles)
            assert want_fwd != default  # the rows exercise a choice
        if want_bwd == CHOSEN:
            want_bwd = attrs(params.bwd_tiles)
            assert want_bwd != default
    text = _cuda_hlo(jax.grad(loss(*bwd), argnums=(0, 1)), q, k)
    fcalls, bcalls = _calls(text, "jax_na_fused_fwd"), _calls(text, "jax_na_fused_bwd")
    assert len(fcalls) == 1 and len(bcalls) == 1, text
    assert _tile_attrs(fcalls[0]) == want_fwd, fcalls[0]
    assert _tile_attrs(bcalls[0]) == want_bwd, bcalls[0]
    assert _int_attr(bcalls[0], "deterministic") == 1, bcalls[0]
    # the forward alone: the same program with or without backward shapes
    text_fwd = _cuda_hlo(f(*bwd), q, k)
    (line,) = _calls(text_fwd, "jax_na_fused_fwd")
    assert _tile_attrs(line) == want_fwd and not _calls(text_fwd, "jax_na_fused_bwd"), text_fwd
    assert text_fwd == _cuda_hlo(f(None, None), q, k)
    # without backward shapes the backward gets the backend's arch and the default configurations
    if bwd != (None, None) and kernel == 3:
        text0 = _cuda_hlo(jax.grad(loss(None, None), argnums=(0, 1)), q, k)
        (b0,) = _calls(text0, "jax_na_fused_bwd")
        assert _tile_attrs(b0) == (_checks.FUSED_BACKENDS[backend or "fused"], 0, 0), b0
        (f0,) = _calls(text0, "jax_na_fused_fwd")
        assert _tile_attrs(f0) == want_fwd, f0


def test_cuda_lowering_reference_ignores_them():
    """Lowered for the CPU, the reference (auto there) has no custom call and no tile attribute."""
    X = _inputs()
    g = jax.grad(lambda q: jnp.sum(jax_na.na2d(q, q, q, 3, backward_q_tile_shape=(8, 8),
                                               backward_kv_tile_shape=(8, 8)).astype(jnp.float32)))
    text = jax.jit(g).trace(X["q2"]).lower(lowering_platforms=("cpu",)).as_text()
    assert "jax_na_" not in text and "tiles_sm" not in text


# (rank, spatial, H, D, kernel, backend, backward (q, kv), with deterministic_backward=False: the
# Hopper kernel adds dQ). The shapes are valid in both modes (the non-deterministic Hopper kernel's
# K/V boxes have twice the keys: FUSED_BWD_TILES_NONDETERMINISTIC).
DETERMINISM = [
    (2, (16, 8), 4, 128, 3, None, (None, None), True),          # head dim 128: the Hopper backward
    (2, (16, 8), 4, 128, 3, None, ((2, 16), (4, 16)), False),   # portable-only configuration: the portable one
    (2, (16, 8), 4, 128, 3, None, ((4, 8), None), False),
    (2, (16, 8), 4, 128, 3, None, (None, (8, 8)), False),       # a K/V shape the non-deterministic Hopper kernel lacks
    (2, (16, 8), 4, 128, 3, None, ((8, 8), None), True),        # Hopper-only: Hopper
    (2, (16, 8), 4, 128, 3, "fused", ((4, 16), None), True),
    (2, (16, 8), 4, 128, 3, "fused_sm80", ((2, 16), None), False),
    (2, (16, 8), 4, 128, 3, "fused_sm90", ((4, 16), None), True),
    (2, (16, 8), 4, 64, 3, None, ((8, 8), None), False),        # both sets, head dim 64, 9 keys: portable
    (2, (16, 8), 4, 64, 3, "fused_sm90", ((8, 8), None), True),  # the same shape, Hopper pinned
    (2, (16, 8), 4, 64, 3, None, (None, (4, 16)), False),
    (1, (300,), 2, 64, 257, None, (None, None), True),         # 257 keys: Hopper
    (1, (300,), 2, 32, 257, None, (None, None), False),        # head dim 32: the portable kernels (at 32)
    (1, (300,), 2, 32, 257, "fused_sm90", (None, None), True),  # ... unless pinned: Hopper, padded to 64
    (2, (16, 8), 4, 32, 3, None, ((8, 8), None), False),        # shapes of both sets: portable at 32
    (1, (300,), 2, 64, 257, None, ((64,), None), True),        # both sets: as without shapes
    (1, (300,), 2, 64, 257, "fused_sm80", (None, (64,)), False),  # the portable set pinned
    (3, (4, 5, 6), 2, 128, 3, None, ((1, 4, 8), (1, 8, 8)), False),
    (3, (4, 5, 6), 2, 128, 3, None, ((2, 4, 8), None), True),
]


@pytest.mark.parametrize("rank,spatial,H,D,kernel,backend,bwd,atomic", DETERMINISM,
                         ids=[f"{c[0]}d-D{c[3]}-k{c[4]}-{c[5]}-{c[6]}" for c in DETERMINISM])
def test_deterministic_attribute_and_workspace(pretend_kernels, rank, spatial, H, D, kernel, backend, bwd, atomic):
    """deterministic_backward=False adds dQ in the Hopper kernel (deterministic 0, a workspace of
    B*N*H*(P+9) floats) only where the backward runs the Hopper kernels: never with a configuration
    only the portable set has (whatever the head dim, window or backend would pick), as
    _checks.fused_bwd_adds_dq says; deterministic_backward=True: always 1 and B*N*H floats. Each
    mode resolves the shapes against its own configurations."""
    pretend_kernels()
    fn = getattr(jax_na, f"na{rank}d")
    q = _arr((2, *spatial, H, D), jnp.bfloat16)
    rows = 2 * math.prod(spatial) * H
    window = kernel ** rank
    for det in (True, False):
        tiles = _resolve(rank, backend, *bwd, D=D, deterministic=det)
        P = _checks.fused_head_dim(D, D, jnp.bfloat16, backend or "fused", tiles.arch if tiles else 0)
        if not det:
            assert _checks.fused_bwd_adds_dq(jnp.bfloat16, P, window, backend or "fused", tiles) is atomic
        g = jax.grad(lambda q: jnp.sum(fn(q, q, q, kernel, backend=backend, deterministic_backward=det,
                                          backward_q_tile_shape=bwd[0], backward_kv_tile_shape=bwd[1])
                                       .astype(jnp.float32)))
        (line,) = _calls(_cuda_hlo(g, q), "jax_na_fused_bwd")
        on = atomic and not det
        assert _int_attr(line, "deterministic") == (0 if on else 1), (det, line)
        assert _workspace_elems(line) == (rows * (P + 9) if on else rows), (det, line)
        want = tiles or FusedTiles(_checks.FUSED_BACKENDS[backend or "fused"], 0, 0)
        assert _tile_attrs(line) == (want.arch, want.sm80, want.sm90), line


def test_no_hopper_no_atomics(pretend_kernels):
    """Without the Hopper kernels a Hopper-only backward configuration (lowered for another machine)
    stays deterministic (and small)."""
    pretend_kernels(hopper=False)
    q = _arr((1, 16, 8, 2, 128), jnp.bfloat16)
    g = jax.grad(lambda q: jnp.sum(jax_na.na2d(q, q, q, 3, deterministic_backward=False,
                                               backward_q_tile_shape=(8, 8)).astype(jnp.float32)))
    (line,) = _calls(_cuda_hlo(g, q), "jax_na_fused_bwd")
    assert _int_attr(line, "deterministic") == 1 and _workspace_elems(line) == 16 * 8 * 2, line
    assert _tile_attrs(line) == (90, -1, 0), line


@pytest.mark.parametrize("hopper,D,kernel,backend", [
    (False, 128, (7, 13, 13), None),          # no Hopper GPU (an A100): the portable kernels
    (True, 128, (7, 13, 13), "fused_sm80"),   # the portable set pinned
    (True, 64, (2, 11, 11), "fused"),         # head dim 64, 242 keys: auto's rule takes the portable set
])
def test_nondeterministic_choice_where_the_deterministic_kernels_run(pretend_kernels, hopper, D, kernel, backend):
    """Where a call asking for deterministic_backward=False runs the deterministic kernels, the Hopper
    index its chooser took from the non-deterministic kernel's list (longer in 3-D: p3-like windows
    take its third configuration) is not sent to the deterministic kernels, whose list has two: the
    default stands in, so the target accepts the call."""
    pretend_kernels(hopper=hopper)
    q = _arr((1, 16, 32, 32, 2, D), jnp.bfloat16)
    params = _checks.window_params(3, (16, 32, 32), kernel, 1, 1, False, head_dim=D)
    window = (params.kernel_size, params.stride, params.dilation, params.is_causal)
    spec = jax.ShapeDtypeStruct(q.shape, q.dtype)
    nd = _checks.bwd_tiles_args(3, spec, spec, backend or "auto", None, None, window, False)
    n_det = len(_checks.fused_bwd_tile_configs("sm90", jnp.bfloat16, D, 3, True))
    assert nd is not None and nd.sm90 >= n_det, nd   # what the lowering must not pass on
    g = jax.grad(lambda q: jnp.sum(jax_na.na3d(q, q, q, kernel, backend=backend, deterministic_backward=False)
                                   .astype(jnp.float32)))
    (line,) = _calls(_cuda_hlo(g, q), "jax_na_fused_bwd")
    assert _int_attr(line, "deterministic") == 1, line
    assert _tile_attrs(line) == (nd.arch, nd.sm80, 0), line


def test_fused_bwd_adds_dq(monkeypatch):
    """fused_bwd_adds_dq with a tile choice: False where the Hopper set has no configuration
    (tiles.sm90 < 0), else by tiles.arch (0: auto's rule; 90: always; 80: never)."""
    monkeypatch.setattr(ext, "has_hopper_kernels", lambda: True)
    f = _checks.fused_bwd_adds_dq
    bf = jnp.bfloat16
    assert f(bf, 128, 9, "fused") and f(bf, 128, 9, "fused", None)
    assert not f(bf, 128, 9, "fused", FusedTiles(80, 0, -1))
    assert not f(bf, 64, 300, "fused", FusedTiles(80, 1, -1))
    assert not f(bf, 128, 9, "fused_sm90", FusedTiles(80, 0, -1))   # the tiles say which set runs
    assert not f(bf, 128, 300, "fused", FusedTiles(0, 0, -1))        # no Hopper configuration, whatever the arch
    assert f(bf, 64, 9, "fused", FusedTiles(90, -1, 0))
    assert f(bf, 64, 9, "fused_sm90", FusedTiles(90, -1, 1))
    assert not f(bf, 64, 9, "fused", FusedTiles(0, 0, 0)) and f(bf, 64, 256, "fused", FusedTiles(0, 1, 1))
    assert f(bf, 128, 9, "fused", FusedTiles(0, 1, 1))
    assert not f(bf, 128, 9, "fused_sm80", FusedTiles(80, 1, -1))
    assert not f(jnp.float32, 128, 300, "fused", FusedTiles(0, 0, 0))
    assert not f(bf, 32, 300, "fused", FusedTiles(0, 0, 0))           # head dim 32: no Hopper kernels
    monkeypatch.setattr(ext, "has_hopper_kernels", lambda: False)
    assert not f(bf, 64, 9, "fused", FusedTiles(90, -1, 0))


# ----------------------------------------------------------------------------- same function on CPU

CPU_CASES = [
    Case((11, 13), (3, 7), stride=(1, 2), dilation=(2, 1), is_causal=(False, True), B=2, H=4, Hkv=2, D=16, Dv=16,
         Na=3),
    Case((5, 6, 7), (3, 5, 3), is_causal=(True, False, False), H=2, Hkv=1, D=16, Dv=16),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_same_gradients_on_the_reference(case, dtype):
    """backend None on CPU runs the reference, which ignores the backward shapes: for every listed
    backward configuration (and shapes given alone) the gradient program lowered for the CPU is the
    one without them and the gradients are bitwise those without them, which meet the float64
    oracle's bound."""
    rank = case.rank
    fn = helpers.na_fn(rank)
    seed = helpers.seed_of(case)
    cpu = jax.devices("cpu")[0]
    r = lambda x: None if x is None else jnp.asarray(x, dtype)
    inputs = [r(x) for x in helpers.rand_inputs(case, np.float64, seed=seed)]
    ct_o = r(helpers.rand_like((case.B, *case.spatial, case.H, case.Dv), seed + 1))
    ct_l = jnp.asarray(helpers.rand_like((case.B, *case.spatial, case.H), seed + 2), jnp.float32)
    args = jax.device_put([x for x in inputs if x is not None], cpu)

    def grad(**tiles):
        def loss(*a):
            extra = dict(additional_keys=a[3], additional_values=a[4]) if len(a) == 5 else {}
            out, lse = fn(*a[:3], **case.kwargs(), return_lse=True, **extra, **tiles)
            return jnp.sum(out.astype(jnp.float32) * ct_o.astype(jnp.float32)) + jnp.sum(lse * ct_l)
        return jax.grad(loss, argnums=tuple(range(len(args))))

    def cpu_text(f):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cpu",)).as_text()

    listed = jax_na.fused_tile_configs(rank, dtype, case.D, backward=True)
    union = list(dict.fromkeys(listed["fused_sm80"] + listed["fused_sm90"]))
    shapes = union + [(union[-1][0], None), (None, union[-1][1])]
    base = cpu_text(grad())
    assert "jax_na_" not in base
    for bq, bkv in shapes:
        assert cpu_text(grad(backward_q_tile_shape=bq, backward_kv_tile_shape=bkv)) == base, (bq, bkv)
    want = jax.jit(grad())(*args)
    for bq, bkv in (union[0], union[-1]):   # the portable default, and the last listed (16-bit: Hopper only)
        got = jax.jit(grad(backward_q_tile_shape=bq, backward_kv_tile_shape=bkv))(*args)
        assert len(got) == len(want) == (5 if case.Na else 3)
        for g, w in zip(got, want):
            assert g.dtype == jnp.dtype(dtype)
            np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)))
    f64 = [None if x is None else np.asarray(x.astype(jnp.float32), np.float64) for x in inputs]
    cts = (np.asarray(ct_o.astype(jnp.float32), np.float64), np.asarray(ct_l, np.float64))
    _, _, ref = helpers.dense_reference(case, f64, cts)
    tol = helpers.tol_for(dtype)
    for name, g, rg in zip(["dq", "dk", "dv", "d_add_k", "d_add_v"], want, ref):
        oracle.assert_close(np.asarray(g.astype(jnp.float32)), rg, tol, f"{name} {case.id}")


# ----------------------------------------------------------------------------- Flax

def _spy(monkeypatch, rank):
    """Records the keyword arguments of every functional.na{rank}d call (the layers look it up per call)."""
    calls = []
    real = getattr(functional, f"na{rank}d")

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(functional, f"na{rank}d", spy)
    return calls


@pytest.mark.parametrize("rank", RANKS)
def test_flax_layers_pass_the_fields(monkeypatch, rank):
    """NeighborhoodAttention{1,2,3}D take backward_q_tile_shape / backward_kv_tile_shape (None by
    default) and pass them to na{rank}d beside the forward's; the outputs and parameter gradients are
    those without them (the reference, on CPU)."""
    from jax_na import flax as naflax

    Layer = getattr(naflax, f"NeighborhoodAttention{rank}D")
    assert Layer(num_heads=2, kernel_size=3).backward_q_tile_shape is None
    assert Layer(num_heads=2, kernel_size=3).backward_kv_tile_shape is None
    spatial = (9, 7, 5)[:rank]
    x = _arr((1, *spatial, 32), jnp.float32, seed=rank)          # head dim 16 -> 64, float32: portable only
    bq, bkv = jax_na.fused_tile_configs(rank, "float32", 16, backward=True)["fused_sm80"][-1]
    fq, fkv = jax_na.fused_tile_configs(rank, "float32", 16)["fused_sm80"][0]
    calls = _spy(monkeypatch, rank)
    layer = Layer(num_heads=2, kernel_size=3, backward_q_tile_shape=bq, backward_kv_tile_shape=bkv,
                  q_tile_shape=fq, deterministic_backward=False)
    plain = Layer(num_heads=2, kernel_size=3)
    params = plain.init(jax.random.key(0), x)
    calls.clear()
    y = layer.apply(params, x)
    assert len(calls) == 1, calls
    kw = calls[0]
    assert kw["backward_q_tile_shape"] == bq and kw["backward_kv_tile_shape"] == bkv, kw
    assert kw["q_tile_shape"] == fq and kw["kv_tile_shape"] is None and kw["deterministic_backward"] is False, kw
    calls.clear()
    y0 = plain.apply(params, x)
    assert calls[0]["backward_q_tile_shape"] is None and calls[0]["backward_kv_tile_shape"] is None, calls
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
    g = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)
    g0 = jax.grad(lambda p: jnp.sum(plain.apply(p, x) ** 2))(params)
    np.testing.assert_array_equal(flat(g), flat(g0))
    # an uncompiled shape in a field: the functional's error, naming the field
    with pytest.raises(ValueError, match=f"{QN}") as ei:
        Layer(num_heads=2, kernel_size=3, backward_q_tile_shape=(3,) * rank).apply(params, x)
    assert "positive ints" in str(ei.value) or "allowed" in str(ei.value), str(ei.value)


@pytest.mark.parametrize("fields,named", [
    (dict(backward_q_tile_shape=(8, 8)), [QN]),
    (dict(backward_kv_tile_shape=(8, 8)), [KVN]),
    (dict(backward_q_tile_shape=(8, 8), backward_kv_tile_shape=(8, 8)), [QN, KVN]),
    (dict(q_tile_shape=(16, 8), backward_kv_tile_shape=(8, 8)), ["q_tile_shape", KVN]),
], ids=["bq", "bkv", "both", "fwd-and-bkv"])
def test_flax_rel_pos_bias_names_the_fields(fields, named):
    from jax_na.flax import NeighborhoodAttention2D

    x = _arr((1, 16, 8, 32), jnp.float32)
    layer = NeighborhoodAttention2D(num_heads=2, kernel_size=3, rel_pos_bias=True, **fields)
    with pytest.raises(ValueError) as ei:
        layer.init(jax.random.key(0), x)
    msg = str(ei.value)
    given = msg.split(" choose")[0]
    assert given == ", ".join(named), msg
    assert "rel_pos_bias" in msg, msg
    # without the fields the layer runs
    y = NeighborhoodAttention2D(num_heads=2, kernel_size=3, rel_pos_bias=True).init_with_output(
        jax.random.key(0), x)[0]
    assert y.shape == x.shape


# (the extension's list against the table: test_tiles.py's test_extension_tile_configs_equal_the_table)
