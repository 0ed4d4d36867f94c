"""Model-level throughput: images/s of NAT and DiNAT Mini/Tiny/Small/Base (examples/nat.py).

For every model, dtype (bf16, fp32), mode (inference: forward of a jitted apply; training: one
jitted step of forward, backward and an AdamW update with donated state) and backend (every backend
in ``jax_na.available_backends()`` but the pinned fused_sm80/fused_sm90 unless named, plus the same
model with global self attention over each level's tokens as a yardstick: cuDNN's fused attention in
bf16, XLA's in fp32 where cuDNN has no kernel) it times ``--steps`` steps after ``--warmup`` and
reports images/s = batch / median step time.
ImageNet shapes by default: 224x224x3 input, batch 128, 1000 classes.

Relative positional biases are off by default (``--rpb`` turns them on): with them the Flax layer
runs the unfused qk/softmax/av path, which fused kernels cannot take. The blocks of a level run
under ``nn.scan`` (one compiled body per dilation pattern) so that the deep models compile fast;
``--no-scan`` unrolls them. ``--time-limit`` stops starting new entries that many seconds after
the start, compilation by ``--compile-workers`` included (the rest are reported as skipped), so a
default run ends in a few minutes whatever the machine; ``--json`` is rewritten after every entry, so a run killed from
outside keeps what it measured.

Usage: python benchmarks/models.py [--models nat_mini,dinat_tiny] [--dtypes bfloat16] [--modes infer]
           [--backends reference,naive,self] [--batch 128] [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jax_na  # noqa: E402
import nat  # noqa: E402  (examples/nat.py)

ALL_MODELS = [f"{k}_{s}" for s in ("mini", "tiny", "small", "base") for k in ("nat", "dinat")]
SELF = "self"  # the yardstick's name in --backends


def self_attention_impl(dtype, on_gpu: bool) -> tuple[str, str | None]:
    """(label, implementation) of the global self attention yardstick."""
    if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn-self", "cudnn"
    return "xla-self", "xla"


def build(name: str, dtype, backend: str, on_gpu: bool, args, self_impl: str | None = None):
    """(label, model); ``self_impl`` overrides the yardstick's attention implementation."""
    kw = dict(dtype=dtype, rel_pos_bias=args.rpb, scan_blocks=not args.no_scan, num_classes=args.classes)
    if backend == SELF:
        label, impl = self_attention_impl(dtype, on_gpu)
        if self_impl is not None:
            label, impl = f"{self_impl}-self", self_impl
        kw.update(attention=impl, rel_pos_bias=False)
    else:
        label = backend
        kw.update(backend=backend)
    return label, nat.MODELS[name](**kw)


def step_times(fn, state, batch, steps: int, warmup: int, carry: bool):
    """(per-step wall times, seconds of the first call: compilation or a cache load, and one step),
    device-synchronized. ``carry``: fn returns the next state first."""
    first_s = None
    for _ in range(warmup):
        t = time.perf_counter()
        out = fn(state, *batch)
        jax.block_until_ready(out)
        first_s = time.perf_counter() - t if first_s is None else first_s
        if carry:
            state = out[0]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = fn(state, *batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
        if carry:
            state = out[0]
    return np.array(times), first_s


def make_step(model, mode: str):
    """(jitted step, state of float32 params) for one mode. The timing run and the compile-only
    workers (--compile-workers) build the step here, so that both lower the same program and the
    workers' persistent-cache entries are the timing run's."""
    if mode == "infer":
        return jax.jit(lambda p, x: model.apply(p, x, train=False)), (lambda params: params)
    tx = optax.adamw(1e-3, weight_decay=0.05)

    def train_step(state, x, y, key):
        p, opt = state

        def loss_fn(p):
            logits = model.apply(p, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), loss

    # Copies: the donated state must not alias the shared parameters.
    return jax.jit(train_step, donate_argnums=0), lambda params: (jax.tree.map(jnp.copy, params), tx.init(params))


def step_args(mode: str, x, y):
    return (x,) if mode == "infer" else (x, y, jax.random.key(1))


def bench_one(model, params, mode: str, x, y, steps: int, warmup: int):
    f, make_state = make_step(model, mode)
    return step_times(f, make_state(params), step_args(mode, x, y), steps, warmup, carry=mode != "infer")


def main(argv=None) -> int:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma list of {', '.join(nat.MODELS)}")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--modes", default="infer,train")
    ap.add_argument("--backends", default=None,
                    help=f"comma list of jax_na backends and '{SELF}' (global self attention); "
                         "default: every available backend but the pinned fused_sm80/fused_sm90 "
                         "(\"fused\" runs the faster kernels of each call), and self")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per entry")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per entry (the first compiles)")
    ap.add_argument("--rpb", action="store_true", help="relative positional biases (unfused path)")
    ap.add_argument("--no-scan", action="store_true", help="unroll the blocks (slow compilation)")
    ap.add_argument("--time-limit", type=float, default=540.0,
                    help="start no new entry this many seconds after the start, compilation included "
                         "(the rest are reported skipped)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile-workers", type=int, default=0,
                    help="compile every entry first in this many parallel processes (AOT, into a persistent "
                         "compilation cache that the timing run then loads from); 0: compile while timing. "
                         "Each worker autotunes on the GPU: 8 fit an H200 with float32 training entries, 16 "
                         "ran it out of memory")
    ap.add_argument("--cache-dir", default=None,
                    help="persistent compilation cache for --compile-workers (default: a fresh temporary folder)")
    ap.add_argument("--compile-shard", default=None, help=argparse.SUPPRESS)  # "i/n": a worker's share
    a = ap.parse_args(argv)
    if a.compile_workers > 0 or a.compile_shard:
        # The workers and the timing process share the GPU (autotuning runs there): none may take
        # 75% of its memory up front, as jax does by default (set before the backend starts).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    on_gpu = any(d.platform == "gpu" for d in jax.devices())
    available = jax_na.available_backends()
    pinned = ("fused_sm80", "fused_sm90")  # name them in --backends to compare the kernel sets
    backends = a.backends.split(",") if a.backends else [*(b for b in available if b not in pinned), SELF]
    for b in backends:
        if b != SELF and b not in available:
            print(f"note: backend {b} is not available here ({', '.join(available)}); its entries are skipped")
    models = a.models.split(",")
    for m in models:
        if m not in nat.MODELS:
            ap.error(f"unknown model {m}; known: {', '.join(nat.MODELS)}")
    if a.compile_shard:
        return compile_shard(a, models, backends, available, on_gpu)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.device_kind if on_gpu else dev.platform}; backends {backends}; "
          f"batch {a.batch}, {a.image_size}x{a.image_size}, rpb {'on' if a.rpb else 'off'}, "
          f"{a.steps} timed steps")
    if not on_gpu:
        print("note: no GPU here: the numbers are CPU numbers (the reference backend, XLA self attention)")

    x32 = jax.random.normal(jax.random.key(0), (a.batch, a.image_size, a.image_size, 3), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (a.batch,), 0, a.classes)
    todo = list(entries(a, models, backends, available))
    if a.compile_workers > 0:
        # Compilation may take at most 3/4 of the time limit: the timing needs the rest.
        compile_in_workers(a, argv if argv is not None else sys.argv[1:], todo, t_start + 0.75 * a.time_limit)
    rows = []
    header = f"{'model':<12} {'dtype':<9} {'mode':<6} {'backend':<11} {'images/s':>10} {'ms/step':>9} {'p10-p90 ms':>17}"
    print(header, flush=True)
    params_of = {}  # float32 parameters per model, the same for every dtype, mode and backend
    for dtype, mode, name, b, skipped in todo:
        row = dict(model=name, dtype=dtype.name, mode=mode, backend=b, batch=a.batch)
        if skipped:
            row["skipped"] = skipped
        elif time.perf_counter() - t_start > a.time_limit:
            row["skipped"] = f"time limit ({a.time_limit:.0f} s)"
        else:
            run_entry(row, name, dtype, b, mode, on_gpu, a, x32.astype(dtype), x32, y, params_of)
        rows.append(row)
        print(_fmt(row), flush=True)
        if a.json:
            _write_json(a, rows, dev, on_gpu, available)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if a.json:
        print(f"wrote {a.json}")
    return 0


def _write_json(a, rows, dev, on_gpu, available) -> None:
    with open(a.json, "w") as f:
        json.dump(dict(kind="models", jax=jax.__version__, device=str(dev.device_kind if on_gpu else dev),
                       available_backends=available, batch=a.batch, image_size=a.image_size,
                       rpb=a.rpb, scan=not a.no_scan, rows=rows), f, indent=1)


def entries(a, models, backends, available):
    """(dtype, mode, model, backend, reason to skip or None) in run order: bf16 before fp32 and
    inference before training, so that a --time-limit cut drops the least used."""
    from jax_na import _checks

    for dtype_name in a.dtypes.split(","):
        dtype = jnp.dtype(dtype_name)
        for mode in a.modes.split(","):
            for name in models:
                for b in backends:
                    skipped = None
                    if b != SELF and b not in available:
                        skipped = "not available here"
                    elif b != SELF and dtype not in [jnp.dtype(t) for t in _checks.BACKEND_DTYPES[b]]:
                        skipped = f"{b} does not take {dtype.name}"
                    elif b != SELF and _checks.backend_family(b) == "fused" and a.rpb:
                        skipped = "fused has no relative positional bias (--rpb)"
                    yield dtype, mode, name, b, skipped


def use_cache(cache_dir: str) -> None:
    """Every compilation goes to (and comes from) the persistent cache in ``cache_dir``."""
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def compile_in_workers(a, argv, todo, deadline: float) -> None:
    """Compiles the entries of ``todo`` in a.compile_workers processes (each takes every n-th one)
    into a persistent cache, and points this process at it: compilation is CPU-bound and the timed
    runs then start from the cache. Workers still running at ``deadline`` (perf_counter seconds) are
    stopped. XLA's autotuning runs during those compilations, so its GPU
    timings share the GPU with the other workers'."""
    import subprocess
    import tempfile

    cache = a.cache_dir or tempfile.mkdtemp(prefix="jax_na_models_cache_")
    n = min(a.compile_workers, max(1, sum(1 for e in todo if not e[-1])))
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--cache-dir", cache,
                               "--compile-shard", f"{i}/{n}"]) for i in range(n)]
    failed = 0
    for p in procs:  # workers still compiling at the deadline are stopped: their entries compile while timed
        try:
            failed += p.wait(timeout=max(1.0, deadline - time.perf_counter())) != 0
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            failed += 1
    print(f"# compiled in {n} worker processes: {time.perf_counter() - t:.0f} s"
          f"{f' ({failed} failed or stopped: their entries compile while timed)' if failed else ''}", flush=True)
    use_cache(cache)


def compile_shard(a, models, backends, available, on_gpu) -> int:
    """A --compile-workers worker: lowers and compiles its share of the entries on abstract inputs
    (no parameters or batches are allocated) into the persistent cache."""
    i, n = map(int, a.compile_shard.split("/"))
    use_cache(a.cache_dir)
    todo = [e for e in entries(a, models, backends, available) if not e[-1]][i::n]
    image = (a.image_size, a.image_size, 3)
    y = jax.ShapeDtypeStruct((a.batch,), jnp.int32)
    params_of = {}
    for dtype, mode, name, b, _ in todo:
        impls = [None, "xla"] if b == SELF and self_attention_impl(dtype, on_gpu)[1] == "cudnn" else [None]
        for impl in impls:
            _, model = build(name, dtype, b, on_gpu, a, impl)
            f, make_state = make_step(model, mode)
            try:
                if name not in params_of:
                    _, init_model = build(name, jnp.float32, "reference", on_gpu, a)
                    params_of[name] = jax.eval_shape(init_model.init, jax.random.key(0),
                                                     jax.ShapeDtypeStruct((1, *image), jnp.float32))
                state = jax.eval_shape(make_state, params_of[name])
                f.lower(state, *step_args(mode, jax.ShapeDtypeStruct((a.batch, *image), dtype), y)).compile()
                break
            except Exception as e:  # noqa: BLE001 - the timing run reports it
                print(f"# worker {i}: {name} {dtype.name} {mode} {b} {impl or ''}: {type(e).__name__}", flush=True)
    return 0


def run_entry(row, name, dtype, b, mode, on_gpu, a, x, x32, y, params_of):
    """Times one (model, dtype, mode, backend) entry into ``row`` (or records its error). The
    yardstick falls back to XLA's self attention where cuDNN's cannot take the model (its backward
    refuses some sequence lengths, e.g. the 49 tokens of a 7x7 level)."""
    impls = [None, "xla"] if b == SELF and self_attention_impl(dtype, on_gpu)[1] == "cudnn" else [None]
    for impl in impls:
        label, model = build(name, dtype, b, on_gpu, a, impl)
        row["backend"] = label
        try:
            if name not in params_of:
                t = time.perf_counter()
                _, init_model = build(name, jnp.float32, "reference", on_gpu, a)
                params_of[name] = jax.jit(init_model.init)(jax.random.key(0), x32[:1])
                n_params = sum(v.size for v in jax.tree.leaves(params_of[name]))
                print(f"# {name}: {n_params / 1e6:.1f} M parameters "
                      f"(init {time.perf_counter() - t:.1f} s)", flush=True)
            t = time.perf_counter()
            times, first_s = bench_one(model, params_of[name], mode, x, y, a.steps, a.warmup)
            med = float(np.median(times))
            row.update(images_per_s=a.batch / med, ms=1e3 * med,
                       p10_ms=1e3 * float(np.percentile(times, 10)),
                       p90_ms=1e3 * float(np.percentile(times, 90)), steps=len(times), first_call_s=first_s,
                       wall_s=time.perf_counter() - t)
            row.pop("error", None)
            return
        except Exception as e:  # noqa: BLE001 - report (OOM, unsupported) and go on
            msg = f"{type(e).__name__}: {e}".strip().splitlines()
            row["error"] = (msg[0] if msg else type(e).__name__)[:300]
            if impl is None and len(impls) > 1:
                row["fallback_reason"] = row["error"]


def _fmt(r):
    head = f"{r['model']:<12} {r['dtype']:<9} {r['mode']:<6} {r['backend']:<11}"
    if "images_per_s" not in r:
        return f"{head} {r.get('skipped') or 'error: ' + r.get('error', '?')}"
    spread = f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}"
    return f"{head} {r['images_per_s']:>10.1f} {r['ms']:>9.2f} {spread:>17}"


if __name__ == "__main__":
    sys.exit(main())
