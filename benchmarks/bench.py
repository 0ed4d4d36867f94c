"""Benchmark jax_na backends against cuDNN self attention on the problem set of BENCHMARKS.md.

Prints one table (forward and forward+backward per problem and backend) and writes JSON.
Metric: useful FLOPs fwd = 4*B*H*N*W*D (2*B*H*N*W*(D+Dv) with Dv != D), fwd+bwd = 3.5x fwd;
speedup = cuDNN self attention time / NA time (same process); fraction of ideal = speedup / (N/W).

Usage: python benchmarks/bench.py [--problems p2-2d,p4-nat-small] [--backends naive,reference]
                                  [--dtype bfloat16] [--modes fwd,fwdbwd] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_na


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    B: int
    spatial: tuple
    H: int
    D: int
    kernel: tuple
    stride: tuple
    dilation: tuple
    causal: tuple

    @property
    def rank(self):
        return len(self.spatial)

    @property
    def N(self):
        return math.prod(self.spatial)

    @property
    def W(self):
        return math.prod(self.kernel)


def _p(id, B, spatial, H, D, kernel, stride=1, dilation=1, causal=False):
    r = len(spatial)
    t = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,) * r
    return Problem(id, B, tuple(spatial), H, D, t(kernel), t(stride), t(dilation), t(causal))


PROBLEMS = [
    _p("p1-1d-long", 1, (32768,), 16, 128, 2048),
    _p("p2-2d", 1, (128, 128), 16, 128, 31),
    _p("p3-3d", 1, (16, 32, 32), 16, 128, (7, 13, 13)),
    _p("p4-nat-small", 64, (56, 56), 4, 32, 7),
    _p("p5-dinat-dilated", 32, (28, 28), 8, 32, 7, dilation=4),
    _p("p6-flux", 1, (256, 256), 24, 128, 80),
    _p("p7-flux-strided", 1, (256, 256), 24, 128, 80, stride=16),
    _p("p8-video", 1, (30, 48, 80), 24, 128, (18, 24, 24)),
    _p("p9-video-strided", 1, (30, 48, 80), 24, 128, (18, 24, 24), stride=(16, 8, 8)),
    _p("p10-video-causal", 1, (16, 32, 32), 16, 128, (7, 13, 13), causal=(True, False, False)),
    _p("p11-1d-d64", 4, (16384,), 16, 64, 1023, causal=True),
]
BY_ID = {p.id: p for p in PROBLEMS}

# The naive backend materializes [B, N, H, W] float32 scores (twice in the backward).
NAIVE_WORKSPACE_LIMIT = 24 << 30


def na_fn(p: Problem):
    return getattr(jax_na, f"na{p.rank}d")


def fits(p: Problem, backend: str, mode: str) -> str | None:
    """None if the backend can run the problem here, else why not."""
    if backend == "naive":
        ws = 4 * p.B * p.N * p.H * p.W * (1 if mode == "fwd" else 3)
        if ws > NAIVE_WORKSPACE_LIMIT:
            return f"workspace {ws / 2**30:.0f} GiB"
    return None


def timeit(fn, args, reps: int, budget_s: float):
    """Median and spread of per-call times (device-synchronized), after a warm-up."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    reps = max(3, min(reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    times = np.array(times)
    return float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90)), reps


def make_inputs(p: Problem, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (p.B, *p.spatial, p.H, p.D)
    return [jax.random.normal(k, shape, dtype) for k in keys]


def na_callable(p: Problem, backend: str, mode: str):
    na = na_fn(p)
    f = lambda q, k, v: na(q, k, v, p.kernel, stride=p.stride, dilation=p.dilation, is_causal=p.causal,
                           backend=backend)
    if mode == "fwd":
        return jax.jit(lambda q, k, v, do: f(q, k, v))
    return jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))


def cudnn_callable(p: Problem, mode: str):
    """Dense self attention over all N tokens (causal when every axis is causal, i.e. 1-D causal)."""
    causal = all(p.causal)
    flat = lambda x: x.reshape(p.B, p.N, p.H, p.D)

    def f(q, k, v):
        return jax.nn.dot_product_attention(flat(q), flat(k), flat(v), is_causal=causal,
                                            implementation="cudnn")

    if mode == "fwd":
        return jax.jit(lambda q, k, v, do: f(q, k, v))
    return jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](flat(do)))


def run(problems, backends, dtype, modes, reps, budget_s):
    rows = []
    on_gpu = any(d.platform == "gpu" for d in jax.devices())
    for p in problems:
        args = make_inputs(p, dtype)
        io_bytes = 4 * p.B * p.N * p.H * p.D * jnp.dtype(dtype).itemsize
        for mode in modes:
            flops = 4 * p.B * p.H * p.N * p.W * p.D * (1.0 if mode == "fwd" else 3.5)
            base = None
            if on_gpu:
                try:
                    med, lo, hi, n = timeit(cudnn_callable(p, mode), args, reps, budget_s)
                    base = med
                    rows.append(dict(problem=p.id, mode=mode, backend="cudnn-self", ms=1e3 * med,
                                     p10_ms=1e3 * lo, p90_ms=1e3 * hi, reps=n,
                                     dense_tflops=flops * p.N / p.W / med / 1e12))
                except Exception as e:  # noqa: BLE001 - report and continue
                    rows.append(dict(problem=p.id, mode=mode, backend="cudnn-self", error=str(e)[:200]))
            for b in backends:
                why = fits(p, b, mode)
                if why:
                    rows.append(dict(problem=p.id, mode=mode, backend=b, skipped=why))
                    continue
                try:
                    med, lo, hi, n = timeit(na_callable(p, b, mode), args, reps, budget_s)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(problem=p.id, mode=mode, backend=b, error=str(e)[:300]))
                    continue
                row = dict(problem=p.id, mode=mode, backend=b, ms=1e3 * med, p10_ms=1e3 * lo,
                           p90_ms=1e3 * hi, reps=n, eff_tflops=flops / med / 1e12,
                           bandwidth_tbs=io_bytes / med / 1e12 if mode == "fwd" else None)
                if base:
                    row["speedup_vs_self"] = base / med
                    row["fraction_of_ideal"] = base / med / (p.N / p.W)
                rows.append(row)
                print(_fmt(row), file=sys.stderr, flush=True)
    return rows


def _fmt(r):
    if "skipped" in r or "error" in r:
        return f"{r['problem']:<18} {r['mode']:<7} {r['backend']:<11} {r.get('skipped') or r.get('error')}"
    extra = ""
    if "eff_tflops" in r:
        extra = f"{r['eff_tflops']:>8.1f}"
        extra += f" {r['speedup_vs_self']:>8.2f} {r['fraction_of_ideal']:>6.3f}" if "speedup_vs_self" in r else ""
        if r.get("bandwidth_tbs"):
            extra += f"  {r['bandwidth_tbs']:.3f} TB/s"
    else:
        extra = f"{'':>8} (dense {r['dense_tflops']:.0f} TFLOP/s)"
    return f"{r['problem']:<18} {r['mode']:<7} {r['backend']:<11} {r['ms']:>10.3f} {extra}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default=",".join(p.id for p in PROBLEMS))
    ap.add_argument("--backends", default=None, help="comma list; default: every available backend")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of timed runs per entry at most")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    problems = [BY_ID[i] for i in a.problems.split(",")]
    backends = a.backends.split(",") if a.backends else jax_na.available_backends()
    print(f"jax {jax.__version__}, devices {jax.devices()}, dtype {a.dtype}, backends {backends}", flush=True)
    rows = run(problems, backends, jnp.dtype(a.dtype), a.modes.split(","), a.reps, a.budget)
    print(f"\n{'problem':<18} {'mode':<7} {'backend':<11} {'median ms':>10} {'eff TF/s':>8} "
          f"{'speedup':>8} {'ideal':>6}")
    for r in rows:
        print(_fmt(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), dtype=a.dtype, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
