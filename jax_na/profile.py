"""Profile neighborhood attention: every backend plus dense self attention, in one process.

    python -m jax_na.profile --problem p4-nat-small            # a problem of the repo's problem set
    python -m jax_na.profile --problem all --json out.json     # the whole set (BENCHMARKS.md)
    python -m jax_na.profile --spatial 64x64 --heads 4 --head-dim 32 --kernel 7 --dilation 2 \\
        --batch 8 --dtype bfloat16 --mode fwd,fwdbwd --backends fused,gemm,reference,naive --plot out.png
    python -m jax_na.profile --problem p2-2d --sweep-tiles     # tile-shape sweep of the tunable backends
    python -m jax_na.profile --problem p1-1d-long --clocks --sustain 3   # steady state, with clocks

Installed as the console script ``jax-na-profile`` too.

Metric (BENCHMARKS.md): useful FLOPs forward = 4*B*H*N*W*D (N tokens, W = product of the kernel
sizes), forward+backward = 3.5x forward; effective TFLOP/s = useful FLOPs / median time; speedup =
time of dense self attention on the same q/k/v (cuDNN on a GPU, measured in this process) / time of
NA; fraction of ideal = speedup / (N/W). Bandwidth = bytes of q, k, v, out (forward; forward+backward
adds out, dout, dq, dk, dv) / median time, shown for memory-bound problems (arithmetic intensity
below ``RIDGE_FLOP_PER_BYTE``). Timing: warm-up, then the median (and 10th/90th percentiles) of
``--reps`` samples on fresh random inputs, fewer when they would exceed the budget; a sample is one
device-synchronized call, or for calls under 20 ms the mean of a batch of calls issued back to back
and synchronized once (the host's dispatch then overlaps the device work, as in a training step).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jax_na
from jax_na import _checks, _ext

__all__ = [
    "PROBLEMS", "BY_ID", "problem_by_id", "Problem", "TUNABLE_BACKENDS", "TileSweep", "register_tunable", "make_problem",
    "parse_problem", "run", "timeit", "ClockSampler", "format_table", "main",
]


# ----------------------------------------------------------------------------- problems

# FLOPs of each mode in forwards: the backward does 2.5 forwards' work (BENCHMARKS.md). "bwd" rows
# are derived, forward+backward minus forward (backward_rows).
MODE_FORWARDS = {"fwd": 1.0, "fwdbwd": 3.5, "bwd": 2.5}


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
    def rank(self) -> int:
        return len(self.spatial)

    @property
    def N(self) -> int:
        return math.prod(self.spatial)

    @property
    def W(self) -> int:
        return math.prod(self.kernel)

    def flops(self, mode: str) -> float:
        """Useful FLOPs of NA (BENCHMARKS.md): 4*B*H*N*W*D forward, 3.5x that forward+backward (so
        2.5x for the backward alone, mode "bwd")."""
        return 4.0 * self.B * self.H * self.N * self.W * self.D * MODE_FORWARDS[mode]

    def dense_flops(self, mode: str) -> float:
        """FLOPs of dense self attention over all N tokens (half of them when causal)."""
        f = 4.0 * self.B * self.H * self.N * self.N * self.D * MODE_FORWARDS[mode]
        return f / 2 if self.dense_causal else f

    @property
    def dense_causal(self) -> bool:
        """Dense self attention is causal when every axis is (a 1-D causal problem)."""
        return all(self.causal)

    def io_bytes(self, mode: str, itemsize: int) -> int:
        """q, k, v, out read/written once; the backward adds out, dout, dq, dk, dv (and q, k, v again)."""
        tensor = self.B * self.N * self.H * self.D * itemsize
        return tensor * {"fwd": 4, "fwdbwd": 12, "bwd": 8}[mode]

    def describe(self) -> str:
        x = lambda t: "x".join(str(int(i)) for i in t)
        s = (f"{self.rank}-D B={self.B} {x(self.spatial)} H={self.H} D={self.D} kernel {x(self.kernel)}")
        if any(i != 1 for i in self.stride):
            s += f" stride {x(self.stride)}"
        if any(i != 1 for i in self.dilation):
            s += f" dilation {x(self.dilation)}"
        if any(self.causal):
            s += " causal " + "".join("T" if c else "F" for c in self.causal)
        return s

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(rank=self.rank, N=self.N, W=self.W)
        return d


def make_problem(id, B, spatial, H, D, kernel, stride=1, dilation=1, causal=False) -> Problem:
    """A Problem; kernel/stride/dilation/causal are an int/bool (every axis) or one per axis."""
    spatial = tuple(int(s) for s in spatial)
    r = len(spatial)

    def t(x, name, conv):
        x = tuple(x) if isinstance(x, (tuple, list)) else (x,) * r
        if len(x) != r:
            raise ValueError(f"{name} has {len(x)} entries for a rank-{r} problem")
        return tuple(conv(i) for i in x)

    return Problem(id, int(B), spatial, int(H), int(D), t(kernel, "kernel", int), t(stride, "stride", int),
                   t(dilation, "dilation", int), t(causal, "causal", bool))


_p = make_problem

# The problem set of BENCHMARKS.md (bf16 unless a run says otherwise).
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


def problem_by_id(name: str) -> Problem:
    """The named problem of BENCHMARKS.md: its full id (``"p1-1d-long"``) or its number (``"p1"``).

    Example: ``problem_by_id("p3").spatial == (16, 32, 32)``.
    """
    if name in BY_ID:
        return BY_ID[name]
    short = [p for p in PROBLEMS if p.id.split("-")[0] == name]
    if len(short) == 1:
        return short[0]
    raise ValueError(f"unknown problem {name!r}; known: {', '.join(BY_ID)} (or their numbers, p1 to "
                     f"p{len(PROBLEMS)})")


# What `python -m jax_na.profile` runs without a problem on a machine without a GPU: small enough
# for the reference backend on a laptop CPU (a 2-D NAT-like layer).
CPU_DEFAULT = _p("cpu-small", 2, (32, 32), 4, 32, 7)

# The naive backend materializes [B, N, H, W] float32 scores (twice in the backward); the gemm
# backend's qk -> softmax -> av holds such scores too (in the input dtype, their float32 softmax, the
# weights in the input dtype; about three times that in the backward). Larger problems are skipped.
NAIVE_WORKSPACE_LIMIT = 24 << 30
# Dense self attention without a fused kernel (the XLA yardstick: off-GPU, and for float32, which
# cuDNN's fused attention does not take) materializes [B, H, N, N]; larger problems are skipped.
XLA_SELF_LIMIT = 2 << 30
XLA_SELF_LIMIT_GPU = 24 << 30
# Arithmetic intensity (FLOP/byte) under which a problem counts as memory bound: about the H100's
# bf16 dense FLOP rate over its HBM bandwidth (990 TFLOP/s / 3.35 TB/s).
RIDGE_FLOP_PER_BYTE = 300.0


def _ints(s: str) -> tuple:
    return tuple(int(i) for i in str(s).replace(",", "x").split("x") if i != "")


def _bools(s: str) -> tuple:
    out = []
    for i in str(s).replace(",", "x").split("x"):
        i = i.strip().lower()
        if i in ("t", "true", "1", "yes", "y"):
            out.append(True)
        elif i in ("f", "false", "0", "no", "n"):
            out.append(False)
        else:
            raise ValueError(f"causal: cannot read {i!r} (use T/F, 1/0, true/false per axis)")
    return tuple(out)


def parse_problem(a) -> Problem:
    """The custom problem given by the --rank/--batch/--spatial/... options."""
    spatial = _ints(a.spatial)
    if a.rank is not None:
        if len(spatial) == 1:
            spatial = spatial * a.rank
        elif len(spatial) != a.rank:
            raise ValueError(f"--spatial {a.spatial} does not have --rank {a.rank} entries")
    r = len(spatial)
    if not 1 <= r <= 3:
        raise ValueError(f"rank must be 1, 2 or 3, got spatial {a.spatial}")

    def per_axis(vals, name):
        if len(vals) == 1:
            return vals * r
        if len(vals) != r:
            raise ValueError(f"--{name} needs 1 or {r} entries, got {len(vals)}")
        return vals

    kernel = per_axis(_ints(a.kernel), "kernel")
    stride = per_axis(_ints(a.stride), "stride")
    dilation = per_axis(_ints(a.dilation), "dilation")
    causal = per_axis(_bools(a.causal), "causal")
    p = make_problem("custom", a.batch, spatial, a.heads, a.head_dim, kernel, stride, dilation, causal)
    return dataclasses.replace(p, id=a.name or "custom")


# ----------------------------------------------------------------------------- timing

# Calls faster than this are timed in back-to-back batches (one synchronization per batch) whose mean
# is one sample: with a synchronization per call every sample also holds the host's dispatch of the
# call, which in a training step overlaps the device work (on an H200 the per-call medians of p1, p2,
# p6 and p7 were 0.13-0.38 ms above the fused kernel's own event-timed medians of 0.6-12.6 ms).
BATCH_BELOW_S = 0.02


def timeit(fn: Callable, args: Sequence, reps: int = 20, budget_s: float = 4.0, window: list | None = None,
           sustain_s: float = 0.0):
    """Median, 10th and 90th percentile (seconds per call) and the number of samples, after a warm-up.

    A sample is one device-synchronized call, or for calls under ``BATCH_BELOW_S`` the mean of a batch
    of calls issued back to back and synchronized once. ``reps`` samples, or fewer (at least 3) when
    they would exceed ``budget_s``. ``window``: a list that gets the wall-clock span (``time.time()``
    at the first and after the last timed call) appended, for :class:`ClockSampler`. ``sustain_s``:
    first run the calls back to back, untimed, for this many seconds, so that the timed ones see the
    GPU's steady state under load (its power cap and the clock that goes with it) rather than the
    climb to it."""
    jax.block_until_ready(fn(*args))  # compile + warm-up
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    batch = max(1, min(64, int(BATCH_BELOW_S / max(first, 1e-6)))) if first < BATCH_BELOW_S else 1
    reps = max(3, min(reps, int(budget_s / max(first * batch, 1e-6))))
    until = time.perf_counter() + sustain_s
    while time.perf_counter() < until:
        for _ in range(batch):
            out = fn(*args)
        jax.block_until_ready(out)
    times = []
    start = time.time()
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(batch):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / batch)
    if window is not None:
        window.append((start, time.time()))
    times = np.array(times)
    return float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90)), reps


class ClockSampler:
    """The GPU's SM clock, board power and power-cap state, sampled by ``nvidia-smi`` every
    ``interval_ms`` in a background thread, so that a timing can be read with the clock it ran at
    (back-to-back calls hold an H100/H200 at its 700 W cap, where the SM clock drops well below its
    maximum, and less so for short, isolated launches). A context manager; ``ok`` is False, with
    ``why`` saying why, when ``nvidia-smi`` cannot be run. Samples are of GPU ``index`` (nvidia-smi's
    numbering; default: the first of ``CUDA_VISIBLE_DEVICES`` when it is a number, else 0, i.e. the
    GPU of jax's first device)."""

    def __init__(self, interval_ms: int = 100, index: int | None = None, command: str = "nvidia-smi"):
        self.samples: list[tuple[float, float, float, bool]] = []  # (time, SM MHz, W, power-capped)
        self.interval_s = interval_ms / 1e3
        self.ok, self.why, self._proc, self._thread = False, "", None, None
        if index is None:
            first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            index = int(first) if first.isdigit() else 0
        exe = shutil.which(command)
        if exe is None:
            self.why = f"{command} not found"
            return
        # The power-cap reason field's name changed (clocks_throttle_reasons -> clocks_event_reasons).
        probe = None
        for reasons in ("clocks_event_reasons", "clocks_throttle_reasons"):
            args = [exe, f"--query-gpu=clocks.sm,power.draw,{reasons}.sw_power_cap", "--format=csv,noheader,nounits",
                    f"--id={index}"]
            try:
                probe = subprocess.run(args, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as e:
                self.why = f"{command} failed: {e}"
                return
            if probe.returncode == 0:
                break
        else:
            self.why = f"{command} --query-gpu failed: {(probe.stderr or probe.stdout).strip()[:200]}"
            return
        # The same query, looping.
        self._proc = subprocess.Popen([*args, "-lms", str(interval_ms)], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.ok = True

    def _read(self):
        for line in self._proc.stdout:
            fields = [f.strip() for f in line.split(",")]
            try:
                self.samples.append((time.time(), float(fields[0]), float(fields[1]), fields[2].lower() == "active"))
            except (ValueError, IndexError):  # "[N/A]" or a partial line
                continue

    def window(self, start: float, end: float) -> dict | None:
        """Mean SM clock (MHz), its minimum, mean board power (W) and the fraction of samples under
        the software power cap, over the samples taken in [start, end] (a window shorter than the
        sampling interval: those within one interval of it); None when there are none."""
        samples = list(self.samples)
        got = [x for x in samples if start <= x[0] <= end]
        if not got:
            got = [x for x in samples if start - self.interval_s <= x[0] <= end + self.interval_s]
        if not got:
            return None
        return dict(sm_mhz=sum(x[1] for x in got) / len(got), sm_mhz_min=min(x[1] for x in got),
                    power_w=sum(x[2] for x in got) / len(got), power_capped=sum(x[3] for x in got) / len(got),
                    clock_samples=len(got))

    def close(self):
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self._proc.kill()
            self._proc = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _clocked(row: dict, clocks: ClockSampler | None, window: list) -> dict:
    """``row`` with the clock and power of its timed calls (ClockSampler.window), when sampled."""
    if clocks is not None and window:
        got = clocks.window(*window[-1])
        if got:
            row.update(got)
    return row


def make_inputs(p: Problem, dtype, seed: int = 0):
    """q, k, v and the output cotangent: fresh standard-normal arrays [B, *spatial, H, D]."""
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (p.B, *p.spatial, p.H, p.D)
    return [jax.random.normal(k, shape, dtype) for k in keys]


def na_fn(p: Problem):
    return getattr(jax_na, f"na{p.rank}d")


def fits(p: Problem, backend: str, mode: str, dtype=None) -> str | None:
    """None if the backend can run the problem here (in ``dtype``, when given), else why not."""
    if _checks.backend_family(backend) == "fused":
        # What each fused backend takes (jax_na._checks): float32 on the portable set only.
        allowed = [jnp.dtype(d).name for d in _checks.BACKEND_DTYPES[backend]]
        if dtype is not None and jnp.dtype(dtype).name not in allowed:
            return f"skipped: {backend} takes {'/'.join(allowed)}, not {jnp.dtype(dtype).name}"
        dt = dtype if dtype is not None else jnp.bfloat16
        if _checks.fused_head_dim(p.D, p.D, dt, backend) is None:
            return (f"skipped: {backend} takes head dims up to {_checks.fused_head_dims(dt, backend)[-1]} in "
                    f"{jnp.dtype(dt).name}, not {p.D}")
        if p.H > _checks.FUSED_MAX_HEADS:
            return f"skipped: fused takes at most {_checks.FUSED_MAX_HEADS} heads"
    scores = p.B * p.N * p.H * p.W
    if backend == "naive":
        ws = 4 * scores * (1 if mode == "fwd" else 3)
        if ws > NAIVE_WORKSPACE_LIMIT:
            return f"skipped: workspace {ws / 2**30:.0f} GiB"
    if backend == "gemm":
        itemsize = jnp.dtype(dtype).itemsize if dtype is not None else 4
        ws = (2 * itemsize + 4) * scores * (1 if mode == "fwd" else 3)
        if ws > NAIVE_WORKSPACE_LIMIT:
            return f"skipped: scores {ws / 2**30:.0f} GiB"
    return None


def na_callable(p: Problem, backend: str, mode: str, **kw):
    """A jitted (q, k, v, dout) -> forward or backward of the problem on ``backend``; ``kw``: more
    na{rank}d arguments (q_tile_shape / kv_tile_shape, backward_q_tile_shape /
    backward_kv_tile_shape, deterministic_backward)."""
    na = na_fn(p)
    f = lambda q, k, v: na(q, k, v, p.kernel, stride=p.stride, dilation=p.dilation, is_causal=p.causal,
                           backend=backend, **kw)
    if mode == "fwd":
        return jax.jit(lambda q, k, v, do: f(q, k, v))
    return jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))


def self_attention_callable(p: Problem, mode: str, implementation: str):
    """Dense self attention over all N tokens, ``jax.nn.dot_product_attention`` (cudnn or xla)."""
    flat = lambda x: x.reshape(p.B, p.N, p.H, p.D)

    def f(q, k, v):
        return jax.nn.dot_product_attention(flat(q), flat(k), flat(v), is_causal=p.dense_causal,
                                            implementation=implementation)

    if mode == "fwd":
        return jax.jit(lambda q, k, v, do: f(q, k, v))
    return jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](flat(do)))


# ----------------------------------------------------------------------------- tunable backends

@dataclasses.dataclass(frozen=True)
class TileSweep:
    """How to sweep the tile shapes of one backend.

    configs(problem, mode, dtype, deterministic_backward=None) -> the candidate tile configurations
    (dicts, JSON-serializable) that are valid for the problem (in mode fwdbwd, those of the backward
    mode na{rank}d's ``deterministic_backward`` resolves to); make(problem, mode, config) -> a
    callable (q, k, v, dout) like ``na_callable`` that runs the backend with that configuration.
    """

    configs: Callable[..., list]
    make: Callable[[Problem, str, dict], Callable]


# Backends with kernel configurations to choose from at run time (register_tunable); `--sweep-tiles`
# times each (by default "fused" only). "fused": every kernel set (portable, and Hopper where this
# machine has it) at every compiled tile configuration of the direction timed
# (jax_na.fused_tile_configs): the forward's in mode fwd, the backward's in mode fwdbwd (the forward
# then at its default), the basis of the defaults in cuda/fused/tile_shapes.cuh and of the kernel
# choice in cuda/fused/dispatch.cu. "fused_sm80" / "fused_sm90": the same over that kernel set only.
TUNABLE_BACKENDS: dict[str, TileSweep] = {}


def register_tunable(name: str, sweep: TileSweep) -> None:
    TUNABLE_BACKENDS[name] = sweep


def _register_fused_variants() -> None:
    """Register "fused" as tunable over its kernel sets and tile configurations where this machine
    runs the fused kernels, and each kernel set's pinned backend over that set's."""
    if "fused" in TUNABLE_BACKENDS or "fused" not in _ext.available_backends():
        return
    sets = {"portable (sm80)": "fused_sm80"}
    if _ext.has_hopper_kernels():
        sets["hopper (sm90)"] = "fused_sm90"

    def prefix(mode):  # the na{rank}d arguments a configuration sets: the forward's or the backward's
        return "" if mode == "fwd" else "backward_"

    def configs(p, mode, dtype, deterministic_backward=None, only=None):
        if fits(p, "fused", mode, dtype):
            return []
        # the backward's configurations are per mode: the one the call resolves to, named in each entry
        mode_kw = {} if mode == "fwd" else {
            "deterministic_backward": _checks.deterministic_arg(deterministic_backward, dtype, p.D)}
        out = []
        for name, backend in sets.items():
            if (only and backend != only) or fits(p, backend, mode, dtype):
                continue
            for q, kv in jax_na.fused_tile_configs(p.rank, dtype, p.D, backward=mode != "fwd", **mode_kw)[backend]:
                out.append({"kernels": name, f"{prefix(mode)}q_tile_shape": list(q),
                            f"{prefix(mode)}kv_tile_shape": list(kv), **mode_kw})
        return out

    def make(p, mode, cfg):
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k != "kernels"}
        return na_callable(p, sets[cfg["kernels"]], mode, **kw)

    register_tunable("fused", TileSweep(configs, make))
    for backend in sets.values():
        register_tunable(backend, TileSweep(functools.partial(configs, only=backend), make))


def sweep_tiles(problems, backends, dtype, modes, reps, budget_s, progress=None,
                clocks: ClockSampler | None = None, sustain_s: float = 0.0, deterministic_backward=None):
    """Time every tile configuration of every tunable backend; rows as ``run`` plus ``config`` and
    ``best`` (the fastest configuration per problem, mode and backend). ``clocks``, ``sustain_s`` and
    ``deterministic_backward`` (the backward mode, None: na{rank}d's default) as in :func:`run`."""
    rows = []
    for p in problems:
        args = make_inputs(p, dtype)
        for mode in modes:
            for b in backends:
                sweep = TUNABLE_BACKENDS[b]
                entries = []
                for cfg in sweep.configs(p, mode, dtype, deterministic_backward=deterministic_backward):
                    window: list = []
                    try:
                        med, lo, hi, n = timeit(sweep.make(p, mode, cfg), args, reps, budget_s, window, sustain_s)
                    except Exception as e:  # noqa: BLE001 - report and continue
                        rows.append(dict(problem=p.id, mode=mode, backend=b, config=cfg,
                                         error=_err(e)))
                        continue
                    row = dict(problem=p.id, mode=mode, backend=b, config=cfg, ms=1e3 * med,
                               p10_ms=1e3 * lo, p90_ms=1e3 * hi, reps=n,
                               eff_tflops=p.flops(mode) / med / 1e12, best=False)
                    _clocked(row, clocks, window)
                    entries.append(row)
                    rows.append(row)
                    _say(progress, f"{p.id:<18} {mode:<7} {b:<10} {json.dumps(cfg)} {row['ms']:.3f} ms{_clock_note(row)}")
                if entries:
                    min(entries, key=lambda r: r["ms"])["best"] = True
        if progress is not None:
            progress.update(1)
    return rows


# ----------------------------------------------------------------------------- running

def _err(e: Exception) -> str:
    s = f"{type(e).__name__}: {e}".strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


class _Quiet:
    """A progress object that shows nothing (--no-progress)."""

    def update(self, n):
        pass

    def write(self, msg, file=None):
        pass

    def close(self):
        pass


def _say(progress, msg):
    """A live line per timed row: through tqdm when there is a bar, to stderr without one."""
    if progress is not None and hasattr(progress, "write"):
        progress.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


def yardstick(on_gpu: bool, dtype=jnp.bfloat16) -> tuple[str, str]:
    """(row name, jax.nn.dot_product_attention implementation) of the dense self attention baseline:
    cuDNN's fused attention on a GPU in float16/bfloat16, XLA's elsewhere (cuDNN takes 16-bit only)."""
    if on_gpu and jnp.dtype(dtype) in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        return "cudnn-self", "cudnn"
    return "xla-self", "xla"


def run(problems: Iterable[Problem], backends: Sequence[str], dtype, modes: Sequence[str], reps: int = 20,
        budget_s: float = 4.0, self_attention: bool = True, progress=None,
        deterministic_backward: bool | None = None, clocks: ClockSampler | None = None,
        sustain_s: float = 0.0) -> list[dict]:
    """Time every backend (and dense self attention) on every problem and mode; one dict per row.
    ``clocks``: a running :class:`ClockSampler`; each timed row then carries the mean SM clock, board
    power and power-cap share of its timed calls (``sm_mhz``, ``sm_mhz_min``, ``power_w``,
    ``power_capped``, ``clock_samples``). ``sustain_s``: :func:`timeit`'s untimed back-to-back calls
    before each entry's timed ones."""
    rows = []
    on_gpu = _on_gpu()
    sa_name, sa_impl = yardstick(on_gpu, dtype)
    sa_limit = XLA_SELF_LIMIT_GPU if on_gpu else XLA_SELF_LIMIT
    itemsize = jnp.dtype(dtype).itemsize
    for p in problems:
        args = make_inputs(p, dtype)
        for mode in modes:
            flops = p.flops(mode)
            io = p.io_bytes(mode, itemsize)
            memory_bound = flops / io < RIDGE_FLOP_PER_BYTE
            base = None
            if self_attention:
                sa_bytes = 4 * p.B * p.H * p.N * p.N * (1 if mode == "fwd" else 3)
                if sa_impl == "xla" and sa_bytes > sa_limit:
                    rows.append(dict(problem=p.id, mode=mode, backend=sa_name,
                                     skipped=f"skipped: [B,H,N,N] scores {sa_bytes / 2**30:.1f} GiB"))
                else:
                    try:
                        window = []
                        med, lo, hi, n = timeit(self_attention_callable(p, mode, sa_impl), args, reps,
                                                budget_s, window, sustain_s)
                        base = med
                        row = dict(problem=p.id, mode=mode, backend=sa_name, ms=1e3 * med, p10_ms=1e3 * lo,
                                   p90_ms=1e3 * hi, reps=n, dense_tflops=p.dense_flops(mode) / med / 1e12)
                        rows.append(_clocked(row, clocks, window))
                        _say(progress, format_row(row))
                    except Exception as e:  # noqa: BLE001 - report and continue
                        rows.append(dict(problem=p.id, mode=mode, backend=sa_name, error=_err(e)))
            for b in backends:
                why = fits(p, b, mode, dtype)
                if why:
                    rows.append(dict(problem=p.id, mode=mode, backend=b, skipped=why))
                    continue
                window = []
                try:
                    med, lo, hi, n = timeit(na_callable(p, b, mode, deterministic_backward=deterministic_backward),
                                            args, reps, budget_s, window, sustain_s)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(problem=p.id, mode=mode, backend=b, error=_err(e)))
                    _say(progress, format_row(rows[-1]))
                    continue
                row = dict(problem=p.id, mode=mode, backend=b, ms=1e3 * med, p10_ms=1e3 * lo,
                           p90_ms=1e3 * hi, reps=n, eff_tflops=flops / med / 1e12,
                           bandwidth_gbs=io / med / 1e9, memory_bound=bool(memory_bound))
                if base:
                    row["speedup_vs_self"] = base / med
                    row["fraction_of_ideal"] = base / med / (p.N / p.W)
                if mode != "fwd" and _checks.backend_family(b) == "fused":  # the mode the call resolved to
                    row["deterministic_backward"] = _checks.deterministic_arg(deterministic_backward, dtype, p.D)
                rows.append(_clocked(row, clocks, window))
                _say(progress, format_row(row))
        for row in backward_rows(p, [r for r in rows if r["problem"] == p.id], itemsize):
            rows.append(row)
            _say(progress, format_row(row))
        if progress is not None:
            progress.update(1)
    return rows


def backward_rows(p: Problem, rows: Sequence[dict], itemsize: int = 2) -> list[dict]:
    """The backward alone (mode "bwd"), for each backend of problem ``p`` timed in both modes: the
    forward+backward median minus the forward's, its effective TFLOP/s (2.5 forwards' FLOPs) and,
    where dense self attention was timed in both modes, the speedup over its own difference and the
    fraction of ideal. The rows carry ``derived=True`` and no spread; a difference that is not
    positive (timing noise on a tiny problem) is a skipped row."""
    timed = {(r["mode"], r["backend"]): r for r in rows if "ms" in r and r["mode"] in ("fwd", "fwdbwd")}
    backends = list(dict.fromkeys(b for _, b in timed))
    out, base = [], None
    for b in backends:  # the self attention row first (run() times it first), if it has both
        if ("fwd", b) not in timed or ("fwdbwd", b) not in timed:
            continue
        ms = timed["fwdbwd", b]["ms"] - timed["fwd", b]["ms"]
        row = dict(problem=p.id, mode="bwd", backend=b, derived=True)
        if ms <= 0:
            row["skipped"] = "skipped: fwdbwd not slower than fwd (timing noise)"
            out.append(row)
            continue
        row["ms"] = ms
        if "dense_tflops" in timed["fwd", b]:  # the self attention yardstick
            row["dense_tflops"] = p.dense_flops("bwd") / (ms * 1e-3) / 1e12
            base = ms
        else:
            flops, io = p.flops("bwd"), p.io_bytes("bwd", itemsize)
            row.update(eff_tflops=flops / (ms * 1e-3) / 1e12, bandwidth_gbs=io / (ms * 1e-3) / 1e9,
                       memory_bound=bool(flops / io < RIDGE_FLOP_PER_BYTE))
            if base:
                row["speedup_vs_self"] = base / ms
                row["fraction_of_ideal"] = base / ms / (p.N / p.W)
        out.append(row)
    return out


def _on_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:  # pragma: no cover
        return False


# ----------------------------------------------------------------------------- output

HEADER = (f"{'problem':<18} {'mode':<7} {'backend':<11} {'median ms':>10} {'p10-p90 ms':>17} "
          f"{'eff TF/s':>9} {'speedup':>8} {'ideal':>6} {'GB/s':>8}")


def format_row(r: dict) -> str:
    head = f"{r['problem']:<18} {r['mode']:<7} {r['backend']:<11}"
    if "ms" not in r:
        return f"{head} {r.get('skipped') or 'error: ' + r.get('error', '?')}"
    spread = "fwdbwd - fwd" if r.get("derived") else f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
    s = f"{head} {r['ms']:>10.3f} {spread:>17}"
    if "eff_tflops" in r:
        s += f" {r['eff_tflops']:>9.3g}"
        if "speedup_vs_self" in r:
            s += f" {r['speedup_vs_self']:>8.2f} {r['fraction_of_ideal']:>6.3f}"
        else:
            s += f" {'-':>8} {'-':>6}"
        s += f" {r['bandwidth_gbs']:>8.1f}" if r.get("memory_bound") else f" {'-':>8}"
    else:
        s += f" {'':>9} (dense {r['dense_tflops']:.3g} TFLOP/s)"
    return s + _clock_note(r)


def _clock_note(r: dict) -> str:
    """The SM clock, power and power-cap share of a row's timed calls (--clocks), or nothing."""
    if "sm_mhz" not in r:
        return ""
    return f"  [SM {r['sm_mhz']:.0f} MHz, {r['power_w']:.0f} W, power-capped {r['power_capped']:.0%}]"


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER, *(format_row(r) for r in rows)])


def plot(rows: list[dict], path: str, title: str = "") -> bool:
    """Bar chart of median times (log scale), grouped by problem and mode; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install 'jax-na[profile]'); no plot written",
              file=sys.stderr)
        return False
    timed = [r for r in rows if "ms" in r and "config" not in r]
    groups = list(dict.fromkeys((r["problem"], r["mode"]) for r in timed))
    backends = list(dict.fromkeys(r["backend"] for r in timed))
    if not groups:
        print("--plot: nothing was timed; no plot written", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(backends)) / 2), 4.5))
    width = 0.8 / len(backends)
    for j, b in enumerate(backends):
        xs, ys = [], []
        for i, g in enumerate(groups):
            hit = [r for r in timed if (r["problem"], r["mode"]) == g and r["backend"] == b]
            if hit:
                xs.append(i + (j - (len(backends) - 1) / 2) * width)
                ys.append(hit[0]["ms"])
        bars = ax.bar(xs, ys, width, label=b)
        for x, y, rect in zip(xs, ys, bars):
            r = [t for t in timed if t["backend"] == b and t["ms"] == y][0]
            if "eff_tflops" in r:
                ax.annotate(f"{r['eff_tflops']:.2g}", (x, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{p}\n{m}" for p, m in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log); labels: effective TFLOP/s")
    ax.set_title(title or "jax_na neighborhood attention", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _progress(total: int, enabled: bool):
    if not enabled:
        return _Quiet()
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="problems", unit="problem", file=sys.stderr, leave=False,
                disable=None)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jax_na.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("problem (a named one, or a custom one from --spatial)")
    g.add_argument("--problem", "--problems", dest="problem", default=None,
                   help="comma list of problem ids of BENCHMARKS.md (p3-3d, or p3), or 'all'; --list shows them")
    g.add_argument("--list", action="store_true", help="list the named problems and exit")
    g.add_argument("--spatial", default=None, help="custom problem: spatial shape, e.g. 32768, 64x64, 8x32x32")
    g.add_argument("--rank", type=int, default=None, help="1, 2 or 3 (default: from --spatial)")
    g.add_argument("--batch", "-B", type=int, default=1)
    g.add_argument("--heads", "-H", type=int, default=4)
    g.add_argument("--head-dim", "-D", type=int, default=32)
    g.add_argument("--kernel", default="7", help="e.g. 7 or 7x13x13")
    g.add_argument("--stride", default="1")
    g.add_argument("--dilation", default="1")
    g.add_argument("--causal", default="F", help="per axis T/F, e.g. T, TxFxF")
    g.add_argument("--name", default=None, help="id of the custom problem in the table (default: custom)")
    r = ap.add_argument_group("what to run")
    r.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    r.add_argument("--mode", "--modes", dest="mode", default="fwd,fwdbwd",
                   help="fwd, fwdbwd (forward+backward) or both, comma separated")
    r.add_argument("--backends", default=None,
                   help="comma list; default: every backend in jax_na.available_backends() but the "
                        "pinned fused_sm80/fused_sm90 (on a GPU: fused, gemm, reference, naive); e.g. "
                        "fused_sm90,fused_sm80 compares the two kernel sets")
    r.add_argument("--no-self-attention", action="store_true", help="skip the dense self attention baseline")
    det = r.add_mutually_exclusive_group()
    det.add_argument("--deterministic-backward", dest="deterministic_backward", action="store_const", const=True,
                     default=None, help="na*d's deterministic_backward=True (the Hopper fused backward's dQ and "
                                        "dK/dV kernels); default: na*d's (non-deterministic at 16-bit head dims up to 128 unless "
                                        "XLA_FLAGS asks for deterministic ops); also --sweep-tiles' backward mode")
    det.add_argument("--nondeterministic-backward", dest="deterministic_backward", action="store_const",
                     const=False, help="na*d's deterministic_backward=False (the Hopper fused backward's "
                                       "warp-specialized kernel adds dQ)")
    r.add_argument("--reps", type=int, default=20, help="timing samples per entry (at most; a sample is one call, or the mean of a batch of calls under 20 ms)")
    r.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per entry at most")
    r.add_argument("--clocks", action="store_true",
                   help="sample the GPU's SM clock, board power and power-cap state (nvidia-smi, every 100 ms) "
                        "over each entry's timed calls and add them to its row (back-to-back calls can hold a "
                        "GPU at its power cap, at a lower clock than short runs)")
    r.add_argument("--sustain", type=float, default=0.0, metavar="SECONDS",
                   help="before each entry's timed calls, run it back to back (untimed) for this long, so that "
                        "its timing (and --clocks) is of the GPU's steady state under load, e.g. 3")
    r.add_argument("--sweep-tiles", action="store_true",
                   help="sweep the kernel configurations of the backends registered in TUNABLE_BACKENDS "
                        "instead and report the best (fused: each kernel set, portable and on an H100/H200 "
                        "Hopper, at each compiled tile configuration, jax_na.fused_tile_configs: the "
                        "forward's in mode fwd, the backward's in mode fwdbwd; --backends fused_sm80 or "
                        "fused_sm90: that kernel set only)")
    o = ap.add_argument_group("output")
    o.add_argument("--json", default=None, help="write the rows (and the problems) as JSON")
    o.add_argument("--plot", default=None, help="write a bar chart (PNG; needs matplotlib)")
    o.add_argument("--no-progress", action="store_true",
                   help="no progress bar and no live lines on stderr (only the final table)")
    return ap


def _problems(a, on_gpu: bool) -> list[Problem]:
    if a.problem and a.spatial:
        raise ValueError("give either --problem or --spatial, not both")
    if a.spatial:
        return [parse_problem(a)]
    if a.problem in (None, ""):
        return list(PROBLEMS) if on_gpu else [CPU_DEFAULT]
    if a.problem == "all":
        return list(PROBLEMS)
    out = []
    for i in a.problem.split(","):
        if i == CPU_DEFAULT.id:
            out.append(CPU_DEFAULT)
        else:
            try:
                out.append(problem_by_id(i))
            except ValueError as e:
                raise ValueError(f"{e}, or {CPU_DEFAULT.id}") from None
    return out


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.list:
        for p in [*PROBLEMS, CPU_DEFAULT]:
            print(f"{p.id:<18} {p.describe()}")
        return 0
    on_gpu = _on_gpu()
    try:
        problems = _problems(a, on_gpu)
        modes = ["fwd", "fwdbwd"] if a.mode == "both" else a.mode.split(",")
        if any(m not in ("fwd", "fwdbwd") for m in modes):
            raise ValueError(f"--mode: fwd, fwdbwd or both, got {a.mode}")
        if not a.sustain >= 0:
            raise ValueError(f"--sustain: seconds >= 0, got {a.sustain}")
        dtype = jnp.dtype(a.dtype)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    available = jax_na.available_backends()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind if on_gpu else device.platform}; "
          f"jax_na backends here: {', '.join(available)}; dtype {dtype.name}")
    if not on_gpu:
        print("note: no GPU here: only the reference backend (pure JAX) runs, and the self attention "
              "yardstick is XLA's (cuDNN needs a GPU); times are CPU times")
    elif _ext.has_cuda_kernels():
        missing = [b for b, has in (("fused", _ext.has_fused_kernels), ("gemm", _ext.has_gemm_kernels))
                   if not has()]
        if missing:
            print(f"note: jax_na was built without its {' and '.join(missing)} kernels (they need the "
                  f"CUTLASS headers at build time); missing backend(s): {', '.join(missing)}")

    if a.sweep_tiles:
        return _main_sweep(a, problems, modes, dtype)

    # Default: every backend, without the pinned fused variants ("fused" already runs the faster
    # forward kernel here); name them in --backends to compare the kernels.
    backends = (a.backends.split(",") if a.backends
                else [b for b in available if b not in ("fused_sm80", "fused_sm90")])
    missing = [b for b in backends if b not in available]
    if missing:
        print(f"note: backend(s) {', '.join(missing)} not available here; running "
              f"{', '.join(b for b in backends if b in available) or 'nothing'}")
        backends = [b for b in backends if b in available]
    for p in problems:
        print(f"{p.id}: {p.describe()} (N={p.N}, W={p.W}, N/W={p.N / p.W:.1f})")
    clocks = _start_clocks(a)
    progress = _progress(len(problems), not a.no_progress)
    try:
        rows = run(problems, backends, dtype, modes, a.reps, a.budget, not a.no_self_attention, progress,
                   a.deterministic_backward, clocks, a.sustain)
    finally:
        if clocks is not None:
            clocks.close()
    if progress is not None:
        progress.close()
    if a.json:
        _write_json(a.json, dict(kind="profile", problems=[p.to_json() for p in problems], rows=rows,
                                 backends=backends, modes=modes, deterministic_backward=a.deterministic_backward,
                                 xla_requests_determinism=_checks.xla_requests_determinism(),
                                 **_meta(dtype, on_gpu)))
        print(f"wrote {a.json}")
    if a.plot and plot(rows, a.plot, f"{dtype.name} on {device.device_kind if on_gpu else 'CPU'}"):
        print(f"wrote {a.plot}")
    # The table is the last thing printed (one line per problem, mode and backend).
    print("\neff TF/s: useful NA FLOPs / median; speedup: dense self attention time / NA time (same "
          "process); ideal: speedup / (N/W); GB/s shown for memory-bound problems; bwd: the backward "
          "alone, fwdbwd - fwd (2.5 forwards' FLOPs)")
    print(format_table(rows))
    return 0


def _start_clocks(a) -> ClockSampler | None:
    """The running sampler that --clocks asks for, or None (not asked, or no nvidia-smi: a note)."""
    if not a.clocks:
        return None
    clocks = ClockSampler()
    if not clocks.ok:
        print(f"note: --clocks: {clocks.why}; the rows carry no clocks", file=sys.stderr)
        return None
    return clocks


def _main_sweep(a, problems, modes, dtype) -> int:
    _register_fused_variants()
    tunable = sorted(TUNABLE_BACKENDS)
    wanted = a.backends.split(",") if a.backends else (["fused"] if "fused" in TUNABLE_BACKENDS else tunable)
    backends = [b for b in wanted if b in TUNABLE_BACKENDS]
    if not backends:
        print("--sweep-tiles: no tunable backend is registered "
              f"({'none at all' if not tunable else 'registered: ' + ', '.join(tunable)}; asked for "
              f"{', '.join(wanted) or 'any'}). The fused kernels' configurations are swept only where "
              "they run (a GPU and a build with the fused kernels); nothing was timed.", file=sys.stderr)
        if a.json:
            _write_json(a.json, dict(kind="sweep", problems=[p.to_json() for p in problems], rows=[],
                                     tunable_backends=tunable, note="no tunable backend registered",
                                     **_meta(dtype, _on_gpu())))
        return 3
    clocks = _start_clocks(a)
    progress = _progress(len(problems), not a.no_progress)
    try:
        rows = sweep_tiles(problems, backends, dtype, modes, a.reps, a.budget, progress, clocks, a.sustain,
                           a.deterministic_backward)
    finally:
        if clocks is not None:
            clocks.close()
    if progress is not None:
        progress.close()
    # Every configuration timed; '*' marks the fastest per problem, mode and backend.
    print(f"\n{'problem':<18} {'mode':<7} {'backend':<10} {'median ms':>10} {'eff TF/s':>9}  config")
    for r in rows:
        cfg = json.dumps(r["config"])
        if "ms" not in r:
            print(f"{r['problem']:<18} {r['mode']:<7} {r['backend']:<10} {'error':>10} {'':>9}  {cfg}: {r['error']}")
            continue
        print(f"{r['problem']:<18} {r['mode']:<7} {r['backend']:<10} {r['ms']:>10.3f} "
              f"{r['eff_tflops']:>9.2f}{' *' if r.get('best') else '  '}{cfg}{_clock_note(r)}")
    if a.json:
        _write_json(a.json, dict(kind="sweep", problems=[p.to_json() for p in problems], rows=rows,
                                 tunable_backends=tunable, **_meta(dtype, _on_gpu())))
        print(f"wrote {a.json}")
    return 0


def _meta(dtype, on_gpu) -> dict:
    d = jax.devices()[0]
    return dict(jax=jax.__version__, jax_na=jax_na.__version__, platform=d.platform,
                device=d.device_kind if on_gpu else str(d), dtype=jnp.dtype(dtype).name,
                available_backends=jax_na.available_backends(),
                self_attention=yardstick(on_gpu, dtype)[0])


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
