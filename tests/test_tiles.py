"""The fused forward's tile configurations (q_tile_shape / kv_tile_shape of na1d/na2d/na3d), on CPU:
the public listing (jax_na.fused_tile_configs) against the table (_checks.FUSED_FWD_TILES), how a
call's shapes resolve to the FFI attributes (_checks.fwd_tiles_args), the errors, that other
backends compute the same function with them, the attributes of the CUDA lowering, and (in builds
with the fused kernels) that the extension's compiled list agrees with the table."""

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
from jax_na import _checks
from jax_na._checks import FusedTiles

RANKS = (1, 2, 3)
HALF = ("float16", "bfloat16")
DTYPES = HALF + ("float32",)
# The default shapes (configuration 0) per kernel set and rank, as documented in cuda/fused/tile_shapes.cuh
# (16-bit at head dims up to 128; float32 and head dim 256 run the portable kernels' 2x8x8 in 3-D).
DEFAULT_Q = {"fused_sm80": {1: (128,), 2: (16, 8), 3: (4, 4, 8)},
             "fused_sm90": {1: (128,), 2: (16, 8), 3: (4, 4, 8)}}


def _arr(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _spec(rank, dtype="bfloat16", D=128, Dv=None):
    """query / value stand-ins for fwd_tiles_args (it reads only shape and dtype)."""
    q = jax.ShapeDtypeStruct((1, *(8,) * rank, 2, D), jnp.dtype(dtype))
    v = jax.ShapeDtypeStruct((1, *(8,) * rank, 2, D if Dv is None else Dv), jnp.dtype(dtype))
    return q, v


def _on_cpu(*xs):
    """The arrays committed to the CPU: computations on them run the reference (also on a GPU machine,
    where auto would run the fused kernels, whose configurations need not agree bitwise)."""
    return jax.device_put(xs, jax.devices("cpu")[0])


_expect = helpers.expect_error


# ----------------------------------------------------------------------------- the listing

@pytest.mark.parametrize("rank", RANKS)
def test_listing_equals_the_table(rank):
    """fused_tile_configs(rank, dtype, head_dim) is the table's entries: the narrow lists for 16-bit
    at head dims <= 128 (both sets; the portable set's "narrow32" list at head dims <= 32: the narrow
    one plus 64-query tiles in 1-D and 2-D), the wide list for float32 and head dims 129..256
    (portable only, one configuration, an empty Hopper list)."""
    T = _checks.FUSED_FWD_TILES
    for dtype in DTYPES:
        for head_dim in (1, 8, 32, 33, 64, 65, 100, 128, 129, 200, 256):
            if dtype == "float32" and head_dim > 128:
                continue
            got = jax_na.fused_tile_configs(rank, dtype, head_dim)
            assert set(got) == {"fused_sm80", "fused_sm90"}, got
            assert all(isinstance(v, list) for v in got.values()), got
            wide = dtype == "float32" or head_dim > 128
            kind = "wide" if wide else ("narrow32" if head_dim <= 32 else "narrow")
            assert got["fused_sm80"] == list(T[("sm80", kind)][rank]), (dtype, head_dim)
            if kind == "narrow32":
                small = [c for c in T[("sm80", kind)][rank] if math.prod(c[0]) == 64]
                assert got["fused_sm80"] == list(T[("sm80", "narrow")][rank]) + small, got
                assert len(small) == (rank < 3), small
            assert got["fused_sm90"] == ([] if wide else list(T[("sm90", "narrow")][rank])), (dtype, head_dim)
            if wide:
                assert len(got["fused_sm80"]) == 1, got
            else:
                assert got["fused_sm90"], (dtype, head_dim)
            # jnp dtypes and numpy dtypes name the same thing
            assert jax_na.fused_tile_configs(rank, jnp.dtype(dtype), head_dim) == got
    # the default arguments: bfloat16 at head dim 128
    assert jax_na.fused_tile_configs(rank) == jax_na.fused_tile_configs(rank, "bfloat16", 128)
    assert jax_na.fused_tile_configs(rank, jnp.bfloat16, 64) == jax_na.fused_tile_configs(rank, "bfloat16", 128)


@pytest.mark.parametrize("rank", RANKS)
def test_listing_shapes(rank):
    """Every configuration: rank extents per tile, powers of two, 128 queries per Q tile (64 for the
    last portable one at 16-bit head dim 32 in 1-D and 2-D: warp boxes as the others'); 64-key KV
    tiles on the portable narrow set, 32 on the wide one, 64 or 128 on the Hopper set; no duplicate;
    the documented default first."""
    for dtype, head_dim in (("bfloat16", 128), ("float16", 64), ("float32", 64), ("bfloat16", 256),
                            ("bfloat16", 32), ("float32", 32)):
        wide = dtype == "float32" or head_dim > 128
        got = jax_na.fused_tile_configs(rank, dtype, head_dim)
        for backend, configs in got.items():
            helpers.check_tile_listing(configs, rank)
            for q, kv in configs:
                small = backend == "fused_sm80" and not wide and head_dim <= 32 and rank < 3 and (q, kv) == configs[-1]
                assert math.prod(q) == (64 if small else 128), (q, head_dim)
                keys = math.prod(kv)
                if backend == "fused_sm80":
                    assert keys == (32 if wide else 64), (dtype, head_dim, kv)
                else:
                    assert keys in (64, 128), kv
            if configs:
                want = (2, 8, 8) if wide and rank == 3 else DEFAULT_Q[backend][rank]
                assert configs[0][0] == want, (backend, configs)
    assert jax_na.fused_tile_configs(2)["fused_sm80"][0] == ((16, 8), (8, 8))   # the docstring's example
    assert jax_na.fused_tile_configs(1)["fused_sm90"][0] == ((128,), (128,))


@pytest.mark.parametrize("call,name,exc", [
    (lambda bw: jax_na.fused_tile_configs(0, backward=bw), "rank", ValueError),
    (lambda bw: jax_na.fused_tile_configs(4, backward=bw), "rank", ValueError),
    (lambda bw: jax_na.fused_tile_configs("2", backward=bw), "rank", ValueError),
    (lambda bw: jax_na.fused_tile_configs(2, "int32", backward=bw), "dtype", TypeError),
    (lambda bw: jax_na.fused_tile_configs(2, jnp.float64, backward=bw), "dtype", TypeError),
    (lambda bw: jax_na.fused_tile_configs(2, "bfloat16", 0, backward=bw), "head_dim", ValueError),
    (lambda bw: jax_na.fused_tile_configs(2, "bfloat16", 257, backward=bw), "head_dim", ValueError),
    (lambda bw: jax_na.fused_tile_configs(2, "float32", 129, backward=bw), "head_dim", ValueError),
    (lambda bw: jax_na.fused_tile_configs(2, "float16", 64.0, backward=bw), "head_dim", ValueError),
], ids=["rank0", "rank4", "rank-str", "int32", "float64", "D0", "D257", "f32-D129", "D-float"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_listing_bad_arguments(call, name, exc, backward):
    with pytest.raises(exc) as ei:
        call(backward)
    assert name in str(ei.value), str(ei.value)


# ----------------------------------------------------------------------------- resolution

def _resolve(rank, backend, q=None, kv=None, dtype="bfloat16", D=128):
    query, value = _spec(rank, dtype, D)
    return _checks.fwd_tiles_args(rank, query, value, backend, q, kv)


# (rank, q_tile_shape, kv_tile_shape) -> FusedTiles(arch, sm80, sm90) in bfloat16 at head dim 128.
RESOLVED = [
    # both kernel sets have it: arch 0 (the FFI target picks the set), both indices
    (2, (16, 8), None, FusedTiles(0, 0, 0)),
    (2, (8, 16), None, FusedTiles(0, 1, 1)),
    (3, (2, 8, 8), None, FusedTiles(0, 1, 1)),
    (3, (4, 4, 8), None, FusedTiles(0, 0, 0)),
    (3, (4, 4, 8), (2, 8, 4), FusedTiles(0, 0, 2)),
    (3, None, (2, 8, 4), FusedTiles(0, 0, 2)),
    (1, 128, None, FusedTiles(0, 0, 0)),
    # Hopper only: arch 90, no portable configuration
    (2, (16, 8), (16, 8), FusedTiles(90, -1, 0)),
    (2, (8, 16), (8, 16), FusedTiles(90, -1, 1)),
    (2, None, (8, 16), FusedTiles(90, -1, 1)),
    (3, (4, 4, 8), (2, 8, 8), FusedTiles(90, -1, 0)),
    (3, (2, 8, 8), (2, 8, 8), FusedTiles(90, -1, 1)),
    (3, None, (2, 8, 8), FusedTiles(90, -1, 0)),
    (1, None, (128,), FusedTiles(90, -1, 0)),
    # portable only: arch 80
    (2, (16, 8), (8, 8), FusedTiles(80, 0, -1)),
    (2, (8, 16), (8, 8), FusedTiles(80, 1, -1)),
    (2, None, (8, 8), FusedTiles(80, 0, -1)),      # kv alone: the first configuration that has it
    (3, (2, 8, 8), (4, 4, 4), FusedTiles(80, 1, -1)),
    (3, None, (4, 4, 4), FusedTiles(80, 1, -1)),
    (1, None, 64, FusedTiles(80, 0, -1)),
    (1, (128,), (64,), FusedTiles(80, 0, -1)),
]


@pytest.mark.parametrize("backend", ["auto", "fused"])
@pytest.mark.parametrize("rank,q,kv,want", RESOLVED, ids=[f"{r}d-{q}-{kv}" for r, q, kv, _ in RESOLVED])
def test_resolution(rank, q, kv, want, backend, any_gpu):
    assert _resolve(rank, backend, q, kv) == want


@pytest.mark.parametrize("backend", ["auto", "fused", "fused_sm80", "fused_sm90"])
def test_no_tile_shapes_resolve_to_none(backend):
    for rank in RANKS:
        assert _resolve(rank, backend) is None


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype,D", [("bfloat16", 128), ("float16", 64), ("float32", 128), ("bfloat16", 200)])
def test_resolution_of_every_listed_configuration(rank, dtype, D, any_gpu):
    """Every configuration of the listing, given whole, resolves to its index in each set that has
    it (-1 in the other) and to the arch of the one set that has it (0 where both do); pinned to one
    set, to that set's index with the other -1."""
    got = jax_na.fused_tile_configs(rank, dtype, D)
    s80, s90 = got["fused_sm80"], got["fused_sm90"]
    for cfg in dict.fromkeys(s80 + s90):
        i80 = s80.index(cfg) if cfg in s80 else -1
        i90 = s90.index(cfg) if cfg in s90 else -1
        arch = 0 if i80 >= 0 and i90 >= 0 else (80 if i80 >= 0 else 90)
        assert _resolve(rank, "auto", *cfg, dtype=dtype, D=D) == FusedTiles(arch, i80, i90), cfg
        for backend, idx, own in (("fused_sm80", i80, 80), ("fused_sm90", i90, 90)):
            if backend == "fused_sm90" and (dtype == "float32" or D > 128):
                continue   # no Hopper kernel (resolve_backend / the head-dim check reject the call first)
            if idx >= 0:
                want = FusedTiles(own, idx if own == 80 else -1, idx if own == 90 else -1)
                assert _resolve(rank, backend, *cfg, dtype=dtype, D=D) == want, (backend, cfg)
            else:
                with pytest.raises(ValueError, match="allowed"):
                    _resolve(rank, backend, *cfg, dtype=dtype, D=D)


def test_pinned_kernel_sets(any_gpu):
    """fused_sm80 / fused_sm90 resolve against their own list only (arch pinned, the other index -1);
    a shape only the other set has is a ValueError listing this set's shapes."""
    assert _resolve(2, "fused_sm80", (16, 8)) == FusedTiles(80, 0, -1)
    assert _resolve(2, "fused_sm80", (8, 16)) == FusedTiles(80, 1, -1)
    assert _resolve(2, "fused_sm90", (8, 16)) == FusedTiles(90, -1, 1)
    assert _resolve(3, "fused_sm90", (4, 4, 8)) == FusedTiles(90, -1, 0)
    assert _resolve(3, "fused_sm80", (4, 4, 8)) == FusedTiles(80, 0, -1)
    assert _resolve(3, "fused_sm90", None, (2, 8, 8)) == FusedTiles(90, -1, 0)
    assert _resolve(3, "fused_sm90", (4, 4, 8), (2, 8, 4)) == FusedTiles(90, -1, 2)
    with pytest.raises(ValueError) as ei:
        _resolve(2, "fused_sm80", (16, 8), (16, 8))          # Hopper only
    msg = str(ei.value)
    assert "allowed" in msg and "(16, 8) with (8, 8)" in msg and "(8, 16) with (8, 8)" in msg, msg
    assert "Hopper" not in msg and "(16, 8) with (16, 8)" not in msg, msg
    assert "q_tile_shape=(16, 8)" in msg and "kv_tile_shape=(16, 8)" in msg and "fused_sm80" in msg, msg
    with pytest.raises(ValueError) as ei:
        _resolve(3, "fused_sm90", (2, 8, 8), (4, 4, 4))      # portable only
    msg = str(ei.value)
    assert "(4, 4, 8) with (2, 8, 8)" in msg and "(2, 8, 8) with (2, 8, 8)" in msg, msg
    assert "(4, 4, 8) with (2, 8, 4)" in msg, msg
    assert "portable" not in msg and "(4, 4, 4)" in msg.split("allowed")[0], msg
    # float32 and head dim 256: the portable set's single configuration, no Hopper one
    assert _resolve(2, "auto", (16, 8), dtype="float32") == FusedTiles(80, 0, -1)
    assert _resolve(3, "fused", None, (2, 4, 4), D=256) == FusedTiles(80, 0, -1)
    with pytest.raises(ValueError, match="allowed"):
        _resolve(2, "auto", (16, 8), (16, 8), dtype="float32")
    with pytest.raises(ValueError, match="allowed"):
        _resolve(2, "auto", (8, 16), D=256)


def test_attention_args_stores_the_tiles(any_gpu):
    """attention_args puts the resolved choice in NAParams.fwd_tiles (None without tile shapes); the
    reference backend (and its result) never sees anything else. (32 x 32 with a 3 x 3 window: the
    chooser keeps the default tiles of both sets.)"""
    q = _arr((1, 32, 32, 2, 64), jnp.bfloat16)
    common = (3, 1, 1, False, None, None, None, None)
    params, backend = _checks.attention_args(2, q, q, q, *common, (8, 16), (8, 16))
    assert backend == "auto" and params.fwd_tiles == FusedTiles(90, -1, 1)
    params0, _ = _checks.attention_args(2, q, q, q, *common)
    assert params0.fwd_tiles is None
    assert params0 == dataclasses.replace(params, fwd_tiles=None)
    assert hash(params) != hash(params0)   # a static argument of the primitives: a distinct one


# ----------------------------------------------------------------------------- errors, public API

Q2 = _arr((1, 16, 8, 2, 64), jnp.bfloat16)
Q2F = _arr((1, 16, 8, 2, 8), jnp.float32)
Q3 = _arr((1, 4, 5, 6, 2, 64), jnp.bfloat16)
Q1 = _arr((1, 12, 2, 64), jnp.bfloat16)


@pytest.mark.parametrize("name", ["q_tile_shape", "kv_tile_shape", "backward_q_tile_shape", "backward_kv_tile_shape"])
@pytest.mark.parametrize("bad", [(16,), (16, 8, 1), 16, (16.0, 8), (True, 8), (np.bool_(True), 8), (0, 8),
                                 (16, -8), "16x8", [16, None], (16, 8.5)],
                         ids=["1-extent", "3-extents", "int-for-2d", "float", "bool", "np-bool", "zero",
                              "negative", "str", "None-extent", "half"])
@pytest.mark.parametrize("q", [Q2, Q2F], ids=["bf16", "f32"])
def test_bad_extents(q, bad, name):
    """A malformed shape: a ValueError naming the argument (a backward one never by the forward's
    name alone) and the value."""
    msg = _expect(lambda: jax_na.na2d(q, q, q, 3, **{name: bad}), name)
    assert "2 positive ints" in msg and repr(bad) in msg, msg
    if name.startswith("backward_"):
        assert not re.search(r"(?<!backward_)\b(q|kv)_tile_shape", msg), msg


def test_bad_extents_other_ranks():
    _expect(lambda: jax_na.na3d(Q3, Q3, Q3, 3, q_tile_shape=(2, 8)), "q_tile_shape")
    _expect(lambda: jax_na.na3d(Q3, Q3, Q3, 3, kv_tile_shape=(2, 8, 0)), "kv_tile_shape")
    _expect(lambda: jax_na.na1d(Q1, Q1, Q1, 3, q_tile_shape=(128, 1)), "q_tile_shape")
    _expect(lambda: jax_na.na1d(Q1, Q1, Q1, 3, kv_tile_shape=True), "kv_tile_shape")
    _expect(lambda: jax_na.na1d(Q1, Q1, Q1, 3, kv_tile_shape=0), "kv_tile_shape")
    # the valid shape is checked too when the other is bad
    _expect(lambda: jax_na.na2d(Q2, Q2, Q2, 3, q_tile_shape=(16, 8), kv_tile_shape=(8,)), "kv_tile_shape")


def test_uncompiled_shapes():
    """A shape no compiled configuration has: a ValueError listing the allowed configurations of the
    dtype's kernel sets (bfloat16: both; float32: the portable one)."""
    msg = _expect(lambda: jax_na.na2d(Q2, Q2, Q2, 3, q_tile_shape=(32, 4)), ["q_tile_shape", "allowed"])
    for q, kv in jax_na.fused_tile_configs(2, "bfloat16", 64)["fused_sm80"] + \
            jax_na.fused_tile_configs(2, "bfloat16", 64)["fused_sm90"]:
        assert f"{q} with {kv}" in msg, msg
    assert "portable" in msg and "Hopper" in msg and "bfloat16" in msg and "head dim 64" in msg, msg
    # each shape exists, but not together
    msg = _expect(lambda: jax_na.na2d(Q2, Q2, Q2, 3, q_tile_shape=(8, 16), kv_tile_shape=(16, 8)),
                  ["q_tile_shape=(8, 16)", "kv_tile_shape=(16, 8)", "allowed"])
    # float32 (head dim 8 -> 64): the wide portable configuration only
    msg = _expect(lambda: jax_na.na2d(Q2F, Q2F, Q2F, 3, q_tile_shape=(8, 16)), ["allowed", "float32"])
    assert "(16, 8) with (4, 8)" in msg and "Hopper" not in msg, msg
    msg = _expect(lambda: jax_na.na2d(Q2F, Q2F, Q2F, 3, kv_tile_shape=(8, 8)), ["kv_tile_shape", "allowed"])
    _expect(lambda: jax_na.na3d(Q3, Q3, Q3, 3, q_tile_shape=(16, 4, 2)), ["q_tile_shape", "allowed", "(2, 8, 8)"])
    _expect(lambda: jax_na.na1d(Q1, Q1, Q1, 3, q_tile_shape=64), ["q_tile_shape", "allowed", "(128,)"])
    _expect(lambda: jax_na.na1d(Q1, Q1, Q1, 3, kv_tile_shape=(32,)), ["kv_tile_shape", "allowed"])


@pytest.mark.parametrize("name", ["q_tile_shape", "kv_tile_shape"])
def test_tiles_with_the_reference_backend(name):
    shape = {"q_tile_shape": (16, 8), "kv_tile_shape": (8, 8)}[name]
    for q in (Q2, Q2F):
        msg = _expect(lambda: jax_na.na2d(q, q, q, 3, backend="reference", **{name: shape}), name)
        assert "'reference'" in msg and "fused" in msg, msg


@pytest.mark.parametrize("backend", ["gemm", "naive"])
@pytest.mark.parametrize("name", ["q_tile_shape", "kv_tile_shape", "backward_q_tile_shape", "backward_kv_tile_shape"])
def test_tiles_with_the_unfused_kernel_backends(monkeypatch, backend, name):
    """gemm / naive have no tiles to choose (forward or backward): a ValueError naming the argument
    and the backend before anything is traced (pretending the kernels were compiled, so that the
    backend itself resolves)."""
    shape = {"q_tile_shape": (16, 8), "kv_tile_shape": (8, 8), "backward_q_tile_shape": (8, 8),
             "backward_kv_tile_shape": (8, 8)}[name]
    monkeypatch.setattr(ext, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(ext, "has_target", lambda target: True)
    for q in (Q2, Q2F):
        msg = _expect(lambda: jax_na.na2d(q, q, q, 3, backend=backend, **{name: shape}), name, jit=False)
        assert repr(backend) in msg, msg
    # and the same through fwd_tiles_args / bwd_tiles_args directly (no pretending needed)
    monkeypatch.undo()
    query, value = _spec(2)
    tiles_args = _checks.bwd_tiles_args if name.startswith("backward_") else _checks.fwd_tiles_args
    with pytest.raises(ValueError, match=name):
        tiles_args(2, query, value, backend, *((shape, None) if name.endswith("q_tile_shape") else (None, shape)))
    assert tiles_args(2, query, value, backend, None, None) is None  # without shapes: nothing to check


@pytest.mark.parametrize("rank,q,kv", [(2, (16, 8), (16, 8)), (3, None, (2, 8, 8)), (1, 128, 128)])
def test_hopper_only_needs_hopper(monkeypatch, rank, q, kv):
    """On a GPU without the Hopper kernels (e.g. an A100), a configuration only they have is a
    ValueError listing what runs there; without a GPU it resolves (the call then runs the reference,
    or is lowered for a Hopper GPU elsewhere)."""
    monkeypatch.setattr(ext, "has_hopper_kernels", lambda: False)
    monkeypatch.setattr(ext, "has_cuda_device", lambda: True)
    with pytest.raises(ValueError) as ei:
        _resolve(rank, "auto", q, kv)
    msg = str(ei.value)
    assert "Hopper" in msg and "allowed here" in msg and "portable (fused_sm80)" in msg, msg
    configs = jax_na.fused_tile_configs(rank)
    portable_only = next(kv for _, kv in configs["fused_sm80"] if kv not in [c[1] for c in configs["fused_sm90"]])
    assert _resolve(rank, "auto", None, portable_only).arch == 80
    monkeypatch.setattr(ext, "has_cuda_device", lambda: False)
    assert _resolve(rank, "auto", q, kv).arch == 90


def test_rank_1_int_extent(any_gpu):
    """For na1d an int is a one-extent tile shape (numpy ints too); bools are not."""
    assert _resolve(1, "auto", 128, 64) == _resolve(1, "auto", (128,), (64,)) == FusedTiles(80, 0, -1)
    assert _resolve(1, "auto", np.int64(128), None) == _resolve(1, "auto", [128], None) == FusedTiles(0, 0, 0)
    (q,) = _on_cpu(Q1)
    out = jax_na.na1d(q, q, q, 3, q_tile_shape=128, kv_tile_shape=128)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(jax_na.na1d(q, q, q, 3), np.float32))
    with pytest.raises(ValueError, match="q_tile_shape"):
        _resolve(1, "auto", True, None)


# ----------------------------------------------------------------------------- same function elsewhere

def _same_function_inputs(rank, dtype):
    r = np.random.default_rng(3)
    mk = lambda *s: jnp.asarray(r.standard_normal(s), dtype)
    if rank == 2:
        S, kw = (11, 13), dict(kernel_size=(3, 7), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))
    else:
        S, kw = (5, 6, 7), dict(kernel_size=(3, 5, 3), is_causal=(True, False, False))
    q, k, v, ak, av = mk(2, *S, 4, 16), mk(2, *S, 2, 16), mk(2, *S, 2, 16), mk(2, 3, 2, 16), mk(2, 3, 2, 16)
    return (q, k, v), dict(kw, additional_keys=ak, additional_values=av, return_lse=True)


@pytest.mark.parametrize("rank,dtype", [(2, jnp.bfloat16), (3, jnp.bfloat16), (2, jnp.float32)],
                         ids=["2d-bf16", "3d-bf16", "2d-f32"])
def test_same_result_without_fused_kernels(rank, dtype):
    """On CPU (auto: the reference) a valid tile shape changes nothing (a configuration only one set
    has, a Q or KV shape given alone): the forward and its gradient lower to the same CPU program as
    without it, and out / lse are bitwise the same."""
    fn = {2: jax_na.na2d, 3: jax_na.na3d}[rank]
    args, kw = _same_function_inputs(rank, dtype)
    args = _on_cpu(*args)

    def fwd(**tiles):
        return lambda *a: fn(*a, **kw, **tiles)

    def grad(**tiles):
        return jax.grad(lambda *a: jnp.sum(fwd(**tiles)(*a)[0].astype(jnp.float32) ** 2), argnums=(0, 1, 2))

    def cpu_text(f):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cpu",)).as_text()

    listed = jax_na.fused_tile_configs(rank, dtype, 16)
    if dtype == jnp.float32:
        assert listed["fused_sm90"] == [] and len(listed["fused_sm80"]) == 1, listed
        shapes = [listed["fused_sm80"][0], (None, listed["fused_sm80"][0][1])]
    else:
        sm80, sm90 = listed["fused_sm80"], listed["fused_sm90"]
        shapes = [next(c for c in sm90 if c not in sm80), (sm80[-1][0], None), (None, sm80[-1][1])]
    base_fwd, base_grad = cpu_text(fwd()), cpu_text(grad())
    assert "jax_na_" not in base_fwd + base_grad
    for q_shape, kv_shape in shapes:
        t = dict(q_tile_shape=q_shape, kv_tile_shape=kv_shape)
        assert cpu_text(fwd(**t)) == base_fwd, t
        assert cpu_text(grad(**t)) == base_grad, t
    out, lse = jax.jit(fwd())(*args)
    assert out.dtype == jnp.dtype(dtype) and lse.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))) and bool(jnp.all(jnp.isfinite(lse)))
    got_out, got_lse = jax.jit(fwd(q_tile_shape=shapes[0][0], kv_tile_shape=shapes[0][1]))(*args)
    np.testing.assert_array_equal(np.asarray(got_out, np.float32), np.asarray(out, np.float32))
    np.testing.assert_array_equal(np.asarray(got_lse), np.asarray(lse))


# ----------------------------------------------------------------------------- CUDA lowering

_cuda_hlo, _calls, _int_attr = helpers.cuda_hlo, helpers.custom_calls, helpers.int_attr


def _check_tile_attributes():
    """The jax_na_fused_fwd call carries arch / tiles_sm80 / tiles_sm90 as resolved; the backward
    keeps its own tiles (no tile attributes) and the backend's arch."""
    r = np.random.default_rng(0)
    mk = lambda *s: jnp.asarray(r.standard_normal(s), jnp.bfloat16)
    q2, k2 = mk(1, 32, 32, 4, 64), mk(1, 32, 32, 2, 64)  # the chooser keeps the defaults
    q3, k3 = mk(1, 4, 5, 6, 2, 128), mk(1, 4, 5, 6, 2, 128)
    q1 = mk(2, 20, 2, 64)
    cases = [
        # (fn, q, k, backend, q_tile_shape, kv_tile_shape, (arch, tiles_sm80, tiles_sm90))
        (jax_na.na2d, q2, k2, None, None, None, (0, 0, 0)),
        (jax_na.na2d, q2, k2, "fused", None, None, (0, 0, 0)),
        (jax_na.na2d, q2, k2, "fused_sm80", None, None, (80, 0, 0)),
        (jax_na.na2d, q2, k2, "fused_sm90", None, None, (90, 0, 0)),
        (jax_na.na2d, q2, k2, None, (8, 16), None, (0, 1, 1)),
        (jax_na.na2d, q2, k2, None, (16, 8), (16, 8), (90, -1, 0)),
        (jax_na.na2d, q2, k2, "fused", None, (8, 16), (90, -1, 1)),
        (jax_na.na2d, q2, k2, None, (8, 16), (8, 8), (80, 1, -1)),
        (jax_na.na2d, q2, k2, "fused_sm80", (8, 16), None, (80, 1, -1)),
        (jax_na.na2d, q2, k2, "fused_sm90", (8, 16), None, (90, -1, 1)),
        (jax_na.na3d, q3, k3, None, (2, 8, 8), None, (0, 1, 1)),
        (jax_na.na3d, q3, k3, None, (2, 8, 8), (2, 8, 8), (90, -1, 1)),
        (jax_na.na3d, q3, k3, "fused_sm80", (4, 4, 8), None, (80, 0, -1)),
        (jax_na.na1d, q1, q1, None, 128, 64, (80, 0, -1)),
        (jax_na.na1d, q1, q1, None, None, 128, (90, -1, 0)),
    ]
    for fn, q, k, backend, qt, kvt, want in cases:
        f = lambda q, k: fn(q, k, k, 3, backend=backend, q_tile_shape=qt, kv_tile_shape=kvt, return_lse=True)
        text = _cuda_hlo(f, q, k)
        calls = _calls(text, "jax_na_fused_fwd")
        assert len(calls) == 1, text
        got = tuple(_int_attr(calls[0], a) for a in ("arch", "tiles_sm80", "tiles_sm90"))
        assert got == want, (fn.__name__, backend, qt, kvt, got, calls[0])
        # the backward: its own tiles (the defaults), the backend's arch
        loss = lambda q, k: jnp.sum(f(q, k)[0].astype(jnp.float32))
        text = _cuda_hlo(jax.grad(loss, argnums=(0, 1)), q, k)
        fwd, bwd = _calls(text, "jax_na_fused_fwd"), _calls(text, "jax_na_fused_bwd")
        assert len(fwd) == 1 and len(bwd) == 1, text
        assert tuple(_int_attr(fwd[0], a) for a in ("arch", "tiles_sm80", "tiles_sm90")) == want, fwd[0]
        # (the backward's tile shapes are separate arguments: tests/test_bwd_tiles.py)
        arch = _checks.FUSED_BACKENDS.get(backend or "fused")
        assert tuple(_int_attr(bwd[0], a) for a in ("arch", "tiles_sm80", "tiles_sm90")) == (arch, 0, 0), bwd[0]
    # float32 (head dim 8 -> 64): the portable set only
    qf = jnp.asarray(r.standard_normal((1, 16, 8, 2, 8)), jnp.float32)
    line = _calls(_cuda_hlo(lambda q: jax_na.na2d(q, q, q, 3, q_tile_shape=(16, 8)), qf), "jax_na_fused_fwd")[0]
    assert tuple(_int_attr(line, a) for a in ("arch", "tiles_sm80", "tiles_sm90")) == (80, 0, -1), line
    # head dim 16: padded to 32 for the portable kernels; with a configuration only the Hopper set
    # has, to 64 (that set's smallest) under arch 90
    qs = mk(1, 16, 8, 2, 16)
    line = _calls(_cuda_hlo(lambda q: jax_na.na2d(q, q, q, 3), qs), "jax_na_fused_fwd")[0]
    assert "x32xbf16>" in line and "x64xbf16>" not in line, line
    line = _calls(_cuda_hlo(lambda q: jax_na.na2d(q, q, q, 3, q_tile_shape=(16, 8), kv_tile_shape=(16, 8)), qs),
                  "jax_na_fused_fwd")[0]
    assert tuple(_int_attr(line, a) for a in ("arch", "tiles_sm80", "tiles_sm90")) == (90, -1, 0), line
    assert "x64xbf16>" in line and "x32xbf16>" not in line, line
    # the reference, lowered for the CPU, ignores them
    text = jax.jit(lambda q: jax_na.na2d(q, q, q, 3, q_tile_shape=(8, 16))).trace(q2).lower(
        lowering_platforms=("cpu",)).as_text()
    assert "jax_na_" not in text and "tiles_sm" not in text


@pytest.mark.parametrize("kernels", ["built", "pretended"])
def test_cuda_lowering_tile_attributes(monkeypatch, kernels):
    """The attributes on this build ("built", where it has the fused kernels) and on any build,
    pretending the kernels were compiled (lowering needs only the target names)."""
    if kernels == "built" and not ext.has_target("jax_na_fused_fwd"):
        pytest.skip("jax_na built without the fused kernels (no jax_na_fused_fwd target)")
    if kernels == "pretended":
        monkeypatch.setattr(ext, "has_cuda_kernels", lambda: True)
        monkeypatch.setattr(ext, "has_target", lambda name: True)
    # backend "fused_sm90" needs a compute capability 9.0 GPU to resolve; lowering it needs none
    monkeypatch.setattr(ext, "has_hopper_kernels", lambda: True)
    jax.clear_caches()
    try:
        _check_tile_attributes()
    finally:
        monkeypatch.undo()
        jax.clear_caches()


# ----------------------------------------------------------------------------- the extension's list

@pytest.mark.skipif(not ext.has_fused_kernels(), reason="jax_na built without the fused kernels")
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_extension_tile_configs_equal_the_table(backward):
    """jax_na._C.fused_fwd_tile_configs / fused_bwd_tile_configs (from cuda/fused/tile_shapes.cuh, the
    instantiated kernels) list exactly the Python table's configurations, in order, for both kernel
    sets; the Hopper set has none for float32 and head dims 32 and 256 (fused_sm90 runs head dims up to
    32 padded to 64), nothing has float32 at head dims 32 (run padded to 64: the Python listing at 32
    is the extension's at 64) and 256; the backward's lists are not the forward's. The extension's
    default backward list is the deterministic mode's (na*d's default at head dim 128 is not)."""
    C = ext._C
    listed = C.fused_bwd_tile_configs if backward else C.fused_fwd_tile_configs
    for arch, backend in ((80, "fused_sm80"), (90, "fused_sm90")):
        for dtype in DTYPES:
            for D in (32, 64, 128, 256):
                for rank in RANKS:
                    got = [(tuple(q), tuple(kv)) for q, kv in listed(arch, dtype, D, rank)]
                    if dtype == "float32" and D == 32 and arch == 80:
                        padded = [(tuple(q), tuple(kv)) for q, kv in listed(arch, dtype, 64, rank)]
                        assert padded == jax_na.fused_tile_configs(rank, dtype, D, backward=backward, deterministic_backward=True)[backend]
                    if (dtype == "float32" and D in (32, 256)) or (arch == 90 and D == 32):
                        want = []
                    else:
                        want = jax_na.fused_tile_configs(rank, dtype, D, backward=backward, deterministic_backward=True)[backend]
                        assert want or arch == 90, (dtype, D, rank)
                    if arch == 90 and (dtype == "float32" or D in (32, 256)):
                        assert want == [], (dtype, D, rank, want)
                    assert got == want, (arch, dtype, D, rank, got, want)
                    if backward and want:
                        fwd = [(tuple(q), tuple(kv)) for q, kv in C.fused_fwd_tile_configs(arch, dtype, D, rank)]
                        assert fwd != got, (arch, dtype, D, rank)
                    if backward:  # the non-deterministic mode's (the Hopper set's 128-key kernel)
                        nd = [(tuple(q), tuple(kv)) for q, kv in listed(arch, dtype, D, rank, deterministic=False)]
                        want_nd = [] if not want else jax_na.fused_tile_configs(
                            rank, dtype, D, backward=True, deterministic_backward=False)[backend]
                        assert nd == want_nd, (arch, dtype, D, rank, nd, want_nd)
    # no other kernel set or dtype
    assert list(listed(0, "bfloat16", 128, 2)) == []
    assert list(listed(75, "bfloat16", 128, 2)) == []
    assert list(listed(80, "float64", 128, 2)) == []


@pytest.mark.skipif(not ext.has_fused_kernels(), reason="jax_na built without the fused kernels")
def test_extension_warp_boxes_equal_the_model():
    """jax_na._C.fused_fwd_warp_tiles lists each portable forward configuration's warp box: the tile
    model's unit (tile_model.portable_unit) at _checks.portable_fwd_warp_rows' 16 or 32 queries."""
    from jax_na import tile_model
    C = ext._C
    for dtype in DTYPES:
        for D in (32, 64, 128, 256):
            for rank in RANKS:
                if dtype == "float32" and D in (32, 256):
                    continue
                configs = _checks.fused_fwd_tile_configs("sm80", dtype, D, rank)
                rows = _checks.portable_fwd_warp_rows(dtype, D, rank)
                got = [tuple(w) for w in C.fused_fwd_warp_tiles(dtype, D, rank)]
                assert got == [tile_model.portable_unit(q, r) for (q, _), r in zip(configs, rows)], (dtype, D, rank)
    assert 32 in _checks.portable_fwd_warp_rows("bfloat16", 128, 2)
    assert list(C.fused_fwd_warp_tiles("float64", 128, 2)) == []


# ----------------------------------------------------------------------------- the chooser

def _window(rank, kernel_size, stride=1, is_causal=False):
    p = _checks.window_params(rank, (1024,) * rank, kernel_size, stride, 1, is_causal, head_dim=128)
    return p.kernel_size, p.stride, p.dilation, p.is_causal


# (spatial, kernel_size, dtype, backend, want): the measured cases (_checks' chooser comment) and
# their transposes.
CHOSEN_FWD = [
    ((64, 256), (7, 31), "bfloat16", None, FusedTiles(0, 1, 1)),          # longer along the last axis: 8x16
    ((64, 256), (7, 31), "float16", "fused_sm80", FusedTiles(80, 1, 1)),
    ((64, 256), (7, 31), "bfloat16", "fused_sm90", FusedTiles(90, 1, 1)),
    ((256, 64), (31, 7), "bfloat16", None, None),                           # longer along the first axis
    ((128, 128), (31, 31), "bfloat16", None, None),                         # p2: square
    ((256, 256), (80, 80), "bfloat16", None, None),                         # p6
    ((64, 256), (7, 31), "float32", None, None),                            # one configuration only
    # 3-D (H100, standalone): the Hopper set's 8x4x4 over 1x8x16 on p3 (0.54 of its pairs useful
    # against the default's 0.46; 0.704 vs 0.781 ms), 4x4x8 over 2x16x4 on p10 (0.51 against 0.46;
    # 0.622 vs 0.679 ms), 8x2x8 over 1x8x16 on small windows (1.14 vs 1.69 ms); the portable set
    # keeps its default on p3, takes its second on small windows
    ((16, 32, 32), (7, 13, 13), "bfloat16", None, FusedTiles(0, 0, 3)),   # p3
    ((16, 32, 32), (7, 13, 13), "bfloat16", "fused_sm90", FusedTiles(90, 0, 3)),
    ((8, 64, 64), (3, 7, 7), "bfloat16", None, FusedTiles(0, 1, 5)),
]


@pytest.mark.parametrize("spatial,kernel_size,dtype,backend,want", CHOSEN_FWD)
def test_chooser_without_tile_shapes(monkeypatch, spatial, kernel_size, dtype, backend, want):
    """Calls without tile shapes take, per kernel set, the configuration whose tile walk computes the
    fewest pairs among those with the default's keys per tile (jax_na.tile_model): 8x16 Q tiles in
    2-D where the window is longer along the last axis (measured faster), the defaults elsewhere."""
    monkeypatch.setattr(ext, "has_hopper_kernels", lambda: True)
    rank = len(spatial)
    x = jax.ShapeDtypeStruct((1, *spatial, 2, 128), jnp.dtype(dtype))
    got = _checks.fwd_tiles_args(rank, x, x, backend or "auto", None, None, _window(rank, kernel_size))
    assert got == want
    if want is not None and rank == 2:
        for ks, i in (("sm80", want.sm80), ("sm90", want.sm90)):
            assert _checks.fused_fwd_tile_configs(ks, dtype, 128, 2)[i][0] == (8, 16)
    elif want is not None:
        q = (8, 4, 4) if kernel_size[1] == 13 else (8, 2, 8)
        assert _checks.fused_fwd_tile_configs("sm90", dtype, 128, 3)[want.sm90] == (q, (1, 8, 16))
    # no window: the defaults; 1-D: one configuration
    assert _checks.fwd_tiles_args(rank, x, x, "auto", None, None) is None
    x1 = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.dtype(dtype))
    assert _checks.fwd_tiles_args(1, x1, x1, "auto", None, None, _window(1, 255)) is None


# Head dim 32 (16-bit, portable): (spatial, kernel_size, dilation, want) measured on an H100 (bf16,
# _checks.PORTABLE_IDLE_WEIGHT): the 64-query tiles on small 1-D/2-D windows, the default in 3-D.
CHOSEN_FWD_32 = [
    ((56, 56), (7, 7), 1, (8, 8)),             # p4: 0.262 vs 0.292 ms
    ((28, 28), (7, 7), 4, (8, 8)),             # p5: 0.055 vs 0.080
    ((56, 56), (13, 13), 1, (8, 8)),           # 0.114 vs 0.127
    ((128, 128), (31, 31), 1, (8, 8)),         # p2's window: 0.369 vs 0.383
    ((16384,), (255,), 1, (64,)),              # 0.342 vs 0.362
    ((16, 32, 32), (7, 13, 13), 1, None),      # p3's window: 4x4x4 queries lost (0.659 vs 0.630)
]


@pytest.mark.parametrize("spatial,kernel_size,dilation,want", CHOSEN_FWD_32)
def test_chooser_head_dim_32(monkeypatch, spatial, kernel_size, dilation, want):
    """At 16-bit head dim 32 the portable chooser also counts the tiles a CTA walks that its warps
    skip (PORTABLE_IDLE_WEIGHT) and takes the 64-query tiles where they save that; at head dim 64
    the same problems keep their 128-query choice."""
    monkeypatch.setattr(ext, "has_hopper_kernels", lambda: True)
    rank = len(spatial)
    p = _checks.window_params(rank, spatial, kernel_size, 1, dilation, False, head_dim=32)
    window = (p.kernel_size, p.stride, p.dilation, p.is_causal)
    x = jax.ShapeDtypeStruct((1, *spatial, 2, 32), jnp.bfloat16)
    got = _checks.fwd_tiles_args(rank, x, x, "auto", None, None, window)
    configs = _checks.fused_fwd_tile_configs("sm80", "bfloat16", 32, rank)
    chosen = configs[got.sm80 if got is not None else 0][0]
    if want is None:
        assert math.prod(chosen) == 128, chosen
    else:
        assert chosen == want, (got, configs)
    x64 = jax.ShapeDtypeStruct((1, *spatial, 2, 64), jnp.bfloat16)
    got64 = _checks.fwd_tiles_args(rank, x64, x64, "auto", None, None, window)
    configs64 = _checks.fused_fwd_tile_configs("sm80", "bfloat16", 64, rank)
    assert math.prod(configs64[got64.sm80 if got64 is not None else 0][0]) == 128


def test_forward_chooser_keeps_the_tile_size(monkeypatch):
    """The forward compares only configurations with its default's keys per tile: the Hopper 3-D
    configuration of 64-key tiles (fewer pairs on 5x21x21 over 16x48x48, but slower per key) is
    never chosen."""
    from jax_na import tile_model
    monkeypatch.setattr(ext, "has_hopper_kernels", lambda: True)
    spatial, window = (16, 48, 48), _window(3, (5, 21, 21))
    axes = tile_model.problem_axes(spatial, *window)
    configs = _checks.fused_fwd_tile_configs("sm90", "bfloat16", 128, 3)
    work = [tile_model.forward_work(axes, "sm90", q, kv) for q, kv in configs]
    small = [i for i, (_, kv) in enumerate(configs) if math.prod(kv) < math.prod(configs[0][1])]
    assert small and min(work) in [work[i] for i in small]  # the model alone would take it
    x = jax.ShapeDtypeStruct((1, *spatial, 2, 128), jnp.bfloat16)
    got = _checks.fwd_tiles_args(3, x, x, "fused", None, None, window) or FusedTiles(0, 0, 0)
    assert got.sm90 not in small
