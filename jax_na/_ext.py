"""The compiled extension: loads ``jax_na._C`` and registers its FFI targets with XLA.

Without the extension (or without CUDA in it) jax_na still works: every call uses the reference.
"""

from __future__ import annotations

import functools

import jax

try:  # the compiled module is optional
    from jax_na import _C  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the installation
    _C = None


def has_extension() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when jax_na was built with its CUDA kernels (a GPU is not needed to answer)."""
    return _C is not None and bool(_C.has_cuda())


@functools.lru_cache(maxsize=None)
def compiled_targets() -> frozenset:
    """Names of the FFI targets compiled into the extension (empty without CUDA)."""
    if _C is None or not bool(_C.has_cuda()):
        return frozenset()
    return frozenset(_C.ffi_targets())


def has_target(name: str) -> bool:
    """True when the FFI target ``name`` (e.g. ``"jax_na_fused_bwd"``) was compiled."""
    return has_cuda_kernels() and name in compiled_targets()


def has_fused_kernels() -> bool:
    """True when the fused kernels were compiled (they need the CUTLASS headers at build time; a
    CUDA build without them has only the naive kernels)."""
    return has_target("jax_na_fused_fwd")


def has_gemm_kernels() -> bool:
    """True when the gemm (tensor-core unfused) kernels were compiled (like the fused ones, they need
    the CUTLASS headers at build time)."""
    return has_target("jax_na_gemm_qk")


def cuda_archs() -> str:
    return _C.cuda_archs() if _C is not None and has_cuda_kernels() else ""


@functools.lru_cache(maxsize=None)
def has_hopper_kernels() -> bool:
    """True when the Hopper (sm_90a, wgmma) fused forward was compiled and a compute capability 9.0
    GPU is present (that code runs on nothing else)."""
    if not has_fused_kernels() or "90a" not in cuda_archs().split(";"):
        return False
    try:
        return any(d.platform == "gpu" and getattr(d, "compute_capability", "") == "9.0" for d in jax.devices())
    except RuntimeError:  # pragma: no cover
        return False


@functools.lru_cache(maxsize=None)
def register_targets() -> tuple[str, ...]:
    """Register every compiled handler for the CUDA platform (once).

    Registration for a platform whose plugin is not loaded is deferred by jax, so this is safe on
    machines without a GPU.
    """
    if not has_cuda_kernels():
        return ()
    names = []
    for name, capsule in _C.ffi_targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        names.append(name)
    return tuple(sorted(names))


def has_cuda_device() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:  # pragma: no cover
        return False


def available_backends() -> list[str]:
    """Backends that can run a call on this machine, fastest first (measured on an H100: the fused
    kernels reach 101-401 effective TFLOP/s forward (82-319 forward+backward), the reference 12-37,
    the naive kernels 0.4-1; see jax_na.primitives.AUTO_PREFERENCE). The fused backends take
    float16/bfloat16 with head dims up to 256 and float32 up to 128 ("fused_sm90" float16/bfloat16
    up to 128);
    "fused_sm90"/"fused_sm80" are "fused" with its kernels pinned (Hopper/portable, forward and
    backward). "gemm" (tensor-core unfused ops in float32, float16 and bfloat16; its na1d/na2d/na3d
    are qk -> softmax -> av) stands before the reference as auto prefers it for the unfused ops; its
    na*d is slower than fused (README.md)."""
    on_gpu = has_cuda_kernels() and has_cuda_device()
    out = ["fused"] if on_gpu and has_fused_kernels() else []
    if out:
        out += ["fused_sm90", "fused_sm80"] if has_hopper_kernels() else ["fused_sm80"]
    if on_gpu and has_gemm_kernels():
        out.append("gemm")
    out.append("reference")
    if on_gpu:
        out.append("naive")
    return out
