"""Flax linen layers: NeighborhoodAttention1D/2D/3D.

Fields follow ``flax.linen.MultiHeadDotProductAttention`` (num_heads, qkv_features, out_features,
use_bias, dtype, param_dtype, kernel_init, bias_init, dropout_rate, deterministic) plus the window
parameters of ``jax_na.na{1,2,3}d``, ``backend``, the fused forward's ``q_tile_shape`` /
``kv_tile_shape`` and the fused backward's ``backward_q_tile_shape`` / ``backward_kv_tile_shape``
(None: the default; see ``jax_na.fused_tile_configs``) and ``deterministic_backward``
(``na{1,2,3}d``'s: None, the default, is False at 16-bit head dims up to 128 unless ``XLA_FLAGS`` asks for
deterministic ops: the Hopper fused backward then computes dK, dV and dQ in one warp-specialized
kernel, dQ not bitwise reproducible; True: the deterministic kernels; see ``na{1,2,3}d``;
``deterministic`` is dropout's, as in Flax).

Without ``rel_pos_bias`` a layer calls ``na{1,2,3}d`` (the fused kernels where the backend, or the
automatic choice, has them). With ``rel_pos_bias=True`` it runs the unfused ``na*d_qk`` + float32
softmax + ``na*d_av`` ops, which the "gemm", "naive" and "reference" backends implement:
``backend=None`` runs them on "gemm" where it is compiled and takes the call (CUDA, float16/bfloat16,
head dims up to 128), else on the reference, and ``backend="fused"`` is a ``ValueError``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_na import _checks, functional

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood self attention over ``[B, *spatial, C]`` inputs."""

    num_heads: int
    kernel_size: IntOrTuple
    stride: IntOrTuple = 1
    dilation: IntOrTuple = 1
    is_causal: BoolOrTuple = False
    qkv_features: Optional[int] = None
    out_features: Optional[int] = None
    num_kv_heads: Optional[int] = None
    use_bias: bool = True
    rel_pos_bias: bool = False
    dropout_rate: float = 0.0
    deterministic: Optional[bool] = None
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    rpb_init: Callable = nn.initializers.truncated_normal(stddev=0.02)
    scale: Optional[float] = None
    backend: Optional[str] = None
    q_tile_shape: Optional[Sequence[int]] = None
    kv_tile_shape: Optional[Sequence[int]] = None
    deterministic_backward: Optional[bool] = None
    backward_q_tile_shape: Optional[Sequence[int]] = None
    backward_kv_tile_shape: Optional[Sequence[int]] = None

    rank: ClassVar[int] = 0

    @nn.compact
    def __call__(self, x, deterministic: Optional[bool] = None):
        rank = self.rank
        if x.ndim != rank + 2:
            raise ValueError(f"{type(self).__name__} expects x of rank {rank + 2} "
                             f"[B, {', '.join('XYZ'[:rank])}, C], got shape {tuple(x.shape)}")
        features = x.shape[-1]
        qkv_features = self.qkv_features or features
        if qkv_features % self.num_heads:
            raise ValueError(f"qkv_features ({qkv_features}) must be divisible by num_heads "
                             f"({self.num_heads})")
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"num_kv_heads ({kv_heads}) must divide num_heads ({self.num_heads})")
        head_dim = qkv_features // self.num_heads

        dense = functools.partial(nn.DenseGeneral, axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=self.kernel_init, bias_init=self.bias_init,
                                  use_bias=self.use_bias)
        q = dense(features=(self.num_heads, head_dim), name="query")(x)
        k = dense(features=(kv_heads, head_dim), name="key")(x)
        v = dense(features=(kv_heads, head_dim), name="value")(x)

        if self.rel_pos_bias:
            tiles = {n: getattr(self, n) for n in ("q_tile_shape", "kv_tile_shape", "backward_q_tile_shape",
                                                   "backward_kv_tile_shape")}
            if any(t is not None for t in tiles.values()):
                given = ", ".join(n for n, t in tiles.items() if t is not None)
                raise ValueError(f"{given} choose the fused kernels' tiles, which rel_pos_bias=True does not "
                                 "run (it runs the unfused qk/softmax/av ops): leave q_tile_shape, "
                                 "kv_tile_shape, backward_q_tile_shape and backward_kv_tile_shape None, or "
                                 "set rel_pos_bias=False")
            if self.backend in _checks.FUSED_BACKENDS:
                unfused = ", ".join(repr(b) for b in _checks.UNFUSED_BACKENDS)
                raise ValueError("rel_pos_bias=True runs the unfused qk/softmax/av ops, which the fused "
                                 f"kernels do not have: use backend None/'auto', {unfused} with "
                                 f"rel_pos_bias, or rel_pos_bias=False with backend={self.backend!r}")
            stride = self.stride if isinstance(self.stride, (tuple, list)) else (self.stride,) * rank
            if any(s != 1 for s in stride):
                raise ValueError(f"rel_pos_bias requires stride 1 on every axis, got stride={self.stride}")
            ks = self.kernel_size if isinstance(self.kernel_size, (tuple, list)) else (self.kernel_size,) * rank
            if len(ks) != rank:
                raise ValueError(f"kernel_size must be an int or a tuple of {rank}, got {self.kernel_size}")
            rpb = self.param("rpb", self.rpb_init, (self.num_heads, *(2 * int(k) - 1 for k in ks)),
                             self.param_dtype)
            qk = getattr(functional, f"na{rank}d_qk")
            av = getattr(functional, f"na{rank}d_av")
            scores = qk(q, k, self.kernel_size, dilation=self.dilation, is_causal=self.is_causal,
                        rpb=rpb.astype(q.dtype), scale=self.scale, backend=self.backend)
            weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
            y = av(weights, v, self.kernel_size, dilation=self.dilation, is_causal=self.is_causal,
                   backend=self.backend)
        else:
            na = getattr(functional, f"na{rank}d")
            y = na(q, k, v, self.kernel_size, stride=self.stride, dilation=self.dilation,
                   is_causal=self.is_causal, scale=self.scale, backend=self.backend,
                   q_tile_shape=self.q_tile_shape, kv_tile_shape=self.kv_tile_shape,
                   deterministic_backward=self.deterministic_backward,
                   backward_q_tile_shape=self.backward_q_tile_shape,
                   backward_kv_tile_shape=self.backward_kv_tile_shape)

        out = nn.DenseGeneral(features=self.out_features or features, axis=(-2, -1), dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                              bias_init=self.bias_init, use_bias=self.use_bias, name="out")(y)
        if self.dropout_rate > 0.0:
            deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            out = nn.Dropout(rate=self.dropout_rate)(out, deterministic=deterministic)
        return out


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood self attention: ``[B, X, C] -> [B, X, out_features or C]``.

    Example:
      >>> import jax, jax_na.flax
      >>> layer = jax_na.flax.NeighborhoodAttention1D(num_heads=4, kernel_size=7)
      >>> x = jax.random.normal(jax.random.key(0), (2, 64, 32))
      >>> params = layer.init(jax.random.key(1), x)
      >>> layer.apply(params, x).shape
      (2, 64, 32)
    """

    rank: ClassVar[int] = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood self attention: ``[B, X, Y, C] -> [B, X, Y, out_features or C]``.

    Example:
      >>> import jax, jax_na.flax
      >>> layer = jax_na.flax.NeighborhoodAttention2D(num_heads=4, kernel_size=7, rel_pos_bias=True)
      >>> x = jax.random.normal(jax.random.key(0), (2, 14, 14, 32))
      >>> params = layer.init(jax.random.key(1), x)
      >>> layer.apply(params, x).shape
      (2, 14, 14, 32)
    """

    rank: ClassVar[int] = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood self attention: ``[B, X, Y, Z, C] -> [B, X, Y, Z, out_features or C]``.

    Example:
      >>> import jax, jax_na.flax
      >>> layer = jax_na.flax.NeighborhoodAttention3D(num_heads=2, kernel_size=(3, 5, 5), is_causal=(True, False, False))
      >>> x = jax.random.normal(jax.random.key(0), (1, 4, 8, 8, 16))
      >>> params = layer.init(jax.random.key(1), x)
      >>> layer.apply(params, x).shape
      (1, 4, 8, 8, 16)
    """

    rank: ClassVar[int] = 3
