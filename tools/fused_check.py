"""Kernel-level check of the fused CUDA kernels on a GPU, below the primitives: calls the FFI targets
jax_na_fused_fwd / jax_na_fused_bwd directly and compares out, lse, dq, dk, dv (and the additional
keys' gradients) with the float64 reference (jax_na.reference through its autodiff). Then times the
benchmark problems (forward, backward) with CUDA-synchronized medians.

Usage (GPU machine, jax_na installed): python tools/fused_check.py [--no-bench] [--json out.json]
    [--arch 90,80] (kernels, forward and backward, to check and time: 0 auto, 80 portable, 90 Hopper)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_na
from jax_na import _checks, _ext, reference
from jax_na.profile import PROBLEMS  # the BENCHMARKS.md problem set

jax.config.update("jax_enable_x64", True)


def _attrs(p):
    return dict(kernel_size=np.asarray(p.kernel_size, np.int64), stride=np.asarray(p.stride, np.int64),
                dilation=np.asarray(p.dilation, np.int64), is_causal=np.asarray(p.is_causal, np.int64),
                scale=np.float32(p.scale), tiles_sm80=np.int64(0), tiles_sm90=np.int64(0))


def fused_fwd(q, k, v, ak, av, p, arch=0):
    """arch: 0 lets the target pick (Hopper kernel on sm_90), 80 portable, 90 Hopper."""
    shapes = (jax.ShapeDtypeStruct((*q.shape[:-1], v.shape[-1]), q.dtype),
              jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32),
              jax.ShapeDtypeStruct((1,), jnp.int32))  # the tile counter (docs/ffi.md)
    return jax.ffi.ffi_call("jax_na_fused_fwd", shapes)(q, k, v, ak, av, arch=np.int64(arch), **_attrs(p))[:2]


def fused_bwd(q, k, v, ak, av, out, lse, do, dlse, p, arch=0):
    """arch: as fused_fwd's, for the backward kernels."""
    rows = math.prod(q.shape[:-1])
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, ak, av))
    shapes += (jax.ShapeDtypeStruct((rows,), jnp.float32),)
    return jax.ffi.ffi_call("jax_na_fused_bwd", shapes)(q, k, v, ak, av, out, lse, do, dlse, arch=np.int64(arch),
                                                                     deterministic=np.int64(1), **_attrs(p))[:5]


def params_for(rank, q, k, v, ks, st, dl, ca, ak=None, av=None):
    p, _ = _checks.attention_args(rank, q, k, v, ks, st, dl, ca, None, ak, av, "reference")
    return p


def reference_all(q, k, v, ak, av, do, dlse, p):
    f = lambda *a: reference.attention_forward(*a, p)
    (out, lse), vjp = jax.vjp(f, q, k, v, ak, av)
    return (out, lse, *vjp((do, dlse)))


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float64))
    b = np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    n = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (n if n > 0 else 1.0))


CASES = [
    # name, B, spatial, H, Hkv, D, kernel, stride, dilation, causal, Na
    ("1d-basic", 2, (300,), 2, 2, 64, 13, 1, 1, False, 0),
    ("1d-causal-gqa", 1, (517,), 4, 2, 128, 64, 1, 1, True, 0),
    ("1d-stride-dil", 1, (401,), 2, 1, 64, 9, 4, 3, False, 7),
    ("2d-basic", 1, (40, 48), 2, 2, 128, (13, 7), 1, 1, False, 0),
    ("2d-mixed", 2, (33, 20), 4, 2, 64, (5, 4), (2, 1), (3, 2), (True, False), 5),
    ("2d-k=L", 1, (17, 9), 2, 2, 64, (17, 9), 1, 1, False, 0),
    ("3d-basic", 1, (6, 20, 24), 4, 2, 128, (3, 9, 7), 1, (1, 2, 1), False, 5),
    ("3d-causal", 1, (9, 10, 11), 2, 2, 64, (4, 3, 5), (2, 1, 3), 1, (True, False, True), 0),
    ("3d-odd", 1, (7, 13, 5), 2, 1, 128, (7, 4, 2), 1, (1, 3, 2), (False, True, False), 3),
]


def check(dtype, tol, cases=CASES, arch=0):
    rng = np.random.default_rng(0)
    worst = 0.0
    fails = 0
    for (name, B, S, H, Hkv, D, ks, st, dl, ca, Na) in cases:
        rank = len(S)
        mk = lambda *shape: rng.standard_normal(shape)
        q64, k64, v64 = mk(B, *S, H, D), mk(B, *S, Hkv, D), mk(B, *S, Hkv, D)
        ak64, av64 = mk(B, Na, Hkv, D), mk(B, Na, Hkv, D)
        do64, dlse64 = mk(B, *S, H, D), mk(B, *S, H)
        cast = lambda x: jnp.asarray(x, dtype)
        q, k, v, ak, av, do = map(cast, (q64, k64, v64, ak64, av64, do64))
        dlse = jnp.asarray(dlse64, jnp.float32)
        p = params_for(rank, q, k, v, ks, st, dl, ca)
        out, lse = jax.jit(lambda *a: fused_fwd(*a, p, arch))(q, k, v, ak, av)
        grads = jax.jit(lambda *a: fused_bwd(*a, p, arch))(q, k, v, ak, av, out, lse, do, dlse)
        up = [jnp.asarray(x, jnp.float64) for x in (q, k, v, ak, av, do)]
        ref = reference_all(*up[:5], up[5], jnp.asarray(dlse64, jnp.float64), p)
        names = ["out", "lse", "dq", "dk", "dv", "dak", "dav"]
        got = [out, lse, *grads]
        errs = {}
        for nm, g, r in zip(names, got, ref):
            if nm in ("dak", "dav") and Na == 0:
                continue
            errs[nm] = rel(g, r)
        t = {nm: (1e-5 if nm == "lse" else tol) for nm in errs}
        ok = all(errs[nm] <= t[nm] for nm in errs)
        fails += not ok
        worst = max(worst, max(errs[nm] / t[nm] for nm in errs))
        print(f"sm{arch or 'auto'} {jnp.dtype(dtype).name:8s} {name:14s} " + " ".join(f"{nm}={e:.1e}" for nm, e in errs.items())
              + ("  ok" if ok else "  FAIL"), flush=True)
    return fails, worst


ONCE = False  # --once: each call runs once, no warm-up (for ncu)


def time_fn(f, args, reps=20):
    # Compile, then run for at least 0.3 s: the first timed kernel otherwise meets an idle GPU's
    # clocks (measured: p1 forward 5.0 ms as the first kernel timed, 2.65 ms after another one).
    jax.block_until_ready(f(*args))
    if ONCE:
        return float("nan")
    t_end = time.perf_counter() + 0.3
    while time.perf_counter() < t_end:
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))




def bench(dtype=jnp.bfloat16, only=None, reps=20, arches=(0,)):
    rows = []
    rng = np.random.default_rng(1)
    for prob in PROBLEMS:
        pid, B, S, H, D = prob.id, prob.B, prob.spatial, prob.H, prob.D
        ks, st, dl, ca = prob.kernel, prob.stride, prob.dilation, prob.causal
        if only and pid not in only:
            continue
        rank = len(S)
        N = math.prod(S)
        Dk = 64 if D <= 64 else 128  # the kernel's head dim (zero padding does not change scores)
        mk = lambda shape: jnp.pad(jnp.asarray(rng.standard_normal(shape, np.float32), dtype),
                                   [(0, 0)] * (len(shape) - 1) + [(0, Dk - D)])
        q, k, v, do = (mk((B, *S, H, D)) for _ in range(4))
        ak = av = jnp.zeros((B, 0, H, Dk), dtype)
        p = params_for(rank, q[..., :D], k[..., :D], v[..., :D], ks, st, dl, ca)
        W = p.window_size
        t_arch, tb_arch = {}, {}
        for arch in arches:
            fwd = jax.jit(lambda *a, arch=arch: fused_fwd(*a, p, arch))
            t_arch[arch] = time_fn(fwd, (q, k, v, ak, av), reps)
            out, lse = fwd(q, k, v, ak, av)
            dlse = jnp.zeros_like(lse)
            bwd = jax.jit(lambda *a, arch=arch: fused_bwd(*a, p, arch))
            tb_arch[arch] = time_fn(bwd, (q, k, v, ak, av, out, lse, do, dlse), reps)
        t_f, t_b = t_arch[arches[0]], tb_arch[arches[0]]
        flops = 4.0 * B * H * N * W * D
        # cuDNN self attention (same q/k/v), forward.
        try:
            if ONCE:
                raise RuntimeError("--once")
            sdpa = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q[..., :D].reshape(B, N, H, D), k[..., :D].reshape(B, N, H, D), v[..., :D].reshape(B, N, H, D),
                implementation="cudnn"))
            t_c = time_fn(sdpa, (q, k, v), reps=min(reps, 5 if N > 40000 else 20))
        except Exception as e:  # noqa: BLE001
            t_c = float("nan")
        row = dict(problem=pid, fwd_ms=t_f * 1e3, bwd_ms=t_b * 1e3, fwd_tflops=flops / t_f / 1e12,
                   bwd_tflops=2.5 * flops / t_b / 1e12, fwdbwd_tflops=3.5 * flops / (t_f + t_b) / 1e12,
                   cudnn_fwd_ms=t_c * 1e3, speedup=t_c / t_f, ideal=(t_c / t_f) / (N / W),
                   fwd_ms_by_arch={str(a): t * 1e3 for a, t in t_arch.items()},
                   fwd_tflops_by_arch={str(a): flops / t / 1e12 for a, t in t_arch.items()},
                   bwd_ms_by_arch={str(a): t * 1e3 for a, t in tb_arch.items()},
                   bwd_tflops_by_arch={str(a): 2.5 * flops / t / 1e12 for a, t in tb_arch.items()})
        rows.append(row)
        if len(arches) > 1:
            print(f"{pid:18s} by arch: " + ", ".join(
                f"{a or 'auto'}: fwd {t * 1e3:.3f} ms {flops / t / 1e12:.1f} TF/s, bwd {tb_arch[a] * 1e3:.3f} ms "
                f"{2.5 * flops / tb_arch[a] / 1e12:.1f} TF/s" for a, t in t_arch.items()), flush=True)
        print(f"{pid:18s} fwd {row['fwd_ms']:8.3f} ms {row['fwd_tflops']:6.1f} TF/s | bwd {row['bwd_ms']:8.3f} ms "
              f"{row['bwd_tflops']:6.1f} TF/s | fwd+bwd {row['fwdbwd_tflops']:6.1f} TF/s | cuDNN fwd "
              f"{row['cudnn_fwd_ms']:8.3f} ms, speedup {row['speedup']:5.2f}, ideal {row['ideal']:4.2f}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="three small cases in bf16 (and float32 on the "
                    "portable kernels), no benchmark "
                    "(for compute-sanitizer)")
    ap.add_argument("--only", nargs="*", default=None, help="benchmark only these problem ids, no checks")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--bench-dtype", default="bfloat16", help="with --only: bfloat16, float16 or float32 "
                    "(float32: --arch 80 or 0)")
    ap.add_argument("--once", action="store_true", help="with --only: run each kernel once, untimed, no "
                    "cuDNN (to profile with ncu)")
    ap.add_argument("--arch", default="0", help="kernels, comma list: 0 (auto), 80, 90; checks run for "
                    "each, the benchmark times each forward and backward (the first one in the summary)")
    a = ap.parse_args()
    arches = tuple(int(x) for x in a.arch.split(","))
    global ONCE
    ONCE = a.once
    _ext.register_targets()
    print(jax.devices(), _ext.register_targets())
    fails = 0
    if a.only:
        rows = bench(dtype=jnp.dtype(a.bench_dtype), only=a.only, reps=a.reps, arches=arches)
    elif a.quick:
        for arch in arches:
            f, w = check(jnp.bfloat16, 1e-2, [CASES[i] for i in (2, 4, 8)], arch)
            fails += f
            if arch != 90:  # float32: the portable kernels only
                fails += check(jnp.float32, 1e-5, [CASES[i] for i in (2, 4, 8)], arch)[0]
        rows = []
    else:
        for arch in arches:
            for dt, tol in ((jnp.bfloat16, 1e-2), (jnp.float16, 2e-3), (jnp.float32, 1e-5)):
                if arch == 90 and dt == jnp.float32:
                    continue  # the Hopper kernels are 16-bit only
                f, w = check(dt, tol, CASES, arch)
                fails += f
                print(f"arch {arch}, {jnp.dtype(dt).name}: {f} failing cases, worst error / tolerance {w:.3f}",
                      flush=True)
        rows = [] if a.no_bench else bench(reps=a.reps, arches=arches)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(fails=fails, bench=rows), fh, indent=1)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
