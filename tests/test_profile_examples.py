"""CPU tests of the profiler CLI (jax_na.profile), the examples' models and benchmarks/models.py."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

pytest.importorskip("flax")
optax = pytest.importorskip("optax")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

from jax_na import profile  # noqa: E402

TINY = ["--spatial", "8x8", "--batch", "1", "--heads", "2", "--head-dim", "8", "--kernel", "3",
        "--dilation", "2", "--dtype", "float32", "--reps", "3", "--budget", "0.2", "--no-progress"]


def test_cli_custom_problem_json(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert profile.main([*TINY, "--mode", "both", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    for k in ("jax", "device", "platform", "dtype", "available_backends", "rows", "problems", "backends"):
        assert k in d
    (p,) = d["problems"]
    assert p["spatial"] == [8, 8] and p["kernel"] == [3, 3] and p["dilation"] == [2, 2] and p["W"] == 9
    na = [r for r in d["rows"] if r["backend"] == "reference" and not r.get("derived")]
    assert {r["mode"] for r in na} == {"fwd", "fwdbwd"}
    for r in na:
        for k in ("ms", "p10_ms", "p90_ms", "reps", "eff_tflops", "bandwidth_gbs", "memory_bound"):
            assert k in r, k
        assert r["ms"] > 0 and r["p10_ms"] <= r["ms"] <= r["p90_ms"] and r["reps"] >= 3
        assert r["speedup_vs_self"] > 0 and r["fraction_of_ideal"] > 0  # vs XLA self attention on CPU
    # the backward alone, derived from the two modes
    (bwd,) = [r for r in d["rows"] if r["backend"] == "reference" and r.get("derived")]
    assert bwd["mode"] == "bwd"
    ms = {r["mode"]: r["ms"] for r in na}
    if "ms" in bwd:
        assert bwd["ms"] == pytest.approx(ms["fwdbwd"] - ms["fwd"])
        assert bwd["eff_tflops"] == pytest.approx(2.5 * 4 * 9 * 64 * 2 * 8 / (bwd["ms"] * 1e-3) / 1e12)
    else:
        assert ms["fwdbwd"] <= ms["fwd"] and "timing noise" in bwd["skipped"]
    assert any(r["backend"] in ("xla-self", "cudnn-self") and "ms" in r for r in d["rows"])
    text = capsys.readouterr().out
    assert "median ms" in text and "reference" in text


def test_cli_subprocess_and_plot(tmp_path):
    out = tmp_path / "o.json"
    png = tmp_path / "o.png"
    r = subprocess.run([sys.executable, "-m", "jax_na.profile", *TINY, "--mode", "fwd", "--no-self-attention",
                        "--json", str(out), "--plot", str(png)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no GPU" in r.stdout or "gpu" in json.loads(out.read_text())["platform"]
    assert [row["backend"] for row in json.loads(out.read_text())["rows"]] == ["reference"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
    else:
        assert png.stat().st_size > 1000


def test_fused_backend_rows(tmp_path, capsys, monkeypatch):
    """A fused backend that cannot take a problem (here the Hopper set in float32) is a skipped row in
    the table and the JSON; the table is the last thing printed."""
    import jax_na
    monkeypatch.setattr(jax_na, "available_backends", lambda: ["fused", "fused_sm90", "reference"])
    out = tmp_path / "f.json"
    assert profile.main([*TINY, "--mode", "fwd", "--no-self-attention", "--backends", "fused_sm90,reference",
                         "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["backends"] == ["fused_sm90", "reference"]
    rows = {r["backend"]: r for r in d["rows"]}
    assert rows["fused_sm90"]["skipped"].startswith("skipped: fused_sm90 takes float16/bfloat16")
    assert "ms" in rows["reference"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("custom") and "fused_sm90" in lines[-2] and "skipped" in lines[-2]
    assert lines[-1].startswith("custom") and "reference" in lines[-1]
    p = profile.BY_ID["p11-1d-d64"]
    assert profile.fits(p, "fused", "fwdbwd", jnp.bfloat16) is None
    assert profile.fits(p, "fused", "fwdbwd", jnp.float32) is None   # the portable kernels take float32
    assert profile.fits(profile.make_problem("x", 1, (64,), 2, 256, 3), "fused", "fwd", jnp.bfloat16) is None
    assert "head dims" in profile.fits(profile.make_problem("x", 1, (64,), 2, 256, 3), "fused", "fwd", jnp.float32)
    assert "head dims" in profile.fits(profile.make_problem("x", 1, (64,), 2, 320, 3), "fused", "fwd", jnp.bfloat16)


def test_yardstick_by_platform_and_dtype():
    """Dense self attention: cuDNN on a GPU in 16-bit, XLA elsewhere (cuDNN takes no float32)."""
    assert profile.yardstick(True, jnp.bfloat16) == ("cudnn-self", "cudnn")
    assert profile.yardstick(True, jnp.float16) == ("cudnn-self", "cudnn")
    assert profile.yardstick(True, jnp.float32) == ("xla-self", "xla")
    assert profile.yardstick(False, jnp.bfloat16) == ("xla-self", "xla")


def test_gemm_fits_by_its_scores():
    """gemm takes every dtype and head dim; it is skipped where its [B, N, H, W] scores (input dtype,
    float32 softmax, weights) would not fit, like naive's workspace."""
    assert profile.fits(profile.BY_ID["p4-nat-small"], "gemm", "fwdbwd", jnp.bfloat16) is None
    assert profile.fits(profile.make_problem("x", 1, (64,), 2, 256, 3), "gemm", "fwd", jnp.float32) is None
    assert "skipped: scores" in profile.fits(profile.BY_ID["p6-flux"], "gemm", "fwd", jnp.bfloat16)


def test_problem_table_and_metric():
    assert len(profile.PROBLEMS) == 11 and profile.BY_ID["p5-dinat-dilated"].dilation == (4, 4)
    p = profile.BY_ID["p3-3d"]
    assert p.N == 16 * 32 * 32 and p.W == 7 * 13 * 13
    assert p.flops("fwd") == 4 * 16 * p.N * p.W * 128
    assert p.flops("fwdbwd") == 3.5 * p.flops("fwd")
    assert p.flops("bwd") == 2.5 * p.flops("fwd")


def test_backward_rows():
    """The backward alone: forward+backward minus forward per backend, its rate at 2.5 forwards'
    FLOPs, and its speedup over self attention's own difference; a difference that is not positive
    is a skipped row; backends timed in one mode only get none."""
    p = profile.BY_ID["p3-3d"]
    row = lambda mode, backend, ms, **kw: dict(problem=p.id, mode=mode, backend=backend, ms=ms, **kw)
    rows = [row("fwd", "cudnn-self", 10.0, dense_tflops=1.0), row("fwd", "fused", 1.0), row("fwd", "gemm", 2.0),
            row("fwd", "naive", 5.0), row("fwdbwd", "cudnn-self", 35.0, dense_tflops=1.0),
            row("fwdbwd", "fused", 4.0), row("fwdbwd", "gemm", 1.5)]
    cudnn, fused, gemm = profile.backward_rows(p, rows)
    assert [r["backend"] for r in (cudnn, fused, gemm)] == ["cudnn-self", "fused", "gemm"]
    assert all(r["mode"] == "bwd" and r["derived"] for r in (cudnn, fused, gemm))
    assert cudnn["ms"] == 25.0 and cudnn["dense_tflops"] == pytest.approx(p.dense_flops("bwd") / 25e-3 / 1e12)
    assert fused["ms"] == 3.0 and fused["eff_tflops"] == pytest.approx(p.flops("bwd") / 3e-3 / 1e12)
    assert fused["speedup_vs_self"] == pytest.approx(25 / 3)
    assert fused["fraction_of_ideal"] == pytest.approx(25 / 3 / (p.N / p.W))
    assert "ms" not in gemm and "timing noise" in gemm["skipped"]
    assert "fwdbwd - fwd" in profile.format_row(fused) and "skipped" in profile.format_row(gemm)
    assert profile.BY_ID["p11-1d-d64"].causal == (True,)


def test_sweep_tiles_reports_no_tunable_backend(tmp_path, capsys):
    from jax_na import _ext
    if "fused" in _ext.available_backends():
        pytest.skip("a GPU with the fused kernels: fused is tunable here")
    assert profile.TUNABLE_BACKENDS == {}
    out = tmp_path / "s.json"
    assert profile.main([*TINY, "--sweep-tiles", "--json", str(out)]) == 3
    assert "no tunable backend" in capsys.readouterr().err
    d = json.loads(out.read_text())
    assert d["rows"] == [] and d["tunable_backends"] == []


def test_sweep_tiles_times_the_fused_configurations(tmp_path, monkeypatch, capsys):
    """Where the fused kernels run (pretended here: both kernel sets), --sweep-tiles times every kernel
    set at every compiled tile configuration (the forward's in mode fwd, the backward's in mode
    fwdbwd) and marks the fastest; the callables are stand-ins on CPU (the real ones need a GPU)."""
    import jax
    from jax_na import _ext
    monkeypatch.setattr(profile, "TUNABLE_BACKENDS", {})
    monkeypatch.setattr(_ext, "has_hopper_kernels", lambda: True)
    monkeypatch.setattr(_ext, "available_backends", lambda: ["fused", "fused_sm90", "fused_sm80", "reference"])
    made = []

    def fake_callable(p, backend, mode, q_tile_shape=None, kv_tile_shape=None, backward_q_tile_shape=None,
                      backward_kv_tile_shape=None, deterministic_backward=None):
        if mode == "fwd":
            assert backward_q_tile_shape is None and backward_kv_tile_shape is None
            assert deterministic_backward is None
            made.append((backend, q_tile_shape, kv_tile_shape))
        else:
            assert q_tile_shape is None and kv_tile_shape is None
            assert isinstance(deterministic_backward, bool)  # the mode the configurations are of
            made.append((backend, backward_q_tile_shape, backward_kv_tile_shape))
        slow = backend == "fused_sm80"
        return jax.jit(lambda q, k, v, do: (q * 2.0 if slow else q) + k - v)

    monkeypatch.setattr(profile, "na_callable", fake_callable)
    out = tmp_path / "s.json"
    assert profile.main([*TINY, "--dtype", "bfloat16", "--mode", "fwd", "--sweep-tiles", "--reps", "3",
                         "--json", str(out)]) == 0
    rank = len(TINY[TINY.index("--spatial") + 1].split("x"))
    head_dim = int(TINY[TINY.index("--head-dim") + 1])
    import jax_na
    want = [(b, q, kv) for b, configs in jax_na.fused_tile_configs(rank, "bfloat16", head_dim).items()
            for q, kv in configs]
    assert sorted(made) == sorted(want) and len(want) >= 2
    d = json.loads(out.read_text())
    assert d["tunable_backends"] == ["fused", "fused_sm80", "fused_sm90"]  # the sweep: "fused" by default
    rows = [r for r in d["rows"] if "ms" in r]
    assert len(rows) == len(want) and {r["config"]["kernels"] for r in rows} == {"portable (sm80)", "hopper (sm90)"}
    assert all(set(r["config"]) == {"kernels", "q_tile_shape", "kv_tile_shape"} for r in rows)
    assert sum(r["best"] for r in rows) == 1 and all(r["ms"] > 0 for r in rows)
    assert " *{" in capsys.readouterr().out

    # mode fwdbwd: the backward's configurations (the forward at its default)
    made.clear()
    assert profile.main([*TINY, "--dtype", "bfloat16", "--mode", "fwdbwd", "--sweep-tiles", "--reps", "3",
                         "--json", str(out)]) == 0
    want = [(b, q, kv) for b, configs in jax_na.fused_tile_configs(rank, "bfloat16", head_dim, backward=True).items()
            for q, kv in configs]
    assert sorted(made) == sorted(want) and len(want) >= 2
    rows = [r for r in json.loads(out.read_text())["rows"] if "ms" in r]
    assert len(rows) == len(want) and all(r["mode"] == "fwdbwd" for r in rows)
    assert all(set(r["config"]) == {"kernels", "backward_q_tile_shape", "backward_kv_tile_shape",
                                    "deterministic_backward"} for r in rows)
    assert sum(r["best"] for r in rows) == 1
    # the other backward mode: its configurations (the Hopper set's 128-key ones at head dim 128)
    for flag, det in (("--deterministic-backward", True), ("--nondeterministic-backward", False)):
        made.clear()
        assert profile.main([*TINY, "--dtype", "bfloat16", "--head-dim", "128", "--mode", "fwdbwd", "--sweep-tiles",
                             "--reps", "2", "--json", str(out), flag]) == 0
        want = [(b, q, kv) for b, configs in jax_na.fused_tile_configs(
            rank, "bfloat16", 128, backward=True, deterministic_backward=det).items() for q, kv in configs]
        assert sorted(made) == sorted(want)
        rows = [r for r in json.loads(out.read_text())["rows"] if "ms" in r]
        assert rows and all(r["config"]["deterministic_backward"] is det for r in rows)

    # a pinned backend: that kernel set's configurations only
    made.clear()
    assert profile.main([*TINY, "--dtype", "bfloat16", "--mode", "fwd", "--sweep-tiles", "--reps", "3",
                         "--backends", "fused_sm80", "--json", str(out)]) == 0
    want = [("fused_sm80", q, kv) for q, kv in jax_na.fused_tile_configs(rank, "bfloat16", head_dim)["fused_sm80"]]
    assert sorted(made) == sorted(want) and want
    rows = [r for r in json.loads(out.read_text())["rows"] if "ms" in r]
    assert {r["backend"] for r in rows} == {"fused_sm80"} and len(rows) == len(want)


def test_bad_problem_is_an_error(capsys):
    assert profile.main(["--problem", "nope"]) == 2
    assert "unknown problem 'nope'" in capsys.readouterr().err
    assert profile.main(["--problem", "p12"]) == 2
    assert profile.main(["--spatial", "8x8", "--kernel", "3x3x3"]) == 2


def test_problems_by_number():
    """--problem takes a problem's full id or its number: p1 is p1-1d-long, not p10 or p11."""
    assert profile.problem_by_id("p1") is profile.BY_ID["p1-1d-long"]
    assert profile.problem_by_id("p10") is profile.BY_ID["p10-video-causal"]
    assert profile.problem_by_id("p3-3d").spatial == (16, 32, 32)
    for bad in ("p", "p0", "3", "p1-1d"):
        with pytest.raises(ValueError, match="unknown problem"):
            profile.problem_by_id(bad)


def test_nat_dinat_tiny_forward_and_train_step():
    import nat
    import train

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 1)), jnp.float32)
    y = jnp.array([1, 3])
    for kind, dil in (("nat_tiny32", None), ("dinat_tiny32", ((2,), (1,)))):
        model = nat.MODELS[kind](depths=(1, 1), embed_dim=16, dilations=dil)
        params = jax.jit(model.init)(jax.random.key(0), x)
        assert model.apply(params, x).shape == (2, 10)
        tx = optax.adam(1e-3)
        p2, _, loss, _ = train.make_train_step(model, tx)(params, tx.init(params), x, y, jax.random.key(1))
        assert np.isfinite(float(loss))


def test_dinat_paper_model_builds_with_dilations():
    import nat

    model = nat.dinat_mini(num_classes=10)
    assert [model.level_dilations(i) for i in range(4)] == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5]
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape)))
    n = sum(v.size for v in jax.tree.leaves(params))
    assert 19e6 < n < 21e6  # DiNAT-Mini: 20 M parameters
    out = jax.eval_shape(lambda p: model.apply(p, jnp.zeros(x.shape)), params)
    assert out.shape == (1, 10)
    # nn.scan over the repeating dilation pattern: same parameter count
    scanned = jax.eval_shape(lambda: nat.dinat_mini(num_classes=10, scan_blocks=True).init(
        jax.random.key(0), jnp.zeros(x.shape)))
    assert sum(v.size for v in jax.tree.leaves(scanned)) == n


def test_lm_1d_forward_and_train_step():
    import lm_1d

    model = lm_1d.NALanguageModel(vocab=11, dim=16, depth=1, num_heads=2, window=5, max_len=32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 17)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])
    assert model.apply(params, tokens[:, :-1]).shape == (2, 16, 11)
    tx = optax.adam(1e-3)
    _, _, loss = lm_1d.make_train_step(model, tx)(params, tx.init(params), tokens)
    assert np.isfinite(float(loss))
    assert lm_1d.check_against_dense(length=16) < 1e-4


def test_video_3d_forward_train_step_and_causality():
    import video_3d

    x, y = video_3d.moving_squares(np.random.default_rng(0), 2, 4, 8)
    model = video_3d.VideoClassifier(dim=8, depth=1, num_heads=2, kernel_size=(2, 3, 3))
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(x))
    assert model.apply(params, jnp.asarray(x)).shape == (2, 4)
    assert video_3d.causality_gap(model, params, jnp.asarray(x, jnp.float32), 2) < 1e-5
    tx = optax.adam(1e-3)
    _, _, loss, _ = video_3d.make_train_step(model, tx)(params, tx.init(params), x, y)
    assert np.isfinite(float(loss))


def test_models_benchmark_cli_smoke(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_models", os.path.join(ROOT, "benchmarks", "models.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "m.json"
    # 'nat_tiny32' keeps it small; the ImageNet models need 224x224 (kernel 7 at the 7x7 level).
    assert mod.main(["--models", "nat_tiny32", "--batch", "2", "--image-size", "32", "--classes", "10",
                     "--dtypes", "float32", "--modes", "infer", "--backends", "reference,self", "--steps", "1",
                     "--warmup", "1",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["backend"] for r in rows} == {"reference", "xla-self"}
    assert all(r.get("images_per_s", 0) > 0 for r in rows), rows


def test_models_benchmark_compile_workers(tmp_path):
    """--compile-workers compiles the entries in worker processes into a persistent cache first; the
    timing run then loads them from it and times the same steps (its own process: the cache settings
    are global to a process)."""
    out, cache = tmp_path / "m.json", tmp_path / "cache"
    cache.mkdir()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "models.py"), "--models", "nat_tiny32",
                          "--batch", "2", "--image-size", "32", "--classes", "10", "--dtypes", "float32",
                          "--modes", "infer,train", "--backends", "reference", "--steps", "1", "--warmup", "1",
                          "--compile-workers", "2", "--cache-dir", str(cache), "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "compiled in 2 worker processes" in res.stdout and "failed" not in res.stdout, res.stdout
    assert any(cache.iterdir()), "the workers wrote no cache entries"
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["infer", "train"]
    assert all(r.get("images_per_s", 0) > 0 and r["first_call_s"] > 0 for r in rows), rows


def test_timeit_batches_fast_calls():
    """Calls under profile.BATCH_BELOW_S are timed in batches synchronized once: more calls than samples."""
    calls = []

    def fn(x):
        calls.append(1)
        return x + 1

    med, lo, hi, n = profile.timeit(fn, [jnp.ones(4)], reps=3, budget_s=1.0)
    assert n == 3
    assert len(calls) > 2 + n  # the warm-up and timing calls, then batches of more than one call
    assert 0 < lo <= med <= hi < profile.BATCH_BELOW_S


FAKE_SMI = """#!{python}
# A stand-in for nvidia-smi: one CSV line per query ("1500, 690.5, Active" for GPU 0; the clock is
# 1500 + the --id), every -lms milliseconds when looping. Exits 9 on a field it does not know, as
# the real one does.
import sys, time
args = sys.argv[1:]
query = next(a.split("=", 1)[1] for a in args if a.startswith("--query-gpu="))
gpu = int(next((a.split("=", 1)[1] for a in args if a.startswith("--id=")), "0"))
if "{reasons}" not in query:
    print("Field is not a valid field to query."); sys.exit(9)
loop = float(args[args.index("-lms") + 1]) / 1e3 if "-lms" in args else None
while True:
    print(f"{{1500 + gpu}}, 690.5, Active", flush=True)
    if loop is None:
        break
    time.sleep(loop)
"""


def _fake_smi(tmp_path, reasons="clocks_throttle_reasons"):
    """A directory holding a fake nvidia-smi that takes the power-cap field under ``reasons``."""
    d = tmp_path / "bin"
    d.mkdir()
    exe = d / "nvidia-smi"
    exe.write_text(FAKE_SMI.format(python=sys.executable, reasons=reasons))
    exe.chmod(0o755)
    return d


@pytest.mark.parametrize("reasons", ["clocks_event_reasons", "clocks_throttle_reasons"])
def test_clock_sampler_windows(tmp_path, monkeypatch, reasons):
    """ClockSampler reads nvidia-smi's loop (either name of the power-cap field) and averages a window."""
    monkeypatch.setenv("PATH", f"{_fake_smi(tmp_path, reasons)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with profile.ClockSampler(interval_ms=20) as clocks:
        assert clocks.ok, clocks.why
        t0 = time.time()
        time.sleep(0.5)
        got = clocks.window(t0, time.time())
        assert clocks.window(t0 - 100, t0 - 50) is None
    assert got["sm_mhz"] == 1500 and got["sm_mhz_min"] == 1500 and got["power_w"] == pytest.approx(690.5)
    assert got["power_capped"] == 1.0 and got["clock_samples"] >= 3


def test_clock_sampler_follows_cuda_visible_devices(tmp_path, monkeypatch):
    """jax's first GPU is the first of CUDA_VISIBLE_DEVICES: that is the one nvidia-smi samples."""
    monkeypatch.setenv("PATH", f"{_fake_smi(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    with profile.ClockSampler(interval_ms=20) as clocks:
        t0 = time.time()
        time.sleep(0.2)
        assert clocks.window(t0, time.time())["sm_mhz"] == 1503
    with profile.ClockSampler(interval_ms=20, index=1) as clocks:
        t0 = time.time()
        time.sleep(0.2)
        assert clocks.window(t0, time.time())["sm_mhz"] == 1501


def test_clock_sampler_without_nvidia_smi():
    clocks = profile.ClockSampler(command="jax-na-no-such-nvidia-smi")
    assert not clocks.ok and "not found" in clocks.why
    clocks.close()


def test_cli_clocks(tmp_path, capsys, monkeypatch):
    """--clocks puts the sampled clock and power on every timed row (JSON and table); without
    nvidia-smi it says so and times as before."""
    monkeypatch.setenv("PATH", f"{_fake_smi(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "c.json"
    assert profile.main([*TINY, "--mode", "fwd", "--budget", "0.5", "--clocks", "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if "ms" in r]
    assert {r["backend"] for r in rows} >= {"reference"} and len(rows) >= 2  # and the self attention
    for r in rows:
        assert r["sm_mhz"] == 1500 and r["power_w"] == pytest.approx(690.5) and r["power_capped"] == 1.0, r
    assert "[SM 1500 MHz, 690 W, power-capped 100%]" in capsys.readouterr().out
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert profile.main([*TINY, "--mode", "fwd", "--no-self-attention", "--clocks", "--json", str(out)]) == 0
    assert "nvidia-smi not found" in capsys.readouterr().err
    assert all("sm_mhz" not in r for r in json.loads(out.read_text())["rows"])


def test_timeit_sustain_runs_untimed_calls_first():
    """sustain_s: untimed back-to-back calls for that long before the timed ones (the GPU's steady
    state under load); the timed samples and their window come after."""
    calls = []

    def fn(x):
        calls.append(time.perf_counter())
        return x + 1

    window = []
    t0 = time.perf_counter()
    med, lo, hi, n = profile.timeit(fn, [jnp.ones(4)], reps=3, budget_s=0.5, window=window, sustain_s=0.3)
    assert n == 3 and 0 < lo <= med <= hi
    assert time.perf_counter() - t0 >= 0.3
    before = [c for c in calls if c < t0 + 0.3]
    assert len(before) > 10, len(before)  # calls kept coming through the sustain period
    (start, end), = window
    assert end - start < 0.3  # the window holds the timed calls only


def test_cli_rejects_negative_sustain(capsys):
    assert profile.main([*TINY, "--sustain", "-1"]) == 2
    assert "--sustain: seconds >= 0, got -1.0" in capsys.readouterr().err


def test_sweep_tiles_takes_clocks_and_sustain(tmp_path, monkeypatch, capsys):
    """--sweep-tiles with --clocks and --sustain: each configuration's row carries the clock of its
    timed calls, after its untimed sustain period (stand-in kernels and nvidia-smi, as above)."""
    import jax
    from jax_na import _ext
    monkeypatch.setenv("PATH", f"{_fake_smi(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(profile, "TUNABLE_BACKENDS", {})
    monkeypatch.setattr(_ext, "has_hopper_kernels", lambda: True)
    monkeypatch.setattr(_ext, "available_backends", lambda: ["fused", "fused_sm90", "fused_sm80", "reference"])
    monkeypatch.setattr(profile, "na_callable", lambda p, backend, mode, **tiles: jax.jit(lambda q, k, v, do: q + k - v))
    sustained = []
    timeit = profile.timeit

    def spy(fn, args, reps=20, budget_s=4.0, window=None, sustain_s=0.0):
        sustained.append(sustain_s)
        return timeit(fn, args, reps, budget_s, window, sustain_s)

    monkeypatch.setattr(profile, "timeit", spy)
    out = tmp_path / "s.json"
    assert profile.main([*TINY, "--dtype", "bfloat16", "--mode", "fwd", "--sweep-tiles", "--reps", "3",
                         "--budget", "0.3", "--clocks", "--sustain", "0.05", "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if "ms" in r]
    assert len(rows) >= 2 and sustained == [0.05] * len(rows)
    for r in rows:
        assert r["sm_mhz"] == 1500 and r["power_capped"] == 1.0 and r["clock_samples"] >= 1, r
    assert "[SM 1500 MHz, 690 W, power-capped 100%]" in capsys.readouterr().out


def test_backward_mode_flags(tmp_path, monkeypatch):
    """--deterministic-backward / --nondeterministic-backward reach the calls and the JSON (the two
    exclude each other); without either, the JSON says None (na*d's default) and whether XLA_FLAGS
    asks for determinism."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.raises(SystemExit):
        profile.main([*TINY, "--deterministic-backward", "--nondeterministic-backward"])
    for flag, want in (([], None), (["--deterministic-backward"], True), (["--nondeterministic-backward"], False)):
        out = tmp_path / f"p{len(flag)}{want}.json"
        assert profile.main([*TINY, "--mode", "fwdbwd", "--reps", "2", "--no-progress", "--json", str(out), *flag]) == 0
        d = json.loads(out.read_text())
        assert d["deterministic_backward"] is want and d["xla_requests_determinism"] is False
        assert any("ms" in r for r in d["rows"])
