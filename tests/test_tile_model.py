"""jax_na.tile_model (the pairs the fused kernels compute, which the tile choosers minimize) against
a literal walk of the kernels' schedules on small problems: every (MMA unit, K/V tile) of a
query-stationary kernel tested pair by pair for a query that holds a key of the tile, every Q tile of
a key-stationary kernel's inverse neighbourhood from the queries that hold its keys; windows from
jax_na.geometry.neighborhood (the per-token key lists), not from the model's per-axis bounds.
CPU only, a few seconds."""

import itertools
import math

import numpy as np
import pytest

from jax_na import _checks, geometry, tile_model


def _membership(L, k, s, d, causal):
    """Per dilation group: [Lg, Lg] bool, entry (p, j): key position j is in query position p's window."""
    nbr = geometry.neighborhood(L, k, s, d, causal)
    out = []
    for g in range(d):
        tokens = list(range(g, L, d))
        M = np.zeros((len(tokens), len(tokens)), bool)
        for p, i in enumerate(tokens):
            for j in nbr[i]:
                assert j % d == g
                M[p, j // d] = True
        out.append(M)
    return out


def _problem(spatial, kernel, stride, dilation, causal):
    per_axis = [_membership(*a) for a in zip(spatial, kernel, stride, dilation, causal)]
    return list(itertools.product(*per_axis))  # per group combination: one membership per axis


def _box(origin, extents, lengths):
    """Valid positions of a box: [n, rank] ints (positions past an axis' length dropped)."""
    axes = [range(o, min(o + e, L)) for o, e, L in zip(origin, extents, lengths)]
    return np.array(list(itertools.product(*axes)), dtype=np.int64).reshape(-1, len(extents))


def _holds(Ms, qs, ks):
    """Whether some query of qs holds some key of ks."""
    if len(qs) == 0 or len(ks) == 0:
        return False
    m = np.ones((len(qs), len(ks)), bool)
    for a, M in enumerate(Ms):
        m &= M[qs[:, a]][:, ks[:, a]]
    return bool(m.any())


def _walk_query_stationary(groups, q_tile, unit, kv_tile, halves=False):
    """Units x K/V tiles a forward / dQ CTA visits, literally: the box spans the windows of the
    CTA's queries (their first start and last end per axis), tiled from its origin; a unit counts a
    tile where one of its queries holds one of the tile's keys. ``halves``: each half of a tile along
    axis 0 counts on its own (half the pairs), where a query of the unit holds one of its keys."""
    count = 0
    unit_grid = [q // u for q, u in zip(q_tile, unit)]
    for Ms in groups:
        L = [M.shape[0] for M in Ms]
        for t in itertools.product(*(range(math.ceil(l / e)) for l, e in zip(L, q_tile))):
            q0 = [ti * e for ti, e in zip(t, q_tile)]
            qs = _box(q0, q_tile, L)
            lo = [int(np.nonzero(M[qs[:, a]].any(axis=0))[0].min()) for a, M in enumerate(Ms)]
            hi = [int(np.nonzero(M[qs[:, a]].any(axis=0))[0].max()) + 1 for a, M in enumerate(Ms)]
            n_tiles = [math.ceil((h - l_) / e) for l_, h, e in zip(lo, hi, kv_tile)]
            for uc in itertools.product(*(range(g) for g in unit_grid)):
                uq = _box([o + c * e for o, c, e in zip(q0, uc, unit)], unit, L)
                for i in itertools.product(*(range(n) for n in n_tiles)):
                    org = [l_ + ii * e for l_, ii, e in zip(lo, i, kv_tile)]
                    if not halves:
                        count += _holds(Ms, uq, _box(org, kv_tile, L))
                        continue
                    half = (kv_tile[0] // 2, *kv_tile[1:])
                    for h in range(2):
                        count += _holds(Ms, uq, _box([org[0] + h * half[0], *org[1:]], half, L))
    return count * math.prod(unit) * math.prod(kv_tile) // (2 if halves else 1)


def _walk_key_stationary(groups, q_tile, kv_tile, units=1):
    """Q tiles a dK/dV CTA visits, literally: per axis, from the first to the last query position
    that holds a key of its K/V tile (a query holding one on every axis holds one). With units > 1,
    the (unit, Q tile) pairs of that walk where a query of the tile holds a key of the unit (unit u:
    rows [u n, (u + 1) n) of the row-major K/V box, n = its size / units)."""
    steps = 0
    n = math.prod(kv_tile) // units
    rows = np.array(list(itertools.product(*(range(e) for e in kv_tile))), dtype=np.int64)  # row-major
    for Ms in groups:
        L = [M.shape[0] for M in Ms]
        for t in itertools.product(*(range(math.ceil(l / e)) for l, e in zip(L, kv_tile))):
            k0 = [ti * e for ti, e in zip(t, kv_tile)]
            first, n_tiles = [], []
            for a, M in enumerate(Ms):
                keys = np.arange(k0[a], min(k0[a] + kv_tile[a], L[a]))
                qs = np.nonzero(M[:, keys].any(axis=1))[0]
                first.append(int(qs.min()))
                n_tiles.append(math.ceil((qs.max() - qs.min() + 1) / q_tile[a]))
            if units == 1:
                steps += math.prod(n_tiles)
                continue
            for u in range(units):
                ks = rows[u * n:(u + 1) * n] + np.array(k0)
                ks = ks[(ks < np.array(L)).all(axis=1)]
                for i in itertools.product(*(range(m) for m in n_tiles)):
                    qs = _box([f + ii * e for f, ii, e in zip(first, i, q_tile)], q_tile, L)
                    steps += _holds(Ms, qs, ks)
    return steps * math.prod(q_tile) * n


def _random_problems(rank, n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        spatial, kernel, stride, dilation, causal = [], [], [], [], []
        for _a in range(rank):
            d = int(rng.choice([1, 1, 2, 3]))
            L = int(rng.integers(2 * d, {1: 700, 2: 48, 3: 20}[rank] + 1))
            k = int(rng.integers(2, L // d + 1))
            spatial.append(L), kernel.append(k), dilation.append(d)
            stride.append(int(rng.integers(1, k + 1)) if rng.random() < 0.3 else 1)
            causal.append(bool(rng.random() < 0.3))
        out.append((tuple(spatial), tuple(kernel), tuple(stride), tuple(dilation), tuple(causal)))
    return out


def _fwd_configs(rank, halved=False):
    """(kernel set, q tile, kv tile) of the compiled forward configurations; ``halved``: the narrow ones
    (16-bit, head dims up to 128), whose portable kernels compute over half tiles; the half-tile count
    is checked for the Hopper units too (geometry only)."""
    return {(ks, q, kv) for (ks, kind), by_rank in _checks.FUSED_FWD_TILES.items() if not (halved and kind == "wide")
            for q, kv in by_rank.get(rank, ())}


def _bwd_configs(rank):
    out = set()
    for (ks, _), by_rank in _checks.FUSED_BWD_TILES.items():
        for i, (q, kv) in enumerate(by_rank.get(rank, ())):
            for head_dim in (32, 64):
                out.add((ks, q, kv, *_checks.fused_bwd_dq_tiles(ks, head_dim, rank)[i]))
    return out



@pytest.mark.parametrize("rank", [1, 2, 3])
def test_counts_equal_the_literal_walk(rank):
    """useful_pairs, query_stationary_pairs (forward and dQ tiles of every compiled configuration,
    portable warps and Hopper warpgroups) and key_stationary_pairs equal the literal walks on random
    problems with stride, dilation and causal axes."""
    for prob in _random_problems(rank, {1: 12, 2: 6, 3: 4}[rank], seed=rank):
        groups = _problem(*prob)
        axes = tile_model.problem_axes(*prob)
        useful = sum(math.prod(int(M.sum(axis=1).sum()) for M in Ms) for Ms in groups)
        assert tile_model.useful_pairs(axes) == useful, prob
        halved = _fwd_configs(rank, halved=True)
        for ks, q, kv in _fwd_configs(rank):
          for rows in ((16, 32) if ks == "sm80" else (16,)):  # portable warps of 16 or 32 queries
            unit = tile_model.mma_unit(ks, q, rows)
            want = _walk_query_stationary(groups, q, unit, kv)
            assert tile_model.forward_work(axes, ks, q, kv, warp_rows=rows) == want, (prob, ks, q, kv, rows)
            assert want >= useful
            if (ks, q, kv) not in halved or kv[0] < 2:  # (a one-plane K/V tile has no halves)
                continue
            # half tiles (the portable 16-bit kernels: both products)
            halves = _walk_query_stationary(groups, q, unit, kv, halves=True)
            assert tile_model.query_stationary_pairs(axes, q, unit, kv, half_tiles=True) == halves, (prob, ks, q, kv)
            assert useful <= halves <= want
            assert tile_model.forward_work(axes, ks, q, kv, half_tiles=True, warp_rows=rows) == (
                halves if kv[0] >= 2 else want)
        for ks, q, kv, dq_q, dq_kv in _bwd_configs(rank):
            cta = _walk_key_stationary(groups, q, kv)
            assert tile_model.key_stationary_pairs(axes, q, kv) == cta, (prob, ks, q, kv)
            units = tile_model.dkdv_units(ks)
            dkdv = _walk_key_stationary(groups, q, kv, units)
            assert tile_model.key_stationary_pairs(axes, q, kv, units) == dkdv, (prob, ks, q, kv)
            assert useful <= dkdv <= cta
            dq = _walk_query_stationary(groups, dq_q, tile_model.dq_unit(ks, dq_q), dq_kv)
            assert tile_model.backward_work(axes, ks, q, kv, dq_q, dq_kv) == 4 * cta + 3 * dq, (prob, ks, q)
            assert tile_model.backward_work(axes, ks, q, kv, dq_q, dq_kv, unit_skips=True) == 4 * dkdv + 3 * dq
            if ks == "sm90":  # the dK/dV kernel adding dQ: its dQ product on the CTA's whole walk
                assert tile_model.backward_work(axes, ks, q, kv, dq_q, dq_kv, deterministic=False) == 5 * cta
                assert tile_model.backward_work(axes, ks, q, kv, dq_q, dq_kv, deterministic=False,
                                                unit_skips=True) == 4 * dkdv + cta


def test_known_values():
    """Hand-checkable cases: a window covering a 128-position axis (one Q tile, one K/V tile: every pair
    useful); p7, whose tiles align with the stride (only useful pairs); a 3x3 window over 16x8 on the
    Hopper default (the whole problem is one 16x8 K/V tile, which both 8x8 warpgroups meet)."""
    axes = tile_model.problem_axes((128,), (128,))
    assert tile_model.useful_pairs(axes) == 128 * 128
    assert tile_model.forward_work(axes, "sm90", (128,), (128,)) == 128 * 128
    assert tile_model.key_stationary_pairs(axes, (64,), (128,)) == 128 * 128
    p7 = tile_model.problem_axes((256, 256), (80, 80), (16, 16))
    assert tile_model.forward_work(p7, "sm90", (16, 8), (16, 8)) == tile_model.useful_pairs(p7)
    small = tile_model.problem_axes((16, 8), (3, 3))
    assert tile_model.forward_work(small, "sm90", (16, 8), (16, 8)) == 2 * 64 * 128
    # half tiles: each 8x8 unit of 64 queries (windows 9 rows deep) meets both 8-row halves
    assert tile_model.query_stationary_pairs(small, (16, 8), (8, 8), (16, 8), half_tiles=True) == 2 * 64 * 128
    # 1-D, window 2048 over 128-query tiles: a 64-query unit spans 2111 keys, 16.5 tiles
    p1 = tile_model.problem_axes((32768,), (2048,))
    full = tile_model.forward_work(p1, "sm90", (128,), (128,))
    half = tile_model.query_stationary_pairs(p1, (128,), (64,), (128,), half_tiles=True)
    assert round(1 - half / full, 4) == 0.0277
    # a portable warp (16 queries) over 64-key tiles: its 2063 keys span 32.2 tiles, one half of
    # the 33 visited unmet on average
    full16 = tile_model.forward_work(p1, "sm80", (128,), (64,))
    assert tile_model.forward_work(p1, "sm80", (128,), (64,), half_tiles=True) == (
        tile_model.query_stationary_pairs(p1, (128,), (16,), (64,), half_tiles=True)) < full16
    # 32-query warps (two atoms: axis 0 of the 16-query box doubled): coarser boxes. Here the same
    # tiles and halves (a 32-query warp's 2079 keys meet them as the 16-query warps do), in 2-D
    # (p2's 31x31 window) 4.5% more pairs
    assert [tile_model.portable_unit(q, 32) for q in ((128,), (16, 8), (4, 4, 8))] == [(32,), (4, 8), (2, 4, 4)]
    assert tile_model.forward_work(p1, "sm80", (128,), (64,), True, warp_rows=32) == (
        tile_model.forward_work(p1, "sm80", (128,), (64,), True))
    p2 = tile_model.problem_axes((128, 128), (31, 31))
    rows16, rows32 = (tile_model.forward_work(p2, "sm80", (16, 8), (8, 8), True, warp_rows=r) for r in (16, 32))
    assert round(rows32 / rows16 - 1, 3) == 0.045
    with pytest.raises(ValueError, match="rows must be 16 or 32"):
        tile_model.portable_unit((128,), 64)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_portable_fwd_warp_rows(rank):
    """The portable forward's warps take 32 queries at 16-bit head dim 128 only (as
    kPortableFwdWarpRows in tile_shapes.cuh), except 2-D 8x16 tiles; one entry per configuration."""
    for dt in ("bfloat16", "float16", "float32"):
        for P in (32, 64, 128, 256):
            rows = _checks.portable_fwd_warp_rows(dt, P, rank)
            configs = _checks.fused_fwd_tile_configs("sm80", dt, P, rank)
            assert len(rows) == len(configs) > 0, (dt, P, rows, configs)
            wide = dt != "float32" and P == 128
            assert rows == tuple(16 if (not wide or q == (8, 16)) else 32 for q, _ in configs), (dt, P, rows)


def test_idle_weight():
    """forward_work's idle_weight adds the pairs of the tiles a CTA walks that its units skip: on p4
    (7x7 over 56x56) a 128-query CTA's warps skip 4.9 of every useful pair's walk, a 64-query CTA's
    2.01; weight 0 is the plain count, and a CTA of one unit skips nothing."""
    p4 = tile_model.problem_axes((56, 56), (7, 7))
    useful = tile_model.useful_pairs(p4)
    for q, skipped in (((16, 8), 4.90), ((8, 8), 2.01)):
        work = tile_model.forward_work(p4, "sm80", q, (8, 8), half_tiles=True)
        walked = tile_model.query_stationary_pairs(p4, q, q, (8, 8))
        assert tile_model.forward_work(p4, "sm80", q, (8, 8), True, 0.0) == work
        assert tile_model.forward_work(p4, "sm80", q, (8, 8), True, 0.25) == work + 0.25 * (walked - work)
        assert round((walked - work) / useful, 2) == skipped
    one = tile_model.forward_work(p4, "sm90", (16, 8), (16, 8))  # a Hopper unit: half the Q tile
    assert tile_model.forward_work(p4, "sm90", (16, 8), (16, 8), idle_weight=0.5) > one


def test_docstring_example():
    axes = tile_model.problem_axes((128, 128), (31, 31))
    eff = tile_model.useful_pairs(axes) / tile_model.query_stationary_pairs(axes, (16, 8), (8, 8), (16, 8))
    assert round(eff, 2) == 0.57


def test_tile_work_tool(tmp_path, capsys):
    """tools/tile_work.py (README) prints and writes the model's numbers for a problem: p2 on the Hopper
    set, whose default forward tiles compute 0.57 useful pairs and whose 8x8 64-query box bounds any
    such kernel at 0.73."""
    import json
    import os
    import runpy

    tool = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "tools", "tile_work.py"))
    out = tmp_path / "p2.json"
    assert tool["main"](["--problem", "p2-2d", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["problem"] == "p2-2d" and round(r["fwd"][0]["efficiency"], 2) == 0.57 and r["fwd"][0]["chosen"]
    assert r["fwd"][0]["whole_tiles_efficiency"] == r["fwd"][0]["efficiency"]  # Hopper: whole tiles
    assert round(r["bound64"], 2) == 0.73 and tuple(r["bound64_box"]) == (8, 8)
    # Hopper's dK/dV CTAs are one warpgroup (64 keys): the units' count is the CTA's walk
    assert len(r["bwd"]) == 2 and r["bwd"][0]["chosen"] and 2.0 < r["bwd"][0]["products_over_ideal"] < 2.2
    assert round(r["bwd"][0]["dkdv_efficiency"], 2) == round(r["bwd"][0]["dkdv_cta_efficiency"], 2) == 0.67
    assert "p2-2d" in capsys.readouterr().out and "bound_warp" not in r  # Hopper: 64-query boxes only


def test_tile_work_tool_portable_warp_bound(tmp_path):
    """On the portable set tools/tile_work.py also bounds the chooser's warp box: p3 on 32-query
    warps (16-bit, head dim 128) computes 0.62 useful pairs over 64-key tiles, where a key-exact walk
    of 2x4x4 warp boxes would compute 0.73 (64-query boxes: 0.64)."""
    import json
    import os
    import runpy

    tool = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "tools", "tile_work.py"))
    out = tmp_path / "p3.json"
    assert tool["main"](["--set", "sm80", "--problem", "p3-3d", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    chosen = [c for c in r["fwd"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["warp_rows"] == r["bound_warp_rows"] == 32
    assert round(chosen[0]["efficiency"], 2) == 0.62
    assert round(r["bound_warp"], 2) == 0.73 and tuple(r["bound_warp_box"]) == (2, 4, 4)
    assert round(r["bound64"], 2) == 0.64 and r["bound_warp"] > r["bound64"]


def test_tile_work_tool_nondeterministic_backward(tmp_path):
    """tools/tile_work.py lists the Hopper non-deterministic backward's configurations: on p3 the first
    two walk the same pairs (0.33 useful, 7200 steps), the flat one (_checks.BWD_CHOICE_BASE) adds dQ
    in 8 reductions per step where 4x4x4 needs 16, and the third (1x8x8 queries) walks 6400 steps in
    8 reductions each, which the chooser takes; 1-D needs one."""
    import json
    import os
    import runpy

    tool = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "tools", "tile_work.py"))
    out = tmp_path / "nd.json"
    assert tool["main"](["--problem", "p3-3d", "p1-1d-long", "--json", str(out)]) == 0
    p3, p1 = json.loads(out.read_text())
    c0, c1, c2 = p3["bwd_nondeterministic"]
    assert (tuple(c0["q"]), tuple(c1["q"]), tuple(c2["q"])) == ((4, 4, 4), (2, 4, 8), (1, 8, 8))
    assert c2["chosen"] and not c0["chosen"] and not c1["chosen"]
    assert c0["steps"] == c1["steps"] == 7200 and round(c0["efficiency"], 2) == round(c1["efficiency"], 2) == 0.33
    assert c2["steps"] == 6400 and round(c2["efficiency"], 2) == 0.37
    assert [c["dq_reductions_per_step"] for c in (c0, c1, c2)] == [16, 8, 8]
    (only,) = p1["bwd_nondeterministic"]
    assert only["chosen"] and only["dq_reductions_per_step"] == 1 and round(only["efficiency"], 2) == 0.94


def test_tile_work_tool_search(tmp_path):
    """tools/tile_work.py --search N lists the N boxes with the fewest computed pairs, compiled or
    not, best first: on p3 a one-plane K/V box under 8x4x4 queries (0.54 useful against the 4x4x8 /
    2x8x8 default's 0.46) and 1x8x8 queries over 2x8x8 keys in the backward (0.37); on p1 the compiled
    128 / 128 and 64 / 128. Its efficiencies are the model's, and "compiled" is the tile lists'."""
    import json
    import os
    import runpy

    tool = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "tools", "tile_work.py"))
    out = tmp_path / "search.json"
    assert tool["main"](["--problem", "p3-3d", "p1-1d-long", "--search", "3", "--json", str(out)]) == 0
    p3, p1 = json.loads(out.read_text())
    fwd, bwd = p3["search"]["fwd"], p3["search"]["bwd_nondeterministic"]
    assert len(fwd) == len(bwd) == 3
    assert [r["efficiency"] for r in fwd] == sorted((r["efficiency"] for r in fwd), reverse=True)
    assert tuple(fwd[0]["q"]) == (8, 4, 4) and tuple(fwd[0]["kv"]) in ((1, 8, 16), (1, 16, 8))
    assert round(fwd[0]["efficiency"], 3) == 0.544 > p3["fwd"][0]["efficiency"] + 0.08  # configuration 0
    assert (tuple(bwd[0]["q"]), tuple(bwd[0]["kv"])) == ((1, 8, 8), (2, 8, 8)) and round(bwd[0]["efficiency"], 2) == 0.37
    listed = {(tuple(c["q"]), tuple(c["kv"])) for c in p3["fwd"]}
    assert all(r["compiled"] == ((tuple(r["q"]), tuple(r["kv"])) in listed) for r in fwd)
    assert p1["search"]["fwd"][0]["compiled"] and tuple(p1["search"]["fwd"][0]["q"]) == (128,)
    assert p1["search"]["bwd_nondeterministic"][0]["compiled"]
    # head dim 32 (p4): the Hopper set's boxes at its padded head dim 64
    assert tool["main"](["--problem", "p4-nat-small", "--search", "1", "--json", str(out)]) == 0
    (p4,) = json.loads(out.read_text())
    assert len(p4["search"]["fwd"]) == 1 and 0 < p4["search"]["fwd"][0]["efficiency"] <= 1
    with pytest.raises(SystemExit):
        tool["main"](["--set", "sm80", "--search", "2"])
