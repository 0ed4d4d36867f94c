"""jax_na: neighborhood attention for JAX.

Functional ops (``na1d/na2d/na3d``, unfused ``na*d_qk``/``na*d_av``), backed by CUDA kernels
registered as XLA FFI custom calls where available and by a pure-JAX reference everywhere.
Flax layers live in ``jax_na.flax``.
"""

from jax_na import geometry
from jax_na._ext import available_backends, register_targets as _register_targets
from jax_na.functional import (
    fused_tile_configs,
    na1d,
    na1d_av,
    na1d_qk,
    na2d,
    na2d_av,
    na2d_qk,
    na3d,
    na3d_av,
    na3d_qk,
)

__version__ = "0.1.0"

_register_targets()

__all__ = [
    "available_backends",
    "fused_tile_configs",
    "geometry",
    "na1d",
    "na1d_av",
    "na1d_qk",
    "na2d",
    "na2d_av",
    "na2d_qk",
    "na3d",
    "na3d_av",
    "na3d_qk",
]
