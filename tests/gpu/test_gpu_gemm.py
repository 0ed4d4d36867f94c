"""GPU: the gemm backend (tensor-core unfused ops, CUDA targets jax_na_gemm_*) vs the float64 reference.

- the unfused na*d_qk (with and without rpb) and na*d_av, forward and backward, at head dims below,
  at, between and above the tensor-core instantiations (64 and 128: the others run zero-padded, above
  128 on the naive kernels inside the targets; float32 through 3xTF32, at float32's tolerance);
- na1d/na2d/na3d with backend="gemm" (window scores in float32 -> one float32 softmax with
  the additional keys -> av) with additional keys/values, return_lse, causal axes, stride, dilation
  and GQA, forward and every gradient, at the other backends' tolerances;
- the lowering really reaches the gemm targets, and auto takes them for the unfused ops where they
  run on tensor cores.

The edge-case sweeps of test_gpu_naive.py (na*d) and test_gpu_unfused.py run "gemm" too, as one of
``backends_under_test()``. On CPU (JAX_NA_TEST_GPU_ON_CPU=1) the gemm targets are pretended compiled,
so the same calls run with the reference standing in for the gemm primitives (it rounds the scores and
weights to the input dtype as the targets do), which checks the test logic and the composite.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import jax_na
from gpu_common import DTYPES, TOL, check_case, check_unfused, rel, to64, unfused_inputs, unfused_kw
from helpers import Case
from jax_na import primitives

pytestmark = pytest.mark.gpu

ON_CPU = jax.default_backend() == "cpu"


@pytest.fixture(autouse=True, scope="module")
def gemm_targets():
    """Skip without the gemm targets on a GPU; on CPU pretend they were compiled (the CPU lowering
    never calls them: the reference runs the primitives)."""
    if not ON_CPU:
        if "gemm" not in jax_na.available_backends():
            pytest.skip("jax_na was built without the gemm kernels")
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        helpers.pretend_gemm_targets(mp)
        yield
    jax.clear_caches()


# Head dims (D, D_v) around the tensor-core instantiations 64 and 128.
HEAD_DIMS = [(16, 16), (64, 64), (100, 100), (128, 128), (160, 160), (64, 40), (8, 128), (136, 72)]


@pytest.mark.parametrize("with_rpb", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("D,Dv", HEAD_DIMS)
def test_gemm_unfused_head_dims(D, Dv, dtype, with_rpb):
    case = Case((9, 10), (3, 4), dilation=(1, 2), is_causal=(False, True), B=2, H=4, Hkv=2, D=D, Dv=Dv)
    check_unfused(case, "gemm", dtype, with_rpb, seed=D * 1000 + Dv)


@pytest.mark.parametrize("rank", [1, 3])
def test_gemm_unfused_other_ranks(rank):
    """1-D and 3-D at the native head dims (the sweep of test_gpu_unfused.py has small ones)."""
    case = {1: Case((37,), 9, dilation=3, is_causal=True, B=2, H=4, Hkv=1, D=128, Dv=64),
            3: Case((5, 6, 7), (3, 3, 4), dilation=(1, 2, 1), is_causal=(True, False, False), H=2, Hkv=2,
                    D=64, Dv=128)}[rank]
    for dtype in DTYPES:
        check_unfused(case, "gemm", dtype, True, seed=rank)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gemm_av_ignores_masked_entries(dtype):
    """The tensor-core av never reads masked window entries either: inf/NaN there changes nothing."""
    case = Case((6, 7), (3, 4), is_causal=(True, True), H=2, Hkv=1, D=64, Dv=64)
    (_, _, _, v, w, _, _), valid = unfused_inputs(case, dtype, 3)
    vmask = valid.reshape(6, 7, 1, 12)[None]
    av = helpers.av_fn(2)
    ref = av(to64(jnp.where(vmask, w, 0)), to64(v), **unfused_kw(case), backend="reference")
    for bad in (-np.inf, np.inf, np.nan):
        got = jax.jit(lambda w, v: av(w, v, **unfused_kw(case), backend="gemm"))(
            jnp.where(vmask, w, jnp.asarray(bad, dtype)), v)
        rel(got, ref, TOL[jnp.dtype(dtype)], f"av with {bad} at masked entries")


NA_CASES = [
    Case((13, 12), (5, 4), stride=(2, 3), dilation=(1, 2), is_causal=(True, False), B=2, H=4, Hkv=2, D=64,
         Dv=64, Na=3),
    Case((40,), 7, stride=3, dilation=2, is_causal=True, H=6, Hkv=2, D=100, Dv=48, Na=2),
    Case((11, 9), 3, stride=3, H=4, Hkv=1, D=128, Dv=128, Na=4, scale=0.2),
    Case((5, 6, 7), (2, 3, 4), stride=(1, 2, 3), is_causal=(True, False, True), H=2, Hkv=1, D=32, Dv=16, Na=2),
    Case((9, 8), (3, 3), stride=(1, 2), is_causal=(False, True), H=2, Hkv=2, D=160, Dv=64, Na=1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", NA_CASES, ids=lambda c: c.id)
def test_gemm_na(case, dtype):
    """out, lse and every gradient (q, k, v, additional keys/values) of na*d(backend="gemm")."""
    check_case(case, "gemm", dtype, seed=helpers.seed_of(case))


@pytest.mark.skipif(ON_CPU, reason="inspects the CUDA lowering")
def test_gemm_lowers_to_its_targets():
    """backend="gemm" runs the four gemm targets (and no fused or naive one); auto takes them for the
    unfused ops with head dims up to 128 (float32 too: 3xTF32), and leaves larger ones to the reference."""
    case = NA_CASES[0]
    q, k, v, ak, av = (jnp.asarray(x, jnp.bfloat16) for x in helpers.rand_inputs(case, np.float32, 1))

    def loss(q, k, v, ak, av):
        out, lse = jax_na.na2d(q, k, v, **case.kwargs(), additional_keys=ak, additional_values=av,
                               return_lse=True, backend="gemm")
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    # value_and_grad: with grad alone the forward av's result is unused and traced away.
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))).lower(q, k, v, ak, av).as_text()
    for kind in ("qk", "av", "qk_bwd", "av_bwd"):
        assert f"jax_na_gemm_{kind}\"" in text or f"@jax_na_gemm_{kind}(" in text, kind
    assert "jax_na_fused" not in text and "jax_na_naive" not in text
    qk = lambda q, k: jax_na.na2d_qk(q, k, 3)
    assert "jax_na_gemm_qk" in jax.jit(qk).lower(q, k).as_text()
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    assert "jax_na_gemm_qk" in jax.jit(qk).lower(q32, k32).as_text()
    wide = jnp.zeros((*q.shape[:-1], 160), q.dtype)
    assert "jax_na_" not in jax.jit(qk).lower(wide, wide).as_text()
    assert primitives.cuda_kernel("auto", "qk", (q, k, jnp.zeros((0,), q.dtype))) == "gemm"
    assert primitives.cuda_kernel("gemm", "qk", (q32, k32, jnp.zeros((0,), q32.dtype))) == "gemm"
