"""GPU: every compiled tile configuration of the fused forward (q_tile_shape / kv_tile_shape of
na1d/na2d/na3d, listed by jax_na.fused_tile_configs) against the float64 reference.

Each configuration of each kernel set ("fused_sm80": the portable kernels; "fused_sm90": the Hopper
ones, where this GPU has them) runs, pinned by name with both shapes given, on geometries that
stress the tiling: spatial sizes that are no multiple of the tiles, kernel sizes asymmetric per axis,
stride, dilation, per-axis causal masks, GQA, additional keys/values, a window as long as the axis;
float16 and bfloat16 at head dims 64 and 128 (cycling over the geometries, so that every
configuration sees all four). Forward only (out and lse), with poisoned memory, bitwise equal over
two runs. Then "fused" (auto) on every configuration of either set (it runs the set that has it), and
the gradient through na2d with a non-default Q tile (the backward keeps its own tiles: this checks the
custom_vjp plumbing). Tolerances: gpu_common.tolerances (TOL for out and gradients, 1e-5 for the LSE).

The backward section does the same for the backward's configurations (backward_q_tile_shape /
backward_kv_tile_shape, listed by jax_na.fused_tile_configs(..., backward=True)): each one of each
kernel set, pinned by name with both shapes given, on geometries that stress the dK/dV kernel's
tiling, every gradient against the float64 reference (poisoned memory, bitwise equal over two runs);
the Hopper set's non-deterministic configurations (deterministic_backward=False: dQ added by its
warp-specialized kernel); and "fused" with the
shapes of either set (a portable-only configuration then adds dQ without atomics).
"""

import dataclasses
import functools
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import jax_na
from gpu_common import (adds_dq, bwd_tiles_of, check_case, na_fns, poison_device_memory, random_inputs, rel,
                        to64, tolerances)
from helpers import Case

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("JAX_NA_TEST_GPU_ON_CPU") == "1"
KERNEL_SETS = ("fused_sm80", "fused_sm90")
# (dtype, head dim) combinations, cycled over the geometries of each configuration.
COMBOS = [(jnp.float16, 64), (jnp.bfloat16, 128), (jnp.bfloat16, 64), (jnp.float16, 128)]


@pytest.fixture(autouse=True)
def _need_fused():
    if not ON_CPU and "fused" not in jax_na.available_backends():
        pytest.skip("jax_na was built without its fused kernels (no CUTLASS headers at build time)")


def _backend(kernel_set):
    """The backend that runs ``kernel_set`` here: the set itself; on CPU (JAX_NA_TEST_GPU_ON_CPU=1)
    auto, which takes tile shapes and runs the reference, to check the test logic itself."""
    if ON_CPU:
        return None
    if kernel_set not in jax_na.available_backends():
        pytest.skip(f"{kernel_set} is not available here (available: {jax_na.available_backends()})")
    return kernel_set


# ----------------------------------------------------------------------------- geometries

# Small problems (at most ~3000 query tokens), D/D_v set per combination.
GEOMETRIES = {
    1: [
        Case((300,), 17, B=2, H=4, Hkv=2, Na=5),
        Case((257,), 33, stride=4, dilation=3, is_causal=True, H=2, Hkv=1),
        Case((1000,), 129, dilation=2, H=2, Hkv=2),
        Case((130,), 130, is_causal=True, H=4, Hkv=1, Na=3),                 # k = L
    ],
    2: [
        Case((37, 29), (3, 7), B=2, H=4, Hkv=2, Na=5),
        Case((29, 37), (7, 3), stride=(2, 1), dilation=(1, 2), is_causal=(True, False), H=2, Hkv=1),
        Case((40, 21), (9, 5), stride=(3, 5), dilation=(2, 3), is_causal=(False, True), H=4, Hkv=1, Na=3),
        Case((19, 70), (3, 31), stride=(1, 4), H=2, Hkv=1, Na=3),             # long along the last axis
        Case((13, 50), (13, 11), is_causal=(True, True), H=2, Hkv=2),         # k = L on axis 0
    ],
    3: [
        Case((6, 13, 19), (3, 5, 7), B=2, H=4, Hkv=2, Na=5),
        Case((9, 12, 10), (5, 3, 7), stride=(1, 3, 2), dilation=(1, 2, 1), is_causal=(True, False, True), H=2,
             Hkv=1),
        Case((5, 17, 22), (2, 9, 5), dilation=(2, 1, 3), is_causal=(False, True, False), H=4, Hkv=1, Na=3),
        Case((3, 20, 24), (3, 7, 9), stride=(1, 2, 3), H=2, Hkv=2),           # k = L on axis 0
    ],
}


def _with_head_dim(case, D):
    return dataclasses.replace(case, D=D, Dv=D)


def _shape_id(s):
    return "x".join(map(str, s)) if s is not None else "any"


# ----------------------------------------------------------------------------- forward, checked

@functools.lru_cache(maxsize=None)
def fwd_fn(case, backend, q_tile_shape=None, kv_tile_shape=None):
    """jitted (out, lse) of na{r}d for a case with these tile shapes: one compile per combination."""
    fn = helpers.na_fn(case.rank)

    def run(q, k, v, ak, av):
        kw = {} if ak is None else dict(additional_keys=ak, additional_values=av)
        return fn(q, k, v, **case.kwargs(), scale=case.scale, return_lse=True, backend=backend,
                  q_tile_shape=q_tile_shape, kv_tile_shape=kv_tile_shape, **kw)

    return jax.jit(run)


def check_forward(case, backend, dtype, q_tile_shape, kv_tile_shape, seed):
    """out and lse of ``backend`` with these tile shapes against the float64 reference on the same
    (upcast) inputs, with poisoned memory, and bitwise equal over two runs."""
    args = random_inputs(case, dtype, seed)[:5]
    run = fwd_fn(case, backend, q_tile_shape, kv_tile_shape)
    # 1) a first run on other fresh random inputs, 2) poison, 3) the run under test, 4) poison, 5) again
    jax.block_until_ready(run(*random_inputs(case, dtype, seed + 1000)[:5]))
    poison_device_memory()
    out, lse = jax.block_until_ready(run(*args))
    poison_device_memory()
    out2, lse2 = jax.block_until_ready(run(*args))

    what = f"{case.id} q_tile {q_tile_shape} kv_tile {kv_tile_shape} on {backend}"
    assert out.dtype == jnp.dtype(dtype) and lse.dtype == jnp.float32
    assert out.shape == (case.B, *case.spatial, case.H, case.Dv) and lse.shape == out.shape[:-1]
    ref_out, ref_lse = fwd_fn(case, "reference")(*(to64(a) for a in args))
    tol, lse_tol = tolerances(backend or "fused", dtype)
    rel(out, ref_out, tol, f"out {what}")
    rel(lse, ref_lse, lse_tol, f"lse {what}")
    for name, a, b in (("out", out, out2), ("lse", lse, lse2)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)),
                                      err_msg=f"{name} not deterministic ({what})")


# ----------------------------------------------------------------------------- every configuration

def _config_params():
    """(kernel set, rank, configuration index, geometry index) for every compiled configuration (the
    float16/bfloat16 lists at head dims 64/128 are one list per set and rank) and geometry."""
    params = []
    for kernel_set in KERNEL_SETS:
        for rank in (1, 2, 3):
            for c, (q, kv) in enumerate(jax_na.fused_tile_configs(rank, "bfloat16", 128)[kernel_set]):
                for g in range(len(GEOMETRIES[rank])):
                    params.append(pytest.param(kernel_set, rank, c, g,
                                               id=f"{kernel_set}-{rank}d-c{c}-q{_shape_id(q)}-kv{_shape_id(kv)}-g{g}"))
    return params


@pytest.mark.parametrize("kernel_set,rank,c,g", _config_params())
def test_every_configuration(kernel_set, rank, c, g):
    """Configuration c of ``kernel_set`` (both shapes given, backend pinned) on geometry g, in the
    (dtype, head dim) combination (g + c) % 4."""
    backend = _backend(kernel_set)
    dtype, D = COMBOS[(g + c) % len(COMBOS)]
    configs = jax_na.fused_tile_configs(rank, dtype, D)[kernel_set]
    assert configs == jax_na.fused_tile_configs(rank, "bfloat16", 128)[kernel_set]
    q_tile_shape, kv_tile_shape = configs[c]
    case = _with_head_dim(GEOMETRIES[rank][g], D)
    check_forward(case, backend, dtype, q_tile_shape, kv_tile_shape, seed=helpers.seed_of(case) + c)


def test_every_portable_configuration_on_16_row_warps():
    """JAX_NA_FUSED_16_ROW_WARPS=1 runs the portable forward's 32-query-warp configurations (16-bit
    head dim 128) on 16-query warps, as GPUs whose SMs hold only one 32-row CTA do (A100, sm86/89):
    test_every_configuration on fused_sm80 passes that way too, in a process of its own (the
    variable is read once per process)."""
    _backend("fused_sm80")
    if ON_CPU:
        pytest.skip("the variable only matters to the CUDA kernels")
    env = dict(os.environ, JAX_NA_FUSED_16_ROW_WARPS="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          __file__, "-k", "test_every_configuration and fused_sm80"],
                         env=env, capture_output=True, text=True, timeout=1200, cwd=os.path.dirname(__file__))
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) == len([p for p in _config_params() if p.values[0] == "fused_sm80"]), tail


def _head_dim_32_params():
    """(rank, configuration index, geometry index) of the portable set's head-dim-32 configurations
    that the other head dims lack (the 64-query tiles of 1-D and 2-D), on every geometry."""
    params = []
    for rank in (1, 2, 3):
        common = jax_na.fused_tile_configs(rank, "bfloat16", 64)["fused_sm80"]
        for c, (q, kv) in enumerate(jax_na.fused_tile_configs(rank, "bfloat16", 32)["fused_sm80"]):
            if (q, kv) in common:
                continue
            for g in range(len(GEOMETRIES[rank])):
                params.append(pytest.param(rank, c, g, id=f"{rank}d-c{c}-q{_shape_id(q)}-kv{_shape_id(kv)}-g{g}"))
    return params


@pytest.mark.parametrize("rank,c,g", _head_dim_32_params())
def test_head_dim_32_configurations(rank, c, g):
    """The portable set's 64-query configurations (16-bit head dim 32 only) on every geometry, float16
    and bfloat16 alternating, pinned with both shapes given."""
    backend = _backend("fused_sm80")
    dtype = (jnp.float16, jnp.bfloat16)[(g + c) % 2]
    configs = jax_na.fused_tile_configs(rank, dtype, 32)["fused_sm80"]
    q_tile_shape, kv_tile_shape = configs[c]
    assert math.prod(q_tile_shape) == 64, configs
    case = _with_head_dim(GEOMETRIES[rank][g], 32)
    check_forward(case, backend, dtype, q_tile_shape, kv_tile_shape, seed=helpers.seed_of(case) + c)


def _auto_params():
    params = []
    for rank in (2, 3):
        listed = jax_na.fused_tile_configs(rank, "bfloat16", 128)
        union = list(dict.fromkeys(listed["fused_sm80"] + listed["fused_sm90"]))
        for q, kv in union:
            params.append(pytest.param(rank, q, kv, id=f"{rank}d-q{_shape_id(q)}-kv{_shape_id(kv)}"))
        # one shape alone: the first configuration that has it
        params.append(pytest.param(rank, union[-1][0], None, id=f"{rank}d-q{_shape_id(union[-1][0])}-kvany"))
    return params


@pytest.mark.parametrize("rank,q_tile_shape,kv_tile_shape", _auto_params())
def test_auto_backend_with_tile_shapes(rank, q_tile_shape, kv_tile_shape):
    """backend "fused" with the shapes of either set: it runs the set(s) that have them (a
    configuration of the Hopper kernels only needs them: elsewhere a ValueError naming them)."""
    listed = jax_na.fused_tile_configs(rank, "bfloat16", 128)
    has = lambda s: any(q_tile_shape in (None, q) and kv_tile_shape in (None, kv) for q, kv in listed[s])
    case = _with_head_dim(GEOMETRIES[rank][2], 128)
    backend = None if ON_CPU else "fused"
    if not ON_CPU and not has("fused_sm80") and "fused_sm90" not in jax_na.available_backends():
        q = jnp.zeros((1, *case.spatial, 2, 128), jnp.bfloat16)
        with pytest.raises(ValueError, match="Hopper"):
            helpers.na_fn(rank)(q, q, q, case.kernel_size, backend=backend, q_tile_shape=q_tile_shape,
                                kv_tile_shape=kv_tile_shape)
        return
    check_forward(case, backend, jnp.bfloat16, q_tile_shape, kv_tile_shape, seed=helpers.seed_of(case))


# ----------------------------------------------------------------------------- backward

@pytest.mark.parametrize("kernel_set", ["fused", *KERNEL_SETS])
def test_grad_with_non_default_q_tile(kernel_set):
    """jax.grad through na2d (out and lse) with a non-default q_tile_shape: the gradients of q, k, v
    and the additional keys/values equal the float64 reference's (the backward runs its own tiles on
    the forward's out and lse)."""
    backend = _backend(kernel_set) if kernel_set != "fused" else (None if ON_CPU else "fused")
    listed = jax_na.fused_tile_configs(2, "bfloat16", 64)
    sets = KERNEL_SETS if kernel_set == "fused" else (kernel_set,)
    # the second Q shape of every set that runs (the default is the first)
    q_tile_shape = listed[sets[0]][1][0]
    assert all(q_tile_shape != listed[s][0][0] and q_tile_shape in [q for q, _ in listed[s]] for s in sets)
    case = Case((24, 20), (7, 5), stride=(1, 2), dilation=(2, 1), is_causal=(False, True), B=2, H=4, Hkv=2,
                D=64, Dv=64, Na=3)
    dtype = jnp.bfloat16
    q, k, v, ak, av, ct_o, ct_l = random_inputs(case, dtype, seed=5)

    def grads(backend, tiles, *args):
        acc = jnp.float64 if args[0].dtype == jnp.float64 else jnp.float32   # the float64 reference: float64 throughout

        def loss(q, k, v, ak, av):
            out, lse = jax_na.na2d(q, k, v, **case.kwargs(), additional_keys=ak, additional_values=av,
                                   return_lse=True, backend=backend, **tiles)
            return jnp.sum(out.astype(acc) * ct_o.astype(acc)) + jnp.sum(lse.astype(acc) * ct_l.astype(acc))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)

    args = (q, k, v, ak, av)
    poison_device_memory()
    got = jax.block_until_ready(grads(backend, dict(q_tile_shape=q_tile_shape), *args))
    ref = grads("reference", {}, *(to64(a) for a in args))
    tol, _ = tolerances(backend or "fused", dtype)
    for name, g, r, x in zip(["dq", "dk", "dv", "d_additional_keys", "d_additional_values"], got, ref, args):
        assert g.dtype == jnp.dtype(dtype) and g.shape == x.shape, name
        rel(g, r, tol, f"{name} {case.id} q_tile {q_tile_shape} on {kernel_set}")


# ----------------------------------------------------------------------------- the backward's tiles

# Geometries for the backward's key-stationary dK/dV kernel (backward_q_tile_shape: the queries it
# takes per step; backward_kv_tile_shape: the keys a CTA owns): spatial sizes no multiple of any KV
# tile (so the last CTAs own partial boxes), kernel sizes asymmetric per axis (inverse neighbourhoods
# longer on one axis), dilation, stride, per-axis causal masks, GQA (dK/dV summed over the query
# heads of a KV head), additional keys/values (their gradients from the same kernel), a window much
# shorter on the first axis (what the flatter alternatives are for).
BWD_GEOMETRIES = {
    1: [
        Case((300,), 17, B=2, H=4, Hkv=2, Na=5),
        Case((257,), 33, stride=4, dilation=3, is_causal=True, H=2, Hkv=1),
    ],
    2: [
        Case((37, 29), (3, 7), B=2, H=4, Hkv=2, Na=5),
        Case((29, 37), (7, 3), stride=(2, 1), dilation=(1, 2), is_causal=(True, False), H=2, Hkv=1),
        Case((19, 70), (3, 31), stride=(1, 4), dilation=(2, 1), is_causal=(False, True), H=2, Hkv=1, Na=3),
    ],
    3: [
        Case((6, 13, 19), (3, 5, 7), B=2, H=4, Hkv=2, Na=5),
        Case((9, 12, 10), (5, 3, 7), stride=(1, 3, 2), dilation=(1, 2, 1), is_causal=(True, False, True), H=2,
             Hkv=1),
        Case((4, 18, 23), (3, 9, 11), dilation=(1, 2, 2), is_causal=(True, False, False), H=4, Hkv=1, Na=3),
    ],
}
def check_backward(case, backend, dtype, bq, bkv, seed, deterministic_backward=True):
    """gpu_common.check_case with these backward tile shapes (every gradient against the float64
    reference, poisoned memory, bitwise equal over two runs where dQ is added without atomics), after
    checking the lowered backward call carries the configuration. Returns whether the backward
    added dQ with atomics."""
    tiles = bwd_tiles_of(case, backend, dtype, (bq, bkv), deterministic_backward)
    assert tiles is not None
    atomic = adds_dq(case, backend, dtype, deterministic_backward, (bq, bkv))
    if not ON_CPU:   # the shapes reach the kernels: the backward call's attributes
        run = na_fns(case, backend, deterministic_backward, (bq, bkv))
        text = run.lower(*random_inputs(case, dtype, seed)).as_text()
        lines = [ln for ln in text.splitlines() if "@jax_na_fused_bwd(" in ln]
        assert lines, "no jax_na_fused_bwd call"
        for ln in lines:
            for name, want in (("arch", tiles.arch), ("tiles_sm80", tiles.sm80), ("tiles_sm90", tiles.sm90),
                               ("deterministic", int(not atomic))):
                assert f"{name} = {want} : i64" in ln, (name, want, ln)
    assert check_case(case, backend, dtype, seed, deterministic_backward, (bq, bkv)) == atomic
    return atomic


def _bwd_config_params():
    """(kernel set, rank, configuration index, geometry index) for every compiled backward
    configuration and geometry; the (dtype, head dim) combination (g + c) % 4 (the portable set's
    configuration c is another shape at head dim 64 than at 128: each sees both)."""
    params = []
    for kernel_set in KERNEL_SETS:
        for rank in (1, 2, 3):
            for g in range(len(BWD_GEOMETRIES[rank])):
                for c in range(len(jax_na.fused_tile_configs(rank, "bfloat16", 128, backward=True,
                                                              deterministic_backward=True)[kernel_set])):
                    dtype, D = COMBOS[(g + c) % len(COMBOS)]
                    q, kv = jax_na.fused_tile_configs(rank, dtype, D, backward=True,
                                                      deterministic_backward=True)[kernel_set][c]
                    params.append(pytest.param(
                        kernel_set, rank, c, g,
                        id=f"{kernel_set}-{rank}d-c{c}-q{_shape_id(q)}-kv{_shape_id(kv)}-"
                           f"{jnp.dtype(dtype).name}-D{D}-g{g}"))
    return params


@pytest.mark.parametrize("kernel_set,rank,c,g", _bwd_config_params())
def test_every_backward_configuration(kernel_set, rank, c, g):
    """Backward configuration c of ``kernel_set`` in the deterministic mode (both backward shapes
    given, backend pinned) on geometry g: every gradient against the float64 reference (the
    non-deterministic mode's: test_hopper_nondeterministic_backward_configurations)."""
    backend = _backend(kernel_set)
    dtype, D = COMBOS[(g + c) % len(COMBOS)]
    configs = jax_na.fused_tile_configs(rank, dtype, D, backward=True, deterministic_backward=True)[kernel_set]
    assert len(configs) == (1 if rank == 1 else 2)
    bq, bkv = configs[c]
    case = _with_head_dim(BWD_GEOMETRIES[rank][g], D)
    check_backward(case, backend, dtype, bq, bkv, seed=helpers.seed_of(case) + 7 * c)


def _bwd_head_dim_32_params():
    params = []
    for rank in (1, 2, 3):
        for c, (q, kv) in enumerate(jax_na.fused_tile_configs(rank, "bfloat16", 32, backward=True)["fused_sm80"]):
            for g in range(len(BWD_GEOMETRIES[rank])):
                params.append(pytest.param(rank, c, g, id=f"{rank}d-c{c}-q{_shape_id(q)}-kv{_shape_id(kv)}-g{g}"))
    return params


@pytest.mark.parametrize("rank,c,g", _bwd_head_dim_32_params())
def test_every_backward_configuration_head_dim_32(rank, c, g):
    """The portable backward's configurations at head dim 32, whose dQ kernel takes 64-query CTAs (4
    warps; 128 queries at the other head dims), on every geometry, float16 and bfloat16 alternating:
    every gradient against the float64 reference."""
    backend = _backend("fused_sm80")
    dtype = (jnp.bfloat16, jnp.float16)[(g + c) % 2]
    bq, bkv = jax_na.fused_tile_configs(rank, dtype, 32, backward=True)["fused_sm80"][c]
    case = _with_head_dim(BWD_GEOMETRIES[rank][g], 32)
    check_backward(case, backend, dtype, bq, bkv, seed=helpers.seed_of(case) + 7 * c)


def _hopper_nondeterministic_params():
    params = []
    for rank in (1, 2, 3):
        for c, (q, kv) in enumerate(jax_na.fused_tile_configs(rank, "bfloat16", 128, backward=True,
                                                              deterministic_backward=False)["fused_sm90"]):
            for g, (dtype, D) in enumerate([(jnp.bfloat16, 128), (jnp.float16, 64)]):
                params.append(pytest.param(rank, c, g, dtype, D, id=f"{rank}d-c{c}-q{_shape_id(q)}-kv{_shape_id(kv)}-"
                                                                    f"{jnp.dtype(dtype).name}-D{D}-g{g}"))
    return params


@pytest.mark.parametrize("rank,c,g,dtype,D", _hopper_nondeterministic_params())
def test_hopper_nondeterministic_backward_configurations(rank, c, g, dtype, D):
    """Every configuration of the Hopper set's non-deterministic backward (deterministic_backward=False:
    one warp-specialized kernel of 128-key CTAs adds dK, dV and dQ, dQ with bulk reductions) on the
    geometries: dq checked against the reference on both runs; dk, dv and the additional
    keys'/values' gradients still bitwise reproducible."""
    backend = _backend("fused_sm90")
    bq, bkv = jax_na.fused_tile_configs(rank, dtype, D, backward=True, deterministic_backward=False)["fused_sm90"][c]
    case = _with_head_dim(BWD_GEOMETRIES[rank][g], D)
    atomic = check_backward(case, backend, dtype, bq, bkv, seed=helpers.seed_of(case) + 11,
                            deterministic_backward=False)
    assert atomic == (not ON_CPU)   # pinned to the Hopper kernels: always atomic dQ on the GPU


def _auto_bwd_params():
    listed = jax_na.fused_tile_configs(2, "bfloat16", 128, backward=True, deterministic_backward=False)
    union = list(dict.fromkeys(listed["fused_sm80"] + listed["fused_sm90"]))
    params = [pytest.param(q, kv, id=f"q{_shape_id(q)}-kv{_shape_id(kv)}") for q, kv in union]
    params.append(pytest.param(None, union[-1][1], id=f"qany-kv{_shape_id(union[-1][1])}"))
    return params


@pytest.mark.parametrize("bq,bkv", _auto_bwd_params())
def test_auto_backend_with_backward_tiles(bq, bkv):
    """backend "fused" with the backward shapes of either set and deterministic_backward=False
    (bfloat16, head dim 128, where "fused" runs the Hopper backward on a compute capability 9.0 GPU):
    it runs the set that has them (that mode's configurations), a configuration only the portable set
    has deterministically (dq bitwise reproducible), one of the Hopper set only with dQ added by its
    warp-specialized kernel (elsewhere a ValueError naming it)."""
    listed = jax_na.fused_tile_configs(2, "bfloat16", 128, backward=True, deterministic_backward=False)
    has = lambda s: any(bq in (None, q) and bkv in (None, kv) for q, kv in listed[s])
    # at head dim 128 no (Q, K/V) pair is in both sets; a K/V shape alone can be
    assert has("fused_sm80") != has("fused_sm90") or bq is None
    case = _with_head_dim(BWD_GEOMETRIES[2][0], 128)
    backend = None if ON_CPU else "fused"
    hopper_here = "fused_sm90" in jax_na.available_backends()
    if not ON_CPU and has("fused_sm90") and not has("fused_sm80") and not hopper_here:
        q = jnp.zeros((1, *case.spatial, 2, 128), jnp.bfloat16)
        with pytest.raises(ValueError, match="Hopper") as ei:
            helpers.na_fn(2)(q, q, q, case.kernel_size, backend=backend, backward_q_tile_shape=bq,
                             backward_kv_tile_shape=bkv)
        assert "backward_kv_tile_shape" in str(ei.value)
        return
    atomic = check_backward(case, backend, jnp.bfloat16, bq, bkv, seed=helpers.seed_of(case) + 3,
                            deterministic_backward=False)
    assert atomic == (has("fused_sm90") and not ON_CPU and hopper_here)
