"""Large problems on the reference backend (CPU): memory must stay linear in the tokens (tiles against
the windows' bounding boxes, never an N x N mask). Spot values against the oracle."""

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_na
import oracle

SPOTS_2D = [(0, 0), (127, 127), (0, 127), (64, 3), (15, 100), (100, 64)]
SPOTS_3D = [(0, 0, 0), (15, 31, 31), (8, 16, 0), (3, 30, 12), (11, 5, 27)]


def _run(fn, shape, kernel_size, spots, seed, **kw):
    B, *S, H, D = shape
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
    t0 = time.time()
    out, lse = fn(q, k, v, kernel_size, return_lse=True, backend="reference", **kw)
    out = np.asarray(out)
    lse = np.asarray(lse)
    elapsed = time.time() - t0
    assert out.shape == tuple(shape) and np.isfinite(out).all() and np.isfinite(lse).all()
    ref, ref_lse = oracle.attention(np.asarray(q), np.asarray(k), np.asarray(v), kernel_size,
                                    queries=spots, **kw)
    got = np.stack([out[(0, *s)] for s in spots])[None]
    got_lse = np.stack([lse[(0, *s)] for s in spots])[None]
    oracle.assert_close(got, ref, 1e-5, "spot outputs")
    oracle.assert_close(got_lse, ref_lse, 1e-5, "spot lse")
    return elapsed


def _peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def test_large_2d_k31():
    _run(jax_na.na2d, (1, 128, 128, 4, 64), 31, SPOTS_2D, seed=0)
    # a dense N x N fp32 score matrix per head would be 4 * 16384^2 * 4 B = 4 GiB
    assert _peak_rss_gib() < 3.5, _peak_rss_gib()


def test_large_3d_k7x13x13():
    _run(jax_na.na3d, (1, 16, 32, 32, 4, 64), (7, 13, 13), SPOTS_3D, seed=1, is_causal=(True, False, False))
    assert _peak_rss_gib() < 3.5, _peak_rss_gib()


def test_large_2d_backward():
    """Backward on a large problem: finite grads, spot-checked dq rows against the dense oracle rows."""
    shape = (1, 96, 96, 2, 32)
    ks = jax.random.split(jax.random.key(3), 4)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32) for kk in ks[:3])
    ct = jax.random.normal(ks[3], shape, jnp.float32)
    f = lambda q, k, v: jnp.sum(jax_na.na2d(q, k, v, 21, dilation=(1, 2), backend="reference") * ct)
    dq, dk, dv = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    for g in (dq, dk, dv):
        assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0
    # dq of one query only depends on that query's window: check a few rows by finite differences of
    # the oracle's spot evaluation in float64
    qn, kn, vn, ctn = (np.asarray(x, np.float64) for x in (q, k, v, ct))
    for spot in [(0, 0), (50, 77), (95, 94)]:
        def loss(qrow):
            q2 = qn.copy()
            q2[(0, *spot)] = qrow
            o, _ = oracle.attention(q2, kn, vn, 21, dilation=(1, 2), queries=[spot])
            return float(np.sum(o[0, 0] * ctn[(0, *spot)]))
        base = qn[(0, *spot)]
        fd = np.zeros_like(base)
        eps = 1e-6
        for h in range(base.shape[0]):
            for d in range(0, base.shape[1], 7):
                e = np.zeros_like(base)
                e[h, d] = eps
                fd[h, d] = (loss(base + e) - loss(base - e)) / (2 * eps)
        got = np.asarray(dq[(0, *spot)], np.float64)
        sel = (slice(None), slice(0, None, 7))
        oracle.assert_close(got[sel], fd[sel], 1e-4, f"dq at {spot}")
    assert _peak_rss_gib() < 3.5, _peak_rss_gib()
