"""GPU: the fused backend (jax_na_fused_fwd / jax_na_fused_bwd) against the float64 reference.

The shared sweep (test_gpu_naive.py) runs the fused kernels on the edge cases at small head dims
(padded to 32 on the portable kernels). Here: the edge cases again at the native head dims 64 and
128, problems with many KV tiles per query tile (2-D and 3-D, GQA, dilation, causal, additional
keys/values), head dim 32 on the portable kernels, head dim 256 (and head dims padded to it),
padded head dims (D != D_v), float32 (portable set), scales <= 0, the Hopper backward's two modes
(bitwise determinism with deterministic_backward=True; with False, the default without XLA's
determinism flag, one warp-specialized kernel for dK, dV and dQ, on the edge cases too), the persistent Hopper forward with 3 CTAs (many query tiles per CTA), a jitted
gradient through the Flax layers, and a forward whose tensors have more than 2**31 elements (64-bit offsets; marked ``large``: deselect with ``-m "gpu and not large"``).
Tolerances: gpu_common.TOL (SEMANTICS.md) for out and gradients, 1e-5 for the float32 LSE.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import jax_na
from gpu_common import TOL, check_case, na_fns, poison_device_memory, random_inputs, rel, to64
from helpers import Case
from jax_na import _ext

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("JAX_NA_TEST_GPU_ON_CPU") == "1"
# On CPU (JAX_NA_TEST_GPU_ON_CPU=1) the reference stands in, to check the test logic itself.
BACKEND = "reference" if ON_CPU else "fused"
HALF = [jnp.float16, jnp.bfloat16]


@pytest.fixture(autouse=True)
def _need_fused(request):
    if request.function.__name__ == "test_fused_targets_registered":
        return  # that one fails instead, so that a build without the fused kernels shows up
    if not ON_CPU and "fused" not in jax_na.available_backends():
        pytest.skip("jax_na was built without its fused kernels (no CUTLASS headers at build time)")


def test_fused_targets_registered():
    """Both fused targets are compiled and registered, and "fused" is the first available backend."""
    if ON_CPU:
        pytest.skip("no kernels on CPU")
    names = set(_ext.register_targets())
    assert {"jax_na_fused_fwd", "jax_na_fused_bwd"} <= names, sorted(names)
    assert jax_na.available_backends()[0] == "fused"


# ----------------------------------------------------------------------------- native head dims

def _native(i, case):
    """Edge case i at head dim 64 or 128 (alternating), in float16 or bfloat16 (alternating by pairs)."""
    D = (64, 128)[i % 2]
    return dataclasses.replace(case, D=D, Dv=D), HALF[(i // 2) % 2]


NATIVE = [_native(i, c) for i, c in enumerate(helpers.edge_cases())]


# Where the Hopper kernels exist (compute capability 9.0), both kernel sets (forward and backward) run
# every case by name ("fused" picks per call; the sweep in test_gpu_naive.py covers that choice).
KERNEL_SETS = (["fused_sm90", "fused_sm80"] if not ON_CPU and _ext.has_hopper_kernels() else [BACKEND])


@pytest.mark.parametrize("case,dtype", NATIVE, ids=[f"{c.id}-{jnp.dtype(d).name}" for c, d in NATIVE])
@pytest.mark.parametrize("backend", KERNEL_SETS)
def test_edge_cases_native_head_dims(backend, case, dtype):
    check_case(case, backend, dtype, seed=helpers.seed_of(case))


@pytest.mark.parametrize("case,dtype", NATIVE, ids=[f"{c.id}-{jnp.dtype(d).name}" for c, d in NATIVE])
def test_edge_cases_atomic_dq(case, dtype):
    """The same with deterministic_backward=False: the Hopper backward's warp-specialized kernel adds
    dQ (the portable kernels, and the reference on CPU, stay deterministic)."""
    check_case(case, KERNEL_SETS[0], dtype, seed=helpers.seed_of(case), deterministic_backward=False)


# ----------------------------------------------------------------------------- many KV tiles

MANY_TILES = [
    Case((40, 48), (13, 7), B=2, H=4, Hkv=2, D=128, Dv=128, Na=5),
    Case((40, 48), (13, 7), stride=(1, 3), dilation=(2, 1), is_causal=(True, False), H=4, Hkv=2, D=64, Dv=64,
         Na=5),
    Case((6, 20, 24), (3, 9, 7), dilation=(1, 2, 1), H=4, Hkv=2, D=128, Dv=128, Na=5),
    Case((6, 20, 24), (3, 9, 7), stride=(1, 2, 7), dilation=(1, 2, 1), is_causal=(True, False, False), H=4,
         Hkv=2, D=64, Dv=64, Na=5),
    Case((6, 20, 24), (2, 9, 7), dilation=(2, 2, 3), is_causal=(False, True, True), H=2, Hkv=1, D=128, Dv=128),
    Case((4099,), 129, dilation=3, is_causal=True, H=2, Hkv=1, D=128, Dv=128, Na=5),
    Case((1000,), 1000, H=2, Hkv=2, D=64, Dv=64),                                  # k = L: self attention
]


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", MANY_TILES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", KERNEL_SETS)
def test_many_kv_tiles(backend, case, dtype):
    check_case(case, backend, dtype, seed=11)


# ----------------------------------------------------------------------------- persistent CTAs

def test_persistent_forward_with_few_ctas():
    """The Hopper forward's persistent CTAs with only 3 of them (JAX_NA_PERSISTENT_CTAS, read once per
    process: a child process), so that each walks dozens of query tiles of one call, live ones and
    dead ones (dilation groups shorter than the tiled length), through its K/V ring: the native edge
    cases and the many-tile problems, forward and backward against the float64 reference. The
    warp-specialized backward then orders its key tiles for 3 resident CTAs (tile_grid.h), so these
    small problems take axis orders other than raster."""
    if ON_CPU or not _ext.has_hopper_kernels():
        pytest.skip("needs the Hopper kernels on a compute capability 9.0 device")
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]\n"
            "import conftest, test_gpu_fused as t\n"
            "cases = t.NATIVE + [(c, d) for c in t.MANY_TILES for d in t.HALF]\n"
            "for case, dtype in cases:\n"
            "    t.check_case(case, 'fused_sm90', dtype, seed=t.helpers.seed_of(case))\n"
            "print('checked', len(cases))\n")
    env = dict(os.environ, JAX_NA_PERSISTENT_CTAS="3")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    n = len(NATIVE) + len(MANY_TILES) * len(HALF)
    assert f"checked {n}" in res.stdout, res.stdout[-2000:]


# ----------------------------------------------------------------------------- float32

# float32 runs on the portable kernel set only (3xTF32 on the tensor cores: float32 accuracy).
F32_BACKEND = BACKEND if ON_CPU else "fused_sm80"
F32_CASES = [dataclasses.replace(c, D=(64, 128)[i % 2], Dv=(64, 128)[i % 2]) for i, c in enumerate(helpers.edge_cases())]


@pytest.mark.parametrize("case", F32_CASES + MANY_TILES, ids=lambda c: c.id)
def test_float32(case):
    """The float32 fused kernels at the native head dims (edge cases, many KV tiles), at float32's
    tolerance; "fused" (auto) takes float32 to the same kernels."""
    check_case(case, F32_BACKEND, jnp.float32, seed=helpers.seed_of(case))


def test_float32_not_on_hopper_set():
    """The Hopper kernels are 16-bit only: "fused_sm90" rejects float32 before anything runs."""
    q = jnp.zeros((1, 8, 2, 64), jnp.float32)
    with pytest.raises(TypeError, match="fused_sm90"):
        jax_na.na1d(q, q, q, 3, backend="fused_sm90")


# ----------------------------------------------------------------------------- padded head dims

@pytest.mark.parametrize("D,Dv,scale", [(40, 40, None), (32, 64, None), (96, 80, None), (64, 24, 0.3),
                                        (1, 1, None), (128, 100, None), (24, 8, None)])
@pytest.mark.parametrize("dtype", HALF + [jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_padded_head_dims(dtype, D, Dv, scale):
    """Head dims other than 32/64/128 run zero-padded to the next of them with the caller's scale
    (default D ** -0.5 of the unpadded D): the same function, and the gradients come back at the true
    sizes."""
    case = Case((24, 20), (7, 5), stride=(1, 2), is_causal=(False, True), B=2, H=4, Hkv=1, D=D, Dv=Dv, Na=3,
                scale=scale)
    check_case(case, BACKEND, dtype, seed=D * 1000 + Dv)


# ----------------------------------------------------------------------------- head dim 32

# 16-bit head dims up to 32 run at 32 on the portable kernels (unpadded at 32; "fused" picks them on
# every GPU, fused_sm90 pads them to 64; float32 pads them to 64): 64-byte rows (a 4-chunk swizzle),
# K/V tiles shorter than one pass of the loading threads in the dQ kernel. Every third edge case plus
# the many-KV-tile problems.
D32_CASES = ([dataclasses.replace(c, D=32, Dv=32) for c in helpers.edge_cases()[::3]]
             + [dataclasses.replace(c, D=32, Dv=32) for c in MANY_TILES])


@pytest.mark.parametrize("i,case", list(enumerate(D32_CASES)), ids=[c.id for c in D32_CASES])
def test_head_dim_32(i, case):
    """Head dim 32 on the portable kernels, forward and backward, float16/bfloat16 alternating and
    float32 (padded to 64) on every fourth case."""
    dtype = jnp.float32 if i % 4 == 3 else HALF[i % 2]
    check_case(case, "fused_sm80", dtype, seed=helpers.seed_of(case))


# ----------------------------------------------------------------------------- head dim 256

# float16/bfloat16 head dims 129..256 run at 256 on the portable kernels ("fused" picks them on every
# GPU; fused_sm90 has no 256), which compute their outputs in two passes of 128 columns.
D256_BACKEND = BACKEND if ON_CPU else "fused_sm80"
D256_CASES = ([dataclasses.replace(c, D=256, Dv=256) for c in helpers.edge_cases()[::4]]
              + [dataclasses.replace(c, D=256, Dv=256) for c in MANY_TILES])


@pytest.mark.parametrize("i,case", list(enumerate(D256_CASES)), ids=[c.id for c in D256_CASES])
def test_head_dim_256(i, case):
    """Every fourth edge case and the many-KV-tile problems at head dim 256 (float16/bfloat16
    alternating): both output passes, the lse written once, dK/dV over two passes of the Q tiles."""
    check_case(case, D256_BACKEND, HALF[i % 2], seed=helpers.seed_of(case))


@pytest.mark.parametrize("D,Dv", [(136, 136), (200, 72), (64, 256), (255, 130)])
def test_head_dims_padded_to_256(D, Dv):
    """Head dims above 128 zero-padded to 256 (auto picks the fused kernels for them in 16-bit)."""
    case = Case((24, 20), (7, 5), stride=(1, 2), is_causal=(False, True), B=2, H=4, Hkv=2, D=D, Dv=Dv, Na=3)
    check_case(case, BACKEND, jnp.bfloat16, seed=D * 1000 + Dv)


# ----------------------------------------------------------------------------- scale <= 0

@pytest.mark.parametrize("scale", [-0.3, -1.0, 0.0])
@pytest.mark.parametrize("backend", KERNEL_SETS)
def test_non_positive_scale(backend, scale):
    """Negative scales run as |scale| on -q (bit-identical scores) and scale 0 as 1 on q * 0 (a
    uniform softmax over each window, dq = 0): out, lse and every gradient match the reference."""
    case = Case((20, 24), (7, 5), stride=(1, 2), dilation=(2, 1), is_causal=(False, True), B=2, H=4, Hkv=2,
                D=64, Dv=64, Na=3, scale=scale)
    check_case(case, backend, jnp.bfloat16, seed=7)


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("backend", KERNEL_SETS)
def test_backward_is_deterministic(backend):
    """deterministic_backward=True: every result is bitwise the same over three runs, with 8 query
    heads reducing into one kv head and additional keys/values reduced over every query (poisoned
    memory in between)."""
    case = Case((6, 20, 24), (3, 9, 7), dilation=(1, 2, 1), H=8, Hkv=1, D=128, Dv=128, Na=5)
    args = random_inputs(case, jnp.bfloat16, 3)
    run = na_fns(case, backend, deterministic_backward=True)
    runs = []
    for _ in range(3):
        poison_device_memory()
        runs.append([np.asarray(x.astype(jnp.float32)) for x in jax.tree.leaves(jax.block_until_ready(run(*args)))])
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            np.testing.assert_array_equal(a, b, err_msg=f"result {i} differs between runs")
    ref = na_fns(case, "reference")(*(to64(a) for a in args))
    for i, (a, b) in enumerate(zip(jax.tree.leaves(run(*args)), jax.tree.leaves(ref))):
        rel(a, b, TOL[jnp.dtype(jnp.bfloat16)] if i != 1 else 1e-5, f"result {i}")


# Both modes of the Hopper backward on every rank and feature (the sweeps above run both too).
DETERMINISTIC_CASES = [
    Case((70,), (9,), B=2, H=2, Hkv=1, D=128, Dv=128, Na=3),
    Case((640,), (257,), is_causal=(True,), H=4, Hkv=2, D=64, Dv=64),
    Case((40, 48), (13, 7), stride=(1, 3), dilation=(2, 1), is_causal=(True, False), H=4, Hkv=2, D=128, Dv=128,
         Na=5),
    Case((6, 20, 24), (3, 9, 7), stride=(1, 2, 7), dilation=(1, 2, 1), is_causal=(True, False, False), H=4,
         Hkv=1, D=128, Dv=96),
]


@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=[c.id for c in DETERMINISTIC_CASES])
@pytest.mark.parametrize("deterministic", [True, False])
def test_hopper_backward_modes(case, deterministic):
    """Each mode of the fused backward against the reference (bitwise reproducible where
    deterministic, dq too)."""
    backend = KERNEL_SETS[0]
    check_case(case, backend, jnp.bfloat16, seed=helpers.seed_of(case), deterministic_backward=deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_with_very_negative_scores(deterministic):
    """Every score near -25 (lse near -21), float16: a tile with key rows past the data that skips
    the mask (a window covering the whole sequence; the 5 additional keys) has exp(-lse) there far
    beyond float16's range; those rows must add nothing (dq finite and right in both modes)."""
    case = Case((70,), (70,), H=2, Hkv=1, D=128, Dv=128, Na=5)
    q, k, v, ak, av, ct_o, ct_l = random_inputs(case, jnp.float16, 5)
    q, k, ak = (jnp.full(x.shape, sign * 1.5, x.dtype) for x, sign in ((q, 1), (k, -1), (ak, -1)))
    args = (q, k, v, ak, av, ct_o, ct_l)
    out, lse, grads = na_fns(case, KERNEL_SETS[0], deterministic_backward=deterministic)(*args)
    ref_out, ref_lse, ref_grads = na_fns(case, "reference")(*(to64(a) for a in args))
    assert float(jnp.max(ref_lse)) < -15, "the case must push lse far below 0"
    rel(lse, ref_lse, 1e-5, "lse")
    for name, g, rg in zip(["dq", "dk", "dv", "d_additional_keys", "d_additional_values"], grads, ref_grads):
        assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))), name
        rel(g, rg, TOL[jnp.dtype(jnp.float16)], name)


# ----------------------------------------------------------------------------- Flax layer

@pytest.mark.parametrize("rank,shape,ks,kw", [
    (2, (12, 10), (5, 3), dict(dilation=(2, 1), is_causal=(False, True))),
    (3, (4, 8, 6), (3, 3, 5), dict(stride=(1, 2, 1))),
], ids=["2d-dilated-causal", "3d-strided"])
@pytest.mark.parametrize("backend", KERNEL_SETS)
def test_flax_layer_grad_under_jit(backend, rank, shape, ks, kw):
    """A jitted gradient through NeighborhoodAttention2D/3D (GQA: 4 query heads on 2 kv heads, head
    dim 64) on the fused kernels in bfloat16 equals the same layer's gradient on the reference backend
    in float64 with the same parameters, for the input and every parameter."""
    from jax_na.flax import NeighborhoodAttention2D, NeighborhoodAttention3D

    cls = {2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}[rank]

    def layer(backend, dtype):
        return cls(num_heads=4, num_kv_heads=2, qkv_features=256, kernel_size=ks, **kw, dtype=dtype,
                   param_dtype=dtype, backend=backend)

    x = jax.random.normal(jax.random.key(0), (2, *shape, 32), jnp.float32)
    ct = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    params = layer("reference", jnp.float32).init(jax.random.key(1), x)

    def grads(backend, dtype):
        model = layer(backend, dtype)
        loss = lambda p, x: jnp.sum(model.apply(p, x).astype(jnp.float32) * ct.astype(jnp.float32))
        cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(cast(params), x.astype(dtype))

    got = grads(backend, jnp.bfloat16)
    ref = grads("reference", jnp.float64)
    got_leaves, ref_leaves = jax.tree.leaves(got), jax.tree.leaves(ref)
    assert len(got_leaves) == len(ref_leaves) == 9  # query/key/value/out kernel + bias, and the input
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ref)[0]]
    scale = max(float(jnp.linalg.norm(r)) for r in ref_leaves)
    for name, g, r in zip(names, got_leaves, ref_leaves):
        if float(jnp.linalg.norm(r)) < 1e-9 * scale:
            # The key bias: adding it shifts every score of a row by the same q.b, which the softmax
            # ignores, so its gradient is 0 (up to rounding): small against the other gradients.
            assert float(jnp.linalg.norm(g.astype(jnp.float32))) < 1e-2 * scale, name
            continue
        # bf16 end to end: the projections' and the bias sums' own bf16 rounding (the reference backend
        # in bf16 measures 2.3-2.4% on the output bias) on top of the kernels' 1e-2.
        rel(g, r, 5 * TOL[jnp.dtype(jnp.bfloat16)], f"grad {name}")


# ----------------------------------------------------------------------------- > 2**31 elements

@pytest.mark.large
def test_forward_more_than_2_31_elements():
    """1-D, B=1, L=2**21+3, H=8, D=128 in bf16: each of q, k, v, out has 2**31 + 3072 elements (4.3 GB),
    so element offsets past 2**31 must be 64-bit. Forward only; every output element is written (the
    handler poisons it first) and finite; the first and the last 4096 tokens match the reference run
    on just the tokens their windows can reach (k=7, non-causal: 16 more tokens on the inner side)."""
    if ON_CPU:
        pytest.skip("too large for the CPU stand-in")
    L, H, D, k = 2**21 + 3, 8, 128, 7
    assert L * H * D > 2**31
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0)
    if limit and limit < 40e9:
        pytest.skip(f"needs ~30 GB of device memory, this device has {limit / 1e9:.0f} GB")

    @jax.jit
    def make(key):
        # Varies with the token index on a period (4099) that does not divide 2**21 tokens (= 2**31
        # elements), plus a per-token term: a wrapped 32-bit offset reads different values.
        k1, k2, k3 = jax.random.split(key, 3)
        small = jax.random.normal(k1, (4099, H, D), jnp.float32)
        per_token = jax.random.normal(k2, (L,), jnp.float32)
        w = jax.random.normal(k3, (H, D), jnp.float32)
        x = small[jnp.arange(L) % 4099] + per_token[:, None, None] * w
        return (0.7 * x[None]).astype(jnp.bfloat16)

    q, kk, v = (make(key) for key in jax.random.split(jax.random.key(0), 3))
    out, lse = jax.jit(lambda q, k_, v: jax_na.na1d(q, k_, v, k, return_lse=True, backend="fused"))(q, kk, v)
    assert out.shape == (1, L, H, D) and out.dtype == jnp.bfloat16 and lse.shape == (1, L, H)
    assert bool(jax.jit(lambda o, s: jnp.all(jnp.isfinite(o)) & jnp.all(jnp.isfinite(s)))(out, lse))
    ref = jax.jit(lambda q, k_, v: jax_na.na1d(q, k_, v, k, return_lse=True, backend="reference"))
    n, extra = 4096, 16
    for name, window, rows in (("first", slice(0, n + extra), slice(0, n)),
                               ("last", slice(L - n - extra, L), slice(extra, n + extra))):
        r_out, r_lse = ref(*(to64(x[:, window]) for x in (q, kk, v)))
        rel(out[:, window][:, rows], r_out[:, rows], TOL[jnp.dtype(jnp.bfloat16)], f"out, {name} {n} tokens")
        rel(lse[:, window][:, rows], r_lse[:, rows], 1e-5, f"lse, {name} {n} tokens")
