"""Float64 NumPy brute-force evaluation of SEMANTICS.md, written from the document only.

Nothing here imports jax_na: this is the independent oracle every backend is compared with.

Conventions (SEMANTICS.md):
- q ``[B, *S, H, D]``, k ``[B, *S, Hkv, D]``, v ``[B, *S, Hkv, Dv]``; query head h reads kv head
  ``h // (H // Hkv)``.
- Per axis: dilation groups (``g = i % d``, ``p = i // d``, ``Lg = L // d + 1 - ((g + (d - L % d)) // d)``),
  window start/end from the leader formulas; the mask is the AND over axes.
- Additional keys/values join every query's softmax. LSE is the natural log of the sum of exp of the
  scaled scores.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def _tup(x, rank):
    if isinstance(x, (tuple, list)):
        assert len(x) == rank
        return tuple(x)
    return (x,) * rank


# ----------------------------------------------------------------------------- one axis

def group_len(L: int, d: int, g: int) -> int:
    """Lg = L // d + 1 - ((g + (d - L % d)) // d)."""
    return L // d + 1 - ((g + (d - L % d)) // d)


def window_positions(q: int, Lg: int, k: int, s: int, causal: bool):
    """(start, end) in group positions: allowed(j) = start <= j < end."""
    wl = k // 2
    wr = k // 2 + (k % 2) - 1
    if not causal:
        leader = min((q // s) * s + s // 2, Lg - 1)
        start = max(leader - wl, 0) + (1 if leader + wr >= Lg else 0) * (Lg - wr - leader - 1)
        end = start + k
    else:
        leader = min((q // s) * s + s - 1, Lg - 1)
        start = max(leader - wl - wr, 0)
        end = min(q + 1, Lg)
    return start, end


def axis_keys(L: int, k: int, s: int = 1, d: int = 1, causal: bool = False):
    """Per query index i of one axis: the sorted list of key indices (global along the axis)."""
    out = []
    for i in range(L):
        g, p = i % d, i // d
        Lg = group_len(L, d, g)
        start, end = window_positions(p, Lg, k, s, causal)
        out.append([g + d * j for j in range(start, end)])
    return out


def axis_window(L: int, k: int, d: int = 1, causal: bool = False):
    """Unfused window tables of one axis (stride 1).

    Returns ``(tok [L, k], valid [L, k], bias [L, k])``: for query i and window entry w,
    the key token index (clipped into range when invalid), whether the entry is allowed, and the
    rpb index ``j - p + k - 1`` (positions inside the dilation group).
    """
    tok = np.zeros((L, k), np.int64)
    valid = np.zeros((L, k), bool)
    bias = np.zeros((L, k), np.int64)
    for i in range(L):
        g, p = i % d, i // d
        Lg = group_len(L, d, g)
        start, end = window_positions(p, Lg, k, 1, causal)
        for w in range(k):
            j = start + w
            valid[i, w] = start <= j < end
            tok[i, w] = g + d * min(j, Lg - 1)  # always in range; clipped only if invalid
            bias[i, w] = j - p + k - 1
    return tok, valid, bias


def axis_mask(L: int, k: int, s: int = 1, d: int = 1, causal: bool = False) -> np.ndarray:
    m = np.zeros((L, L), bool)
    for i, keys in enumerate(axis_keys(L, k, s, d, causal)):
        m[i, keys] = True
    return m


# ----------------------------------------------------------------------------- full mask

def mask(spatial, kernel_size, stride=1, dilation=1, is_causal=False) -> np.ndarray:
    """Dense ``[N, N]`` boolean mask over flattened (row-major) tokens: AND over axes."""
    r = len(spatial)
    ks, ss, ds, cs = (_tup(x, r) for x in (kernel_size, stride, dilation, is_causal))
    m = np.ones((1, 1), bool)
    for L, k, s, d, c in zip(spatial, ks, ss, ds, cs):
        m = np.kron(m, axis_mask(L, k, s, d, c)).astype(bool)
    return m


def query_keys(qidx, spatial, kernel_size, stride=1, dilation=1, is_causal=False):
    """Flat key indices of one query (multi-index ``qidx``), for spot checks on big problems."""
    r = len(spatial)
    ks, ss, ds, cs = (_tup(x, r) for x in (kernel_size, stride, dilation, is_causal))
    per_axis = []
    for i, L, k, s, d, c in zip(qidx, spatial, ks, ss, ds, cs):
        g, p = i % d, i // d
        start, end = window_positions(p, group_len(L, d, g), k, s, c)
        per_axis.append([g + d * j for j in range(start, end)])
    return [int(np.ravel_multi_index(t, spatial)) for t in itertools.product(*per_axis)]


# ----------------------------------------------------------------------------- attention

def attention(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
              add_k=None, add_v=None, queries=None):
    """Brute-force neighborhood attention in float64.

    Returns ``(out [B, *S, H, Dv], lse [B, *S, H])``; with ``queries`` (a list of multi-indices)
    returns ``(out [B, nq, H, Dv], lse [B, nq, H])`` for those queries only.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, *spatial, H, D = q.shape
    Hkv, Dv = k.shape[-2], v.shape[-1]
    G = H // Hkv
    N = math.prod(spatial)
    scale = D ** -0.5 if scale is None else scale
    qf = q.reshape(B, N, H, D)
    kf = k.reshape(B, N, Hkv, D)
    vf = v.reshape(B, N, Hkv, Dv)
    if add_k is not None:
        add_k = np.asarray(add_k, np.float64)
        add_v = np.asarray(add_v, np.float64)
    if queries is None:
        m = mask(spatial, kernel_size, stride, dilation, is_causal)
        rows = [(n, np.nonzero(m[n])[0]) for n in range(N)]
    else:
        rows = [(int(np.ravel_multi_index(t, spatial)),
                 np.asarray(query_keys(t, spatial, kernel_size, stride, dilation, is_causal)))
                for t in queries]
    out = np.zeros((B, len(rows), H, Dv))
    lse = np.zeros((B, len(rows), H))
    for r_i, (n, keys) in enumerate(rows):
        for h in range(H):
            hk = h // G
            kk = kf[:, keys, hk]            # [B, nk, D]
            vv = vf[:, keys, hk]
            if add_k is not None:
                kk = np.concatenate([kk, add_k[:, :, hk]], axis=1)
                vv = np.concatenate([vv, add_v[:, :, hk]], axis=1)
            s = scale * np.einsum("bd,bkd->bk", qf[:, n, h], kk)
            mx = s.max(axis=1, keepdims=True)
            p = np.exp(s - mx)
            l = p.sum(axis=1, keepdims=True)
            out[:, r_i, h] = np.einsum("bk,bkd->bd", p / l, vv)
            lse[:, r_i, h] = (mx + np.log(l))[:, 0]
    if queries is None:
        return out.reshape(B, *spatial, H, Dv), lse.reshape(B, *spatial, H)
    return out, lse


def window_tables(spatial, kernel_size, dilation=1, is_causal=False):
    """Unfused tables over flattened tokens and row-major window entries.

    Returns ``(tok [N, W] flat key token, valid [N, W], bias [N, W, r] rpb index per axis)``.
    """
    r = len(spatial)
    ks, ds, cs = (_tup(x, r) for x in (kernel_size, dilation, is_causal))
    axes = [axis_window(L, k, d, c) for L, k, d, c in zip(spatial, ks, ds, cs)]
    N, W = math.prod(spatial), math.prod(ks)
    tok = np.zeros((N, W), np.int64)
    valid = np.zeros((N, W), bool)
    bias = np.zeros((N, W, r), np.int64)
    for n, qi in enumerate(itertools.product(*(range(L) for L in spatial))):
        for w, wi in enumerate(itertools.product(*(range(k) for k in ks))):
            tk = tuple(axes[a][0][qi[a], wi[a]] for a in range(r))
            tok[n, w] = np.ravel_multi_index(tk, spatial)
            valid[n, w] = all(axes[a][1][qi[a], wi[a]] for a in range(r))
            bias[n, w] = [axes[a][2][qi[a], wi[a]] for a in range(r)]
    return tok, valid, bias


def qk(q, k, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None):
    """Unfused scores ``[B, *S, H, W]`` in float64 (``-inf`` at masked entries)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, *spatial, H, D = q.shape
    Hkv = k.shape[-2]
    G = H // Hkv
    N = math.prod(spatial)
    scale = D ** -0.5 if scale is None else scale
    tok, valid, bias = window_tables(spatial, kernel_size, dilation, is_causal)
    W = tok.shape[1]
    qf, kf = q.reshape(B, N, H, D), k.reshape(B, N, Hkv, D)
    out = np.empty((B, N, H, W))
    for h in range(H):
        kk = kf[:, :, h // G][:, tok]                       # [B, N, W, D]
        s = scale * np.einsum("bnd,bnwd->bnw", qf[:, :, h], kk)
        if rpb is not None:
            rb = np.asarray(rpb, np.float64)[h]
            s = s + rb[tuple(bias[..., a] for a in range(bias.shape[-1]))][None]
        out[:, :, h] = np.where(valid[None], s, -np.inf)
    return out.reshape(B, *spatial, H, W)


def av(weights, v, kernel_size, dilation=1, is_causal=False):
    """Unfused ``out = sum over valid window entries of weights * v`` in float64."""
    a, v = np.asarray(weights, np.float64), np.asarray(v, np.float64)
    B, *spatial, H, W = a.shape
    Hkv, Dv = v.shape[-2:]
    G = H // Hkv
    N = math.prod(spatial)
    tok, valid, _ = window_tables(spatial, kernel_size, dilation, is_causal)
    af, vf = a.reshape(B, N, H, W), v.reshape(B, N, Hkv, Dv)
    out = np.empty((B, N, H, Dv))
    for h in range(H):
        ah = np.where(valid[None], af[:, :, h], 0.0)
        out[:, :, h] = np.einsum("bnw,bnwd->bnd", ah, vf[:, :, h // G][:, tok])
    return out.reshape(B, *spatial, H, Dv)


# ----------------------------------------------------------------------------- errors

def rel_err(x, ref) -> float:
    """Relative Frobenius error ||x - ref|| / ||ref||; asserts x is finite (NaN never passes)."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert np.all(np.isfinite(x)), f"non-finite values: {np.sum(~np.isfinite(x))} of {x.size}"
    assert np.all(np.isfinite(ref)), "the reference itself is not finite"
    den = np.linalg.norm(ref.ravel())
    num = np.linalg.norm((x - ref).ravel())
    if den == 0:
        return float(num)
    return float(num / den)


def assert_close(x, ref, tol, what=""):
    err = rel_err(x, ref)
    assert err <= tol, f"{what}: relative Frobenius error {err:.3e} > {tol:.1e}"
    return err
