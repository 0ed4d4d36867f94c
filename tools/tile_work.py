"""How much of the fused kernels' matrix-product work is useful, per problem and tile configuration.

A fused kernel computes whole tiles and masks the pairs outside the windows, so the fraction of
ideal (BENCHMARKS.md) it can reach is at most the useful (query, key) pairs over the pairs it
computes. jax_na.tile_model counts the tiles each kernel visits (its schedule in
cuda/fused/tile_scheduler.cuh, the window geometry of jax_na.geometry); this prints, per problem:

- forward: useful / computed pairs of each forward configuration (the portable 16-bit kernels
  compute over half K/V tiles where a warp's windows meet one half; whole tiles in parentheses);
- backward: the same for the dK/dV kernel (its MMA units skipping on their own, and the CTA's
  whole walk) and for the dQ kernel of each backward configuration, and the backward's
  pair-products (4 per dK/dV pair, 3 per dQ pair) over the ideal 5 per useful pair;
- bwd-nd (Hopper): the non-deterministic mode's warp-specialized kernel, per configuration: its
  CTA walk's useful fraction, its steps, and its dQ reductions per step (one per run of consecutive
  tokens in the Q tile; session 47 measured fewer reductions faster at equal pairs);
- bound: a Q box of 64 queries (one wgmma) that computed exactly the union of its queries'
  windows, for its best power-of-two shape: what no tiling of 64-query MMAs can beat; for the
  portable set also the box of one warp of the chooser's configuration (16 or 32 queries: the
  granularity at which its warps skip K/V tiles), what a key-exact walk of such warps would reach;
- with ``--times`` (a ``python -m jax_na.profile --json`` file): the forward's rate on the pairs it
  computes (effective TFLOP/s / efficiency), which splits a low fraction of ideal into geometry
  (this table) and rate;
- with ``--search N`` (Hopper set): the N power-of-two boxes, compiled or not, that compute the
  fewest pairs in the Hopper forward (Q tiles of 128 queries halved along axis 0 between its two
  warpgroups, K/V tiles of its default's keys) and in the non-deterministic backward's walk (64
  queries per step, 128 keys per CTA), compiled ones marked with "c": where a new configuration
  would pay (cuda/fused/NOTES.md, session 49).

A star marks the configuration the chooser takes for the problem (jax_na._checks; it counts the
dK/dV kernel's CTA walk, not its units' skips: tile_model.backward_work; bwd-nd: in that mode).

Usage: python tools/tile_work.py [--set sm90|sm80] [--problem p3-3d ...] [--times profile.json]
       [--search N] [--json out.json]
Runs on CPU in seconds (no GPU and no extension needed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

import jax.numpy as jnp

try:
    import jax_na  # noqa: F401  (installed)
except ImportError:  # the source tree (the model needs no compiled extension)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jax_na import _checks, tile_model  # noqa: E402
from jax_na.profile import PROBLEMS, Problem, problem_by_id  # noqa: E402

DTYPE = jnp.dtype(jnp.bfloat16)


def _fmt(box) -> str:
    return "x".join(str(e) for e in box)


def union_bound(axes, rank: int, rows: int = 64) -> tuple[float, tuple]:
    """Best useful / computed over the power-of-two boxes of `rows` queries that compute exactly the
    union of their queries' windows (a perfect key gather, no K/V tile rounding)."""
    useful = tile_model.useful_pairs(axes)
    best = (0.0, ())
    for box in _boxes(rows, rank):
        # a query box with a "K/V tile" of one key computes its windows' union exactly
        computed = tile_model.query_stationary_pairs(axes, box, box, (1,) * rank)
        best = max(best, (useful / computed, box))
    return best


def dq_runs(p: Problem, q_tile) -> int:
    """dQ reductions per step of the warp-specialized backward: one per run of consecutive tokens of
    the Q tile (a line of its box along the last axis; one per row where that axis is dilated). At
    most: a box spanning a whole line makes longer runs."""
    return math.prod(q_tile) if p.dilation[-1] > 1 else math.prod(q_tile[:-1])


def _boxes(size: int, rank: int, min_first: int = 1):
    """The power-of-two boxes of ``size`` positions in ``rank`` axes (at least ``min_first`` on axis 0)."""
    k = int(math.log2(size))
    for split in itertools.product(range(k + 1), repeat=rank):
        if sum(split) == k and (1 << split[0]) >= min_first:
            yield tuple(1 << e for e in split)


def search(p: Problem, top: int) -> dict:
    """The ``top`` boxes of the Hopper forward and non-deterministic backward with the fewest computed
    pairs on ``p`` (useful / computed, Q tile, K/V tile, compiled), best first."""
    axes = tile_model.problem_axes(p.spatial, p.kernel, p.stride, p.dilation, p.causal)
    useful = tile_model.useful_pairs(axes)
    P = _checks.fused_head_dim(p.D, p.D, DTYPE, "fused_sm90")  # (head dim 32 runs padded to 64 there)
    fwd_compiled = _checks.fused_fwd_tile_configs("sm90", DTYPE, P, p.rank)
    keys = math.prod(fwd_compiled[0][1])
    fwd = [(useful / tile_model.forward_work(axes, "sm90", q, kv), q, kv, (q, kv) in fwd_compiled)
           for q in _boxes(128, p.rank, 2) for kv in _boxes(keys, p.rank)]
    bwd_compiled = _checks.fused_bwd_tile_configs("sm90", DTYPE, P, p.rank, False)
    bwd = [(useful / tile_model.key_stationary_pairs(axes, q, kv), q, kv, (q, kv) in bwd_compiled)
           for q in _boxes(64, p.rank) for kv in _boxes(128, p.rank)]
    order = lambda rows: sorted(rows, key=lambda r: (-r[0], not r[3]))[:top]
    return {"fwd": order(fwd), "bwd_nondeterministic": order(bwd)}


def analyse(p: Problem, kernel_set: str) -> dict:
    axes = tile_model.problem_axes(p.spatial, p.kernel, p.stride, p.dilation, p.causal)
    useful = tile_model.useful_pairs(axes)
    P = _checks.fused_head_dim(p.D, p.D, DTYPE)
    window = (p.kernel, p.stride, p.dilation, p.causal)
    fwd_pick = _checks._chosen_fwd_tiles(p.rank, DTYPE, P, "fused", p.spatial, window)
    bwd_pick = _checks._chosen_bwd_tiles(p.rank, DTYPE, P, "fused", p.spatial, window, True)
    fwd_index = getattr(fwd_pick, kernel_set, 0) if fwd_pick else 0
    bwd_index = getattr(bwd_pick, kernel_set, 0) if bwd_pick else 0
    half = kernel_set == "sm80" and _checks.portable_half_tiles(DTYPE, P)
    rows = _checks.portable_fwd_warp_rows(DTYPE, P, p.rank) if kernel_set == "sm80" else None
    out = {"problem": p.id, "kernel_set": kernel_set, "useful_pairs": useful, "fwd": [], "bwd": []}
    for i, (q, kv) in enumerate(_checks.fused_fwd_tile_configs(kernel_set, DTYPE, P, p.rank)):
        r = rows[i] if rows else 16
        computed = tile_model.forward_work(axes, kernel_set, q, kv, half, warp_rows=r)
        whole = tile_model.forward_work(axes, kernel_set, q, kv, warp_rows=r)
        out["fwd"].append({"q": q, "kv": kv, "warp_rows": r, "computed": computed, "efficiency": useful / computed,
                           "whole_tiles_efficiency": useful / whole, "chosen": i == fwd_index})
    dq_tiles = _checks.fused_bwd_dq_tiles(kernel_set, P, p.rank)
    for i, (q, kv) in enumerate(_checks.fused_bwd_tile_configs(kernel_set, DTYPE, P, p.rank)):
        dq_q, dq_kv = dq_tiles[i]
        dkdv = tile_model.key_stationary_pairs(axes, q, kv, tile_model.dkdv_units(kernel_set))
        dkdv_cta = tile_model.key_stationary_pairs(axes, q, kv)  # the CTA's walk (no unit skips)
        dq = tile_model.query_stationary_pairs(axes, dq_q, tile_model.dq_unit(kernel_set, dq_q), dq_kv)
        out["bwd"].append({"q": q, "kv": kv, "dq_q": dq_q, "dq_kv": dq_kv, "chosen": i == bwd_index,
                           "dkdv_efficiency": useful / dkdv, "dkdv_cta_efficiency": useful / dkdv_cta,
                           "dq_efficiency": useful / dq,
                           "products_over_ideal": (4 * dkdv + 3 * dq) / (5 * useful),
                           "products_cta_walk_over_ideal": (4 * dkdv_cta + 3 * dq) / (5 * useful)})
    if kernel_set == "sm90":  # the non-deterministic mode's warp-specialized kernel (dQ added by it)
        nd_pick = _checks._chosen_bwd_tiles(p.rank, DTYPE, P, "fused", p.spatial, window, False)
        nd_index = getattr(nd_pick, kernel_set, 0) if nd_pick else 0
        out["bwd_nondeterministic"] = []
        for i, (q, kv) in enumerate(_checks.fused_bwd_tile_configs(kernel_set, DTYPE, P, p.rank, False)):
            cta = tile_model.key_stationary_pairs(axes, q, kv)
            out["bwd_nondeterministic"].append({
                "q": q, "kv": kv, "chosen": i == nd_index, "efficiency": useful / cta,
                "steps": cta // (math.prod(q) * math.prod(kv)), "dq_reductions_per_step": dq_runs(p, q)})
    out["bound64"], out["bound64_box"] = union_bound(axes, p.rank)
    if rows:  # the portable warps skip K/V tiles per warp box
        out["bound_warp_rows"] = rows[fwd_index]
        out["bound_warp"], out["bound_warp_box"] = union_bound(axes, p.rank, rows[fwd_index])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="sm90", choices=("sm90", "sm80"), help="kernel set (default: Hopper)")
    ap.add_argument("--problem", nargs="*", default=None, help="problem ids, e.g. p3-3d or p3 (default: the whole set)")
    ap.add_argument("--times", help="a `python -m jax_na.profile --json` file: the forward's rate on the "
                                    "pairs it computes")
    ap.add_argument("--search", type=int, default=0, metavar="N",
                    help="also the N boxes with the fewest computed pairs, compiled or not (Hopper set)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    if a.search < 0 or (a.search and a.set != "sm90"):
        ap.error("--search takes a count >= 0 and the Hopper set (--set sm90)")
    try:
        probs = [problem_by_id(i) for i in a.problem] if a.problem else PROBLEMS
    except ValueError as e:
        ap.error(str(e))
    fwd_tflops = {}
    if a.times:
        with open(a.times) as f:
            for r in json.load(f).get("rows", []):
                if r.get("mode") == "fwd" and r.get("backend") in ("fused", f"fused_{a.set}") and "eff_tflops" in r:
                    fwd_tflops[r["problem"]] = r["eff_tflops"]
    print(f"useful / computed pairs, kernel set {a.set} (* the chooser's configuration); backward: "
          "dK/dV, dQ, pair-products / ideal")
    results = []
    for p in probs:
        r = analyse(p, a.set)
        results.append(r)
        warp = (f"; of a {r['bound_warp_rows']}-query warp box: {r['bound_warp']:.2f} at {_fmt(r['bound_warp_box'])}"
                if "bound_warp" in r else "")
        print(f"{p.id}  (bound of a 64-query box: {r['bound64']:.2f} at {_fmt(r['bound64_box'])}{warp})")
        for c in r["fwd"]:
            eff, whole = c["efficiency"], c["whole_tiles_efficiency"]
            whole = f"  (whole tiles {whole:.2f})" if whole != eff else ""
            print(f"  fwd {'*' if c['chosen'] else ' '} {_fmt(c['q']):>6} / {_fmt(c['kv']):6}  {eff:.2f}{whole}"
                  f"  (warps of {c['warp_rows']})")
        for c in r["bwd"]:
            print(f"  bwd {'*' if c['chosen'] else ' '} {_fmt(c['q']):>6} / {_fmt(c['kv']):6}  "
                  f"dK/dV {c['dkdv_efficiency']:.2f} (CTA walk {c['dkdv_cta_efficiency']:.2f})  dQ ({_fmt(c['dq_q'])} / {_fmt(c['dq_kv'])}) "
                  f"{c['dq_efficiency']:.2f}  products {c['products_over_ideal']:.2f}x ideal "
                  f"({c['products_cta_walk_over_ideal']:.2f}x with the CTA walk)")
        for c in r.get("bwd_nondeterministic", []):
            print(f"  bwd-nd {'*' if c['chosen'] else ' '} {_fmt(c['q']):>6} / {_fmt(c['kv']):6}  CTA walk "
                  f"{c['efficiency']:.2f}  {c['steps']} steps  {c['dq_reductions_per_step']} dQ reductions per step")
        if a.search:
            found = search(p, a.search)
            r["search"] = {k: [{"efficiency": e, "q": q, "kv": kv, "compiled": c} for e, q, kv, c in rows]
                           for k, rows in found.items()}
            for k, rows in found.items():
                print(f"  best {k}: " + ", ".join(f"{_fmt(q)} / {_fmt(kv)} {e:.2f}{' c' if c else ''}"
                                                 for e, q, kv, c in rows))
        if p.id in fwd_tflops:
            eff = next(c["efficiency"] for c in r["fwd"] if c["chosen"])
            r["fwd_rate_on_computed_tflops"] = fwd_tflops[p.id] / eff
            print(f"  forward: {fwd_tflops[p.id]:.0f} effective TF/s = {r['fwd_rate_on_computed_tflops']:.0f} "
                  f"TF/s on the pairs computed")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
