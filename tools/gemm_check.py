"""Kernel-level check of the GEMM-based unfused CUDA kernels on a GPU, below the primitives: calls the FFI
targets jax_na_gemm_{qk,av,qk_bwd,av_bwd} and their naive twins jax_na_naive_* (same contract) directly
on the same inputs and compares every result (scores with and without the relative positional bias,
av output, dq, dk, d_rpb, d_attn, dv); then times both on the benchmark problems whose attention
weights fit in memory (per op: ms, effective TFLOP/s = 2*B*H*N*W*E / time, speedup over naive).

Usage (GPU machine, jax_na installed): python tools/gemm_check.py [--no-bench] [--no-check] [--quick]
    [--only p2-2d ...] [--bench-dtypes bfloat16,float32] [--reference] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_na  # noqa: F401  (registers the FFI targets)
from jax_na import _checks
from jax_na.profile import PROBLEMS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_check import time_fn  # noqa: E402  (the same timing: warm-up, then medians)

OPS = ("qk", "qk_f32", "av", "qk_bwd", "av_bwd")  # qk_f32: the float32 scores na*d's composite asks for


def _attrs(p, with_scale=True):
    a = dict(kernel_size=np.asarray(p.kernel_size, np.int64), stride=np.asarray(p.stride, np.int64),
             dilation=np.asarray(p.dilation, np.int64), is_causal=np.asarray(p.is_causal, np.int64))
    if with_scale:
        a["scale"] = np.float32(p.scale)
    return a


def call(family, op, p, q, k, v, rpb, attn, d_attn, d_out):
    """One FFI call of jax_na_<family>_<op> on the operands it takes; returns its results."""
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)
    name = f"jax_na_{family}_{op}"
    W = p.window_size
    if op in ("qk", "qk_f32"):
        dt = jnp.float32 if op == "qk_f32" else q.dtype
        return (jax.ffi.ffi_call(name[:-4] if op == "qk_f32" else name, sds((*q.shape[:-1], W), dt))(
            q, k, rpb, **_attrs(p)),)
    if op == "av":
        return (jax.ffi.ffi_call(name, sds((*attn.shape[:-1], v.shape[-1]), v.dtype))(attn, v, **_attrs(p, False)),)
    if op == "qk_bwd":
        shapes = (sds(q.shape, q.dtype), sds(k.shape, k.dtype), sds(rpb.shape, rpb.dtype))
        return tuple(jax.ffi.ffi_call(name, shapes)(d_attn, q, k, **_attrs(p)))
    shapes = (sds(attn.shape, attn.dtype), sds(v.shape, v.dtype))
    return tuple(jax.ffi.ffi_call(name, shapes)(d_out, attn, v, **_attrs(p, False)))


def params_for(S, H, E, ks, st, dl, ca, dtype):
    q = jnp.zeros((1, *S, H, E), dtype)
    p, _ = _checks.attention_args(len(S), q, q, q, ks, st, dl, ca, None, None, None, "reference")
    return p


def inputs(rng, B, S, H, Hkv, E, p, dtype, with_rpb):
    W = p.window_size
    mk = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    rpb = mk(H, *(2 * k - 1 for k in p.kernel_size)) if with_rpb else jnp.zeros((0,), dtype)
    # Weights like a softmax's (positive, rows summing to ~1), cotangents like gradients.
    attn = jnp.asarray(rng.dirichlet(np.ones(W), size=(B, *S, H)), dtype)
    return dict(q=mk(B, *S, H, E), k=mk(B, *S, Hkv, E), v=mk(B, *S, Hkv, E), rpb=rpb, attn=attn,
                d_attn=mk(B, *S, H, W), d_out=mk(B, *S, H, E))


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float64))
    b = np.asarray(jnp.asarray(b, jnp.float64))
    if a.shape != b.shape:
        return float("inf")
    same_inf = np.array_equal(np.isneginf(a), np.isneginf(b))
    a, b = np.where(np.isneginf(a), 0, a), np.where(np.isneginf(b), 0, b)
    if not same_inf or not np.all(np.isfinite(a)):
        return float("inf")
    n = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (n if n > 0 else 1.0))


CASES = [
    # name, B, spatial, H, Hkv, kernel, stride, dilation, causal
    ("1d-basic", 2, (300,), 2, 2, 13, 1, 1, False),
    ("1d-causal-gqa", 1, (517,), 4, 2, 64, 1, 1, True),
    ("1d-stride-dil", 1, (401,), 2, 1, 9, 4, 3, False),
    ("1d-long-window", 1, (700,), 2, 2, 300, 1, 2, False),
    ("2d-basic", 1, (40, 48), 2, 2, (13, 7), 1, 1, False),
    ("2d-mixed", 2, (33, 20), 4, 2, (5, 4), 1, (3, 2), (True, False)),
    ("2d-k=L", 1, (17, 9), 2, 2, (17, 9), 1, 1, False),
    ("2d-stride", 1, (30, 21), 2, 1, (7, 5), (2, 3), 1, False),
    ("3d-basic", 1, (6, 20, 24), 4, 2, (3, 9, 7), 1, (1, 2, 1), False),
    ("3d-causal", 1, (9, 10, 11), 2, 2, (4, 3, 5), 1, 1, (True, False, True)),
    ("3d-odd", 1, (7, 13, 5), 2, 1, (7, 4, 2), 1, (1, 3, 2), (False, True, False)),
]


def check(dtypes=(jnp.bfloat16, jnp.float16, jnp.float32), dims=(64, 128), cases=CASES):
    """gemm vs naive on every case, dtype and head dim; returns the number of failing cases."""
    # float32: the 3xTF32 products (float32 accuracy) against the naive kernels' float32 FMAs.
    tol = {jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 2e-3, jnp.dtype(jnp.float32): 1e-5}
    rng = np.random.default_rng(0)
    fails, worst = 0, 0.0
    for dtype in dtypes:
        for E in dims:
            for (name, B, S, H, Hkv, ks, st, dl, ca) in cases:
                p = params_for(S, H, E, ks, st, dl, ca, dtype)
                with_rpb = all(s == 1 for s in p.stride)
                x = inputs(rng, B, S, H, Hkv, E, p, dtype, with_rpb)
                errs = {}
                for op in OPS:
                    f = jax.jit(lambda fam, op=op, **kw: call(fam, op, p, **kw), static_argnums=0)
                    got, want = f("gemm", **x), f("naive", **x)
                    names = {"qk": ["scores"], "qk_f32": ["scores32"], "av": ["out"], "qk_bwd": ["dq", "dk", "d_rpb"],
                             "av_bwd": ["d_attn", "dv"]}[op]
                    for nm, g, w in zip(names, got, want):
                        if nm == "d_rpb" and not with_rpb:
                            continue
                        errs[nm] = rel(g, w)
                t = tol[jnp.dtype(dtype)]
                ok = all(e <= t for e in errs.values())
                fails += not ok
                worst = max(worst, max(errs.values()) / t)
                print(f"{jnp.dtype(dtype).name:8s} E={E:3d} {name:15s} "
                      + " ".join(f"{nm}={e:.1e}" for nm, e in errs.items()) + ("  ok" if ok else "  FAIL"),
                      flush=True)
    print(f"gemm vs naive: {fails} failing, worst error/tolerance {worst:.2f}")
    return fails


def bench(only=None, dtype=jnp.bfloat16, max_weight_gib=6.0, reps=10, naive_budget_s=2.0, reference=False):
    """Per problem and op: naive and gemm time, effective TFLOP/s, speedup (and with ``reference`` the
    public qk/av on the reference backend). Problems whose weights [B, N, H, W] exceed max_weight_gib
    are skipped (the unfused ops materialize them)."""
    rows = []
    rng = np.random.default_rng(1)
    for prob in PROBLEMS:
        if only and prob.id not in only:
            continue
        B, S, H, D = prob.B, prob.spatial, prob.H, prob.D
        E = 64 if D <= 64 else 128  # the kernels' head dim (the lowering zero-pads)
        p = params_for(S, H, D, prob.kernel, prob.stride, prob.dilation, prob.causal, dtype)
        W, N = p.window_size, math.prod(S)
        gib = B * N * H * W * jnp.dtype(dtype).itemsize / 2**30
        if gib > max_weight_gib:
            print(f"{prob.id:18s} {jnp.dtype(dtype).name} skipped: weights {gib:.1f} GiB > {max_weight_gib} GiB", flush=True)
            continue
        x = inputs(rng, B, S, H, H, E, p, dtype, with_rpb=False)
        x["attn"] = jnp.full((B, *S, H, W), 1.0 / W, dtype)
        flops = 2.0 * B * H * N * W * D  # one window product (qk or av); the backwards do two
        for op in OPS:
            f = {fam: jax.jit(lambda op=op, fam=fam, **kw: call(fam, op, p, **kw)) for fam in ("gemm", "naive")}
            args = x
            t = {}
            t["gemm"] = time_fn(lambda: f["gemm"](**args), (), reps)
            # The naive kernels are slow: time them once (after a warm-up) when one call takes long.
            t0 = time.perf_counter()
            jax.block_until_ready(f["naive"](**args))
            first = time.perf_counter() - t0
            t["naive"] = first if first > naive_budget_s else time_fn(lambda: f["naive"](**args), (), 3)
            fl = flops * (2 if op.endswith("bwd") else 1)
            row = dict(problem=prob.id, op=op, gemm_ms=t["gemm"] * 1e3, naive_ms=t["naive"] * 1e3,
                       gemm_tflops=fl / t["gemm"] / 1e12, naive_tflops=fl / t["naive"] / 1e12,
                       speedup=t["naive"] / t["gemm"])
            if reference and op in ("qk", "av") and all(s == 1 for s in prob.stride):
                # The public op on the pure-JAX reference (what auto would run without the gemm targets).
                kw = dict(kernel_size=prob.kernel, dilation=prob.dilation, is_causal=prob.causal,
                          backend="reference")
                fn = getattr(jax_na, f"na{len(S)}d_{op}")
                ref = jax.jit(lambda a, b: fn(a, b, **kw))
                a, b = (x["q"], x["k"]) if op == "qk" else (x["attn"], x["v"])
                row["reference_ms"] = time_fn(lambda: ref(a, b), (), reps) * 1e3
            row["dtype"] = jnp.dtype(dtype).name
            rows.append(row)
            print(f"{prob.id:18s} {row['dtype']:8s} {op:7s} naive {row['naive_ms']:9.3f} ms {row['naive_tflops']:6.2f} TF/s | gemm "
                  f"{row['gemm_ms']:8.3f} ms {row['gemm_tflops']:6.1f} TF/s | x{row['speedup']:.1f}"
                  + (f" | reference {row['reference_ms']:8.3f} ms" if "reference_ms" in row else ""), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--quick", action="store_true", help="check bfloat16 and float32 only")
    ap.add_argument("--bench-dtypes", default="bfloat16", help="comma list (bfloat16, float16, float32)")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--reference", action="store_true", help="also time qk/av on the reference backend")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    fails = 0 if a.no_check else check(**(dict(dtypes=(jnp.bfloat16, jnp.float32)) if a.quick else {}))
    rows = [] if a.no_bench else [r for dt in a.bench_dtypes.split(",") for r in bench(a.only, dtype=jnp.dtype(dt), reference=a.reference)]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(fails=fails, bench=rows), f, indent=1)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
