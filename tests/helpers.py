"""Shared test helpers: the edge-case sweep, random inputs, and a float64 dense masked JAX
implementation built from the oracle's mask (used for gradients via jax.grad).

Requires jax with x64 enabled for float64 (tests/conftest.py turns it on).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np

import oracle


@dataclasses.dataclass(frozen=True)
class Case:
    spatial: tuple
    kernel_size: object
    stride: object = 1
    dilation: object = 1
    is_causal: object = False
    B: int = 1
    H: int = 2
    Hkv: int = 2
    D: int = 8
    Dv: int = 8
    Na: int = 0
    scale: float | None = None

    @property
    def rank(self):
        return len(self.spatial)

    @property
    def id(self):
        def f(x):
            return "x".join(str(int(v)) for v in x) if isinstance(x, tuple) else str(int(x))
        s = (f"r{self.rank}_S{f(self.spatial)}_k{f(self.kernel_size)}_s{f(self.stride)}"
             f"_d{f(self.dilation)}_c{f(self.is_causal)}_H{self.H}-{self.Hkv}_D{self.D}-{self.Dv}")
        if self.Na:
            s += f"_Na{self.Na}"
        if self.B != 1:
            s += f"_B{self.B}"
        if self.scale is not None:
            s += f"_sc{self.scale}"
        return s

    def kwargs(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                    is_causal=self.is_causal)


def _causal_combos(rank):
    import itertools
    return [tuple(c) for c in itertools.product((False, True), repeat=rank)]


def edge_cases():
    """The edge-case sweep of SEMANTICS.md / DESIGN.md (small sizes, shared by CPU and GPU tests)."""
    C = []
    # ---- 1-D
    C.append(Case((7,), 3))                                   # worked example
    C.append(Case((10,), 3, dilation=2))                      # worked example
    C.append(Case((8,), 4, stride=2, is_causal=True))         # worked example
    for s in range(1, 6):                                     # prime length, stride 1..k
        C.append(Case((13,), 5, stride=s))
    for s in (1, 2, 4):                                       # even k, causal, stride
        C.append(Case((13,), 4, stride=s, is_causal=True))
    C.append(Case((11,), 11))                                 # k = L (full attention)
    C.append(Case((11,), 10))                                 # k = L - 1
    C.append(Case((11,), 10, is_causal=True))
    C.append(Case((12,), 4, dilation=3))                      # k * d == L
    C.append(Case((13,), 4, dilation=3, is_causal=True))      # L % d != 0, maximal dilation
    C.append(Case((17,), 5, stride=3, dilation=3))            # stride + dilation, L % d != 0
    C.append(Case((9,), 2))                                   # smallest k
    C.append(Case((9,), 2, is_causal=True, stride=2))
    C.append(Case((15,), 5, H=4, Hkv=2, D=8, Dv=12))          # GQA, Dv != D
    C.append(Case((15,), 5, H=3, Hkv=1, D=4, Dv=6, Na=3))     # MQA, additional KV
    C.append(Case((11,), 4, dilation=2, is_causal=True, Na=2, B=2, scale=0.3))
    # ---- 2-D
    for c in _causal_combos(2):                               # every causal combination
        C.append(Case((7, 9), (3, 4), stride=(1, 2), is_causal=c))
        C.append(Case((9, 11), (3, 2), dilation=(3, 5), is_causal=c))  # k*d == L; maximal d, L % d != 0
    C.append(Case((6, 7), (6, 7)))                            # k = L
    C.append(Case((6, 7), (5, 6)))                            # k = L - 1
    C.append(Case((11, 13), (3, 4), stride=(3, 2), dilation=(3, 3), is_causal=(True, False)))
    C.append(Case((8, 9), 3, stride=3, dilation=(2, 3)))      # blocked, dilated
    C.append(Case((7, 7), 3, H=4, Hkv=1, D=6, Dv=10, Na=4, B=2))
    # ---- 3-D
    for c in _causal_combos(3):
        C.append(Case((5, 6, 7), (2, 3, 4), stride=(1, 2, 3), is_causal=c))
    C.append(Case((4, 5, 6), (4, 5, 6)))                      # k = L
    C.append(Case((4, 5, 6), (3, 4, 5), is_causal=(False, True, False)))   # k = L - 1
    C.append(Case((6, 5, 7), (3, 2, 3), stride=(3, 1, 2), dilation=(2, 2, 2)))
    C.append(Case((5, 5, 5), 2, dilation=2, is_causal=True, H=4, Hkv=2, D=4, Dv=8, Na=2))
    return C


def seed_of(case: Case) -> int:
    """A stable per-case seed (Python's str hash is randomized per process)."""
    return zlib.crc32(case.id.encode())


def rand_inputs(case: Case, dtype=np.float64, seed=0):
    """q, k, v, add_k, add_v (NumPy, given dtype) for a case; add_* are None when Na == 0."""
    rng = np.random.default_rng(seed)
    B, S = case.B, case.spatial
    q = rng.standard_normal((B, *S, case.H, case.D))
    k = rng.standard_normal((B, *S, case.Hkv, case.D))
    v = rng.standard_normal((B, *S, case.Hkv, case.Dv))
    ak = av = None
    if case.Na:
        ak = rng.standard_normal((B, case.Na, case.Hkv, case.D))
        av = rng.standard_normal((B, case.Na, case.Hkv, case.Dv))
    cast = lambda x: None if x is None else np.asarray(x, dtype=dtype)
    return tuple(cast(x) for x in (q, k, v, ak, av))


def rand_like(shape, seed, dtype=np.float64):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# ----------------------------------------------------------------------------- dense float64 JAX

def dense_attention(q, k, v, add_k, add_v, m, scale):
    """Dense masked attention (any float dtype, meant for float64). m: [N, N] numpy bool.

    Returns (out [B, *S, H, Dv], lse [B, *S, H]).
    """
    B, *S, H, D = q.shape
    Hkv, Dv = k.shape[-2], v.shape[-1]
    G = H // Hkv
    N = math.prod(S)
    qf = q.reshape(B, N, H, D)
    kf = jnp.repeat(k.reshape(B, N, Hkv, D), G, axis=2)
    vf = jnp.repeat(v.reshape(B, N, Hkv, Dv), G, axis=2)
    s = jnp.einsum("bnhd,bmhd->bhnm", qf, kf, precision="highest") * scale
    s = jnp.where(jnp.asarray(m)[None, None], s, -jnp.inf)
    if add_k is not None:
        ak = jnp.repeat(add_k, G, axis=2)
        avv = jnp.repeat(add_v, G, axis=2)
        sa = jnp.einsum("bnhd,bmhd->bhnm", qf, ak, precision="highest") * scale
        s = jnp.concatenate([s, sa], axis=-1)
        vf = jnp.concatenate([vf, avv], axis=1)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    out = jnp.einsum("bhnm,bmhd->bnhd", p, vf, precision="highest")
    return out.reshape(B, *S, H, Dv), jnp.moveaxis(lse, 1, -1).reshape(B, *S, H)


def dense_reference(case: Case, inputs, cotangents):
    """Float64 forward and VJP of dense masked attention built from the oracle's mask (NumPy,
    analytic softmax-attention gradients; checked against jax.grad and finite differences in
    test_reference.py).

    Returns (out, lse, grads) with grads = [dq, dk, dv(, d_add_k, d_add_v)] as NumPy float64.
    """
    m = oracle.mask(case.spatial, case.kernel_size, case.stride, case.dilation, case.is_causal)
    scale = case.D ** -0.5 if case.scale is None else case.scale
    return dense_numpy(inputs, m, scale, cotangents)


def dense_numpy(inputs, m, scale, cotangents):
    q, k, v, ak, av = (None if x is None else np.asarray(x, np.float64) for x in inputs)
    d_out, d_lse = (np.asarray(c, np.float64) for c in cotangents)
    B, *S, H, D = q.shape
    Hkv, Dv = k.shape[-2], v.shape[-1]
    G = H // Hkv
    N = math.prod(S)
    Na = 0 if ak is None else ak.shape[1]
    qf = q.reshape(B, N, H, D)
    kf = np.repeat(k.reshape(B, N, Hkv, D), G, axis=2)
    vf = np.repeat(v.reshape(B, N, Hkv, Dv), G, axis=2)
    mm = m
    if Na:
        kf = np.concatenate([kf, np.repeat(ak, G, axis=2)], axis=1)
        vf = np.concatenate([vf, np.repeat(av, G, axis=2)], axis=1)
        mm = np.concatenate([m, np.ones((N, Na), bool)], axis=1)
    s = np.einsum("bnhd,bmhd->bhnm", qf, kf) * scale
    s = np.where(mm[None, None], s, -np.inf)
    mx = s.max(-1, keepdims=True)
    e = np.exp(s - mx)
    l = e.sum(-1, keepdims=True)
    p = e / l
    lse = (mx + np.log(l))[..., 0]                       # [B, H, N]
    out = np.einsum("bhnm,bmhd->bnhd", p, vf)
    do = d_out.reshape(B, N, H, Dv)
    dl = np.moveaxis(d_lse.reshape(B, N, H), 1, 2)       # [B, H, N]
    dvf = np.einsum("bhnm,bnhd->bmhd", p, do)
    dp = np.einsum("bnhd,bmhd->bhnm", do, vf)
    delta = np.einsum("bnhd,bnhd->bhn", do, out)
    ds = p * (dp - delta[..., None]) + p * dl[..., None]
    dq = np.einsum("bhnm,bmhd->bnhd", ds, kf) * scale
    dkf = np.einsum("bhnm,bnhd->bmhd", ds, qf) * scale

    def fold(x):  # sum the G query heads of each kv head
        return x.reshape(*x.shape[:-2], Hkv, G, x.shape[-1]).sum(-2)

    grads = [dq.reshape(q.shape), fold(dkf[:, :N]).reshape(k.shape), fold(dvf[:, :N]).reshape(v.shape)]
    if Na:
        grads += [fold(dkf[:, N:]), fold(dvf[:, N:])]
    return out.reshape(B, *S, H, Dv), np.moveaxis(lse, 1, 2).reshape(B, *S, H), grads


def dense_qk(q, k, rpb, tables, scale):
    """Dense float64 unfused scores from the oracle's window tables (jax-differentiable)."""
    tok, valid, bias = tables
    B, *S, H, D = q.shape
    Hkv = k.shape[-2]
    G = H // Hkv
    N = math.prod(S)
    qf = q.reshape(B, N, H, D)
    kf = jnp.repeat(k.reshape(B, N, Hkv, D), G, axis=2)
    kw = kf[:, jnp.asarray(tok)]                              # [B, N, W, H, D]
    s = jnp.einsum("bnhd,bnwhd->bnhw", qf, kw, precision="highest") * scale
    if rpb is not None:
        idx = tuple(jnp.asarray(bias[..., a]) for a in range(bias.shape[-1]))
        rb = rpb[(slice(None), *idx)]                         # [H, N, W]
        s = s + jnp.moveaxis(rb, 0, 1)[None]
    s = jnp.where(jnp.asarray(valid)[None, :, None, :], s, 0.0)   # masked: no contribution
    return s.reshape(B, *S, H, -1)


def dense_av(a, v, tables):
    tok, valid, _ = tables
    B, *S, H, W = a.shape
    Hkv, Dv = v.shape[-2:]
    G = H // Hkv
    N = math.prod(S)
    af = jnp.where(jnp.asarray(valid)[None, :, None, :], a.reshape(B, N, H, W), 0.0)
    vf = jnp.repeat(v.reshape(B, N, Hkv, Dv), G, axis=2)[:, jnp.asarray(tok)]   # [B, N, W, H, Dv]
    return jnp.einsum("bnhw,bnwhd->bnhd", af, vf, precision="highest").reshape(B, *S, H, Dv)


def na_fn(rank):
    import jax_na
    return {1: jax_na.na1d, 2: jax_na.na2d, 3: jax_na.na3d}[rank]


def qk_fn(rank):
    import jax_na
    return {1: jax_na.na1d_qk, 2: jax_na.na2d_qk, 3: jax_na.na3d_qk}[rank]


def av_fn(rank):
    import jax_na
    return {1: jax_na.na1d_av, 2: jax_na.na2d_av, 3: jax_na.na3d_av}[rank]


def tol_for(dtype):
    """SEMANTICS.md bounds (relative Frobenius vs float64); float64 runs get a tight bound."""
    return {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5, jnp.dtype(jnp.float16): 2e-3,
            jnp.dtype(jnp.bfloat16): 1e-2}[jnp.dtype(dtype)]


def pretend_gemm_targets(mp):
    """Pretends the gemm targets were compiled (``mp``: a pytest MonkeyPatch; the caller undoes it and
    clears jax's caches): backend="gemm" passes the checks and, lowered for the CPU, runs its
    primitives on the reference (the CPU lowering never calls the targets)."""
    from jax_na import _ext
    has_target = _ext.has_target
    mp.setattr(_ext, "has_cuda_kernels", lambda: True)
    mp.setattr(_ext, "has_target", lambda name: name.startswith("jax_na_gemm_") or has_target(name))
    jax.clear_caches()


# ----------------------------------------------------------------------------- CUDA lowering

def cuda_hlo(f, *args):
    """The StableHLO text of jit(f) lowered for CUDA (no GPU needed: lowering names the targets)."""
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def custom_calls(text, target):
    """The lines of ``text`` that call custom-call ``target``."""
    return [line for line in text.splitlines() if f"stablehlo.custom_call @{target}(" in line]


def int_attr(line, name):
    """The i64 attribute ``name`` of a custom-call line."""
    m = re.search(rf"\b{name} = (-?\d+) : i64", line)
    assert m, (name, line)
    return int(m.group(1))


def workspace_elems(line):
    """Elements of the last (workspace) result of a custom-call line."""
    shapes = re.findall(r"tensor<([0-9x]+)x(?:f32|bf16|f16)>", line.rsplit("->", 1)[1])
    return math.prod(int(d) for d in shapes[-1].split("x"))


def expect_error(fn, names, exc=ValueError, jit=True):
    """fn() raises ``exc`` naming every one of ``names``, eagerly and under jax.jit tracing, with the
    same message both ways; returns the message."""
    import pytest

    names = [names] if isinstance(names, str) else names
    msgs = []
    for mode in ("eager", "jit") if jit else ("eager",):
        with pytest.raises(exc) as ei:
            fn() if mode == "eager" else jax.jit(lambda: fn())()
        msg = str(ei.value)
        for n in names:
            assert n in msg, f"[{mode}] message does not name {n!r}: {msg}"
        msgs.append(msg)
    assert len(set(msgs)) == 1, msgs
    return msgs[0]


def check_tile_listing(configs, rank):
    """A list of (q_tile_shape, kv_tile_shape): no duplicate, tuples of ``rank`` power-of-two ints."""
    assert len(set(configs)) == len(configs), configs
    for q, kv in configs:
        assert isinstance(q, tuple) and isinstance(kv, tuple)
        assert len(q) == len(kv) == rank, (q, kv)
        for e in q + kv:
            assert type(e) is int and e > 0 and e & (e - 1) == 0, (q, kv)
