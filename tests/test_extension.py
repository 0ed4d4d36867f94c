"""The installed extension: compiled kernels present where the build had nvcc, targets registered."""

import os

import pytest

import jax_na
from jax_na import _ext


def test_kernels_compiled_when_expected():
    if os.environ.get("JAX_NA_EXPECT_CUDA") != "1":
        pytest.skip("JAX_NA_EXPECT_CUDA is not set (no nvcc at install time)")
    assert _ext.has_extension(), "jax_na._C was not built"
    assert _ext.has_cuda_kernels(), "nvcc was found but jax_na was built without its CUDA kernels"
    assert "90a" in _ext.cuda_archs()


def test_registered_targets_match_contract():
    if not _ext.has_cuda_kernels():
        pytest.skip("built without CUDA kernels")
    names = set(_ext.register_targets())
    for op in ("fwd", "bwd", "qk", "qk_bwd", "av", "av_bwd"):
        assert f"jax_na_naive_{op}" in names
    # the fused targets come as a pair (a build with CUTLASS headers) or not at all
    assert ("jax_na_fused_fwd" in names) == ("jax_na_fused_bwd" in names) == _ext.has_fused_kernels()
    # the gemm targets come as a set of four (a build with CUTLASS headers and the gemm kernels) or not at all
    gemm = {f"jax_na_gemm_{op}" for op in ("qk", "qk_bwd", "av", "av_bwd")}
    assert len(gemm & names) in (0, 4) and bool(gemm & names) == _ext.has_gemm_kernels()


def test_available_backends_always_has_reference():
    backends = jax_na.available_backends()
    assert "reference" in backends
    assert ("naive" in backends) == (_ext.has_cuda_kernels() and _ext.has_cuda_device())
    assert ("fused" in backends) == (_ext.has_fused_kernels() and _ext.has_cuda_device())
    assert ("gemm" in backends) == (_ext.has_gemm_kernels() and _ext.has_cuda_device())
    if "gemm" in backends:
        assert backends.index("gemm") < backends.index("reference")
    if "fused" in backends:
        assert backends[0] == "fused"  # fastest first
    if not _ext.has_cuda_device():
        assert backends == ["reference"]
