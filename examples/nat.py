"""NAT and DiNAT image classifiers in Flax linen, built on ``jax_na.flax.NeighborhoodAttention2D``.

NAT (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023) and DiNAT (Hassani & Shi,
"Dilated Neighborhood Attention Transformer", 2022): a convolutional tokenizer (two 3x3 stride-2
convolutions: 1/4 resolution), four levels of transformer blocks with 7x7 neighborhood attention,
3x3 stride-2 convolutional downsamplers between levels, global average pooling and a linear head.
DiNAT is NAT with a dilation per block, alternating local (dilation 1) and sparse global blocks, the
dilation chosen so that kernel * dilation covers the level's feature map (at 224x224: 56, 28, 14, 7).

    model = dinat_tiny(num_classes=1000)                   # the paper's configurations
    model = NAT(embed_dim=32, depths=(2, 2), num_heads=(2, 4), kernel_size=3,
                dilations=((1, 2), (1, 1)), num_classes=10)  # any other

Options beyond the papers: ``attention="cudnn"``/``"xla"`` replaces neighborhood attention by global
self attention over each level's tokens (same parameters; the yardstick of benchmarks/models.py),
``rel_pos_bias`` (on in the papers; it runs the unfused qk/softmax/av path of the Flax layer),
``backend`` (any ``jax_na`` backend name or None for the automatic choice), ``dtype`` (compute dtype,
e.g. bfloat16; parameters stay float32), ``scan_blocks`` (blocks of a level with a repeating dilation
pattern run under ``nn.scan``: one compiled body per level, much faster compilation of the deep models).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_na.flax import NeighborhoodAttention2D


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample (needs the 'dropout' rng in training)."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class GlobalSelfAttention(nn.Module):
    """Multi-head self attention over all tokens of ``[B, X, Y, C]`` (the dense yardstick).

    ``implementation="cudnn"`` runs XLA's attention on levels with an odd number of tokens (the 7x7
    level at 224x224: 49 tokens, a negligible share of the FLOPs): cuDNN's backward refuses them."""

    num_heads: int
    implementation: Optional[str] = None  # "cudnn", "xla" or None (jax picks)
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        dense = functools.partial(nn.DenseGeneral, axis=-1, dtype=self.dtype)
        hd = c // self.num_heads
        q, k, v = (dense(features=(self.num_heads, hd), name=n)(x).reshape(b, h * w, self.num_heads, hd)
                   for n in ("query", "key", "value"))
        impl = "xla" if self.implementation == "cudnn" and (h * w) % 2 else self.implementation
        y = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        y = y.reshape(b, h, w, self.num_heads, hd)
        return nn.DenseGeneral(features=c, axis=(-2, -1), dtype=self.dtype, name="out")(y)


class Mlp(nn.Module):
    hidden: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class NATBlock(nn.Module):
    """Pre-norm transformer block: x + NA(LN(x)), x + MLP(LN(x)) (with stochastic depth, layer scale)."""

    num_heads: int
    kernel_size: int = 7
    dilation: int = 1
    mlp_ratio: float = 3.0
    drop_path: float = 0.0
    layer_scale: Optional[float] = None
    rel_pos_bias: bool = True
    attention: str = "na"  # "na", or "cudnn"/"xla" for global self attention
    backend: Optional[str] = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        c = x.shape[-1]
        h = nn.LayerNorm(dtype=self.dtype)(x)
        if self.attention == "na":
            h = NeighborhoodAttention2D(num_heads=self.num_heads, kernel_size=self.kernel_size,
                                        dilation=self.dilation, rel_pos_bias=self.rel_pos_bias,
                                        backend=self.backend, dtype=self.dtype, name="attn")(h)
        else:
            h = GlobalSelfAttention(self.num_heads, implementation=self.attention, dtype=self.dtype,
                                    name="attn")(h)
        if self.layer_scale is not None:
            h = h * self.param("gamma1", nn.initializers.constant(self.layer_scale), (c,)).astype(h.dtype)
        x = x + DropPath(self.drop_path)(h, deterministic)
        h = Mlp(int(c * self.mlp_ratio), dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(x))
        if self.layer_scale is not None:
            h = h * self.param("gamma2", nn.initializers.constant(self.layer_scale), (c,)).astype(h.dtype)
        return x + DropPath(self.drop_path)(h, deterministic)


class _ScannedBlocks(nn.Module):
    """One period of a level's dilation pattern, as the body of nn.scan."""

    block_kwargs: tuple  # one dict (as a tuple of items) per block of the period

    @nn.compact
    def __call__(self, x, deterministic):
        for i, kw in enumerate(self.block_kwargs):
            x = NATBlock(**dict(kw), name=f"block{i}")(x, deterministic)
        return x, None


def _period(dilations: Sequence[int]) -> int:
    """Smallest p with dilations[i] == dilations[i % p] for all i."""
    n = len(dilations)
    for p in range(1, n + 1):
        if all(dilations[i] == dilations[i % p] for i in range(n)):
            return p
    return n


class NAT(nn.Module):
    """NAT / DiNAT classifier: ``[B, H, W, C_in] -> [B, num_classes]`` (float32 logits)."""

    embed_dim: int = 64
    depths: Sequence[int] = (3, 4, 6, 5)
    num_heads: Sequence[int] = (2, 4, 8, 16)
    kernel_size: int = 7
    dilations: Optional[Sequence[Sequence[int]]] = None  # per level, per block; None: all 1 (NAT)
    mlp_ratio: float = 3.0
    drop_path_rate: float = 0.2
    layer_scale: Optional[float] = None
    num_classes: int = 1000
    patch_stride: int = 4  # the tokenizer's downsampling: 4 (two stride-2 convs) as in NAT, or 2
    rel_pos_bias: bool = True
    attention: str = "na"
    backend: Optional[str] = None
    dtype: Any = None
    scan_blocks: bool = False

    def level_dilations(self, level: int) -> list[int]:
        if self.dilations is None:
            return [1] * self.depths[level]
        d = list(self.dilations[level])
        if len(d) != self.depths[level]:
            raise ValueError(f"level {level}: {len(d)} dilations for depth {self.depths[level]}")
        return d

    @nn.compact
    def __call__(self, x, train: bool = False):
        deterministic = not train
        x = x.astype(self.dtype or x.dtype)
        n_convs = {2: 1, 4: 2}[self.patch_stride]
        for i in range(n_convs):  # tokenizer
            x = nn.Conv(self.embed_dim // (2 ** (n_convs - 1 - i)), (3, 3), strides=(2, 2), padding=1,
                        dtype=self.dtype, name=f"tokenizer{i}")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="tokenizer_norm")(x)
        total = sum(self.depths)
        dpr = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        done = 0
        for level, depth in enumerate(self.depths):
            dil = self.level_dilations(level)
            common = dict(num_heads=self.num_heads[level], kernel_size=self.kernel_size,
                          mlp_ratio=self.mlp_ratio, layer_scale=self.layer_scale,
                          rel_pos_bias=self.rel_pos_bias, attention=self.attention, backend=self.backend,
                          dtype=self.dtype)
            p = _period(dil)
            if self.scan_blocks and depth // p >= 2:
                reps = depth // p
                # One drop-path rate per period position (the mean over the scanned repetitions).
                kws = tuple(tuple(sorted(dict(common, dilation=dil[j],
                                              drop_path=sum(dpr[done + j + r * p] for r in range(reps)) / reps)
                                         .items())) for j in range(p))
                scan = nn.scan(_ScannedBlocks, variable_axes={"params": 0}, split_rngs={"params": True,
                               "dropout": True}, in_axes=nn.broadcast, length=reps)
                x, _ = scan(kws, name=f"level{level}_scan")(x, deterministic)
                start = reps * p
            else:
                start = 0
            for i in range(start, depth):
                x = NATBlock(dilation=dil[i], drop_path=dpr[done + i], **common,
                             name=f"level{level}_block{i}")(x, deterministic)
            done += depth
            if level < len(self.depths) - 1:  # downsampler: 3x3 stride-2 conv (2x channels) + LN
                x = nn.Conv(2 * x.shape[-1], (3, 3), strides=(2, 2), padding=1, use_bias=False,
                            dtype=self.dtype, name=f"downsample{level}")(x)
                x = nn.LayerNorm(dtype=self.dtype, name=f"downsample{level}_norm")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="norm")(x).mean(axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


# ----------------------------------------------------------------------------- the papers' configurations

NAT_CONFIGS = {
    "mini": dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2),
    "tiny": dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2),
    "small": dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.0,
                  drop_path_rate=0.3, layer_scale=1e-5),
    "base": dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.0,
                 drop_path_rate=0.5, layer_scale=1e-5),
}

# DiNAT's ImageNet dilations (224x224 input: levels of 56, 28, 14, 7 tokens a side, kernel 7).
DINAT_DILATIONS = {
    "mini": ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5),
    "deep": ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1,) * 5),
}


def nat(size: str, **overrides) -> NAT:
    """NAT-Mini/Tiny/Small/Base."""
    return NAT(**{**NAT_CONFIGS[size], **overrides})


def dinat(size: str, **overrides) -> NAT:
    """DiNAT-Mini/Tiny/Small/Base: NAT with the paper's per-block dilations."""
    dil = DINAT_DILATIONS["mini" if size == "mini" else "deep"]
    return NAT(**{**NAT_CONFIGS[size], "dilations": dil, **overrides})


nat_mini, nat_tiny, nat_small, nat_base = (functools.partial(nat, s) for s in ("mini", "tiny", "small", "base"))
dinat_mini, dinat_tiny, dinat_small, dinat_base = (functools.partial(dinat, s)
                                                   for s in ("mini", "tiny", "small", "base"))


def tiny_model(kind: str = "dinat", **overrides) -> NAT:
    """A small NAT/DiNAT for 32x32 inputs (the digits demo): tokenizer /4, levels of 8 and 4 tokens a
    side, kernel 3; DiNAT dilates every second block of the first level by 2 (3 * 2 <= 8)."""
    kw = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), kernel_size=3, patch_stride=4, mlp_ratio=2.0,
              drop_path_rate=0.0, num_classes=10)
    if kind == "dinat":
        kw["dilations"] = ((1, 2), (1, 1))
    return NAT(**{**kw, **overrides})


MODELS = {
    **{f"nat_{s}": functools.partial(nat, s) for s in NAT_CONFIGS},
    **{f"dinat_{s}": functools.partial(dinat, s) for s in NAT_CONFIGS},
    "nat_tiny32": functools.partial(tiny_model, "nat"),
    "dinat_tiny32": functools.partial(tiny_model, "dinat"),
}
