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


def cuda_archs() -> str:
    return _C.cuda_archs() if has_cuda_kernels() else ""


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
    """Backends that can run a call on this machine, fastest first (measured on an H100: the
    reference beats the naive kernels everywhere; see jax_na.primitives.AUTO_PREFERENCE)."""
    out = ["reference"]
    if has_cuda_kernels() and has_cuda_device():
        out.append("naive")
    return out
