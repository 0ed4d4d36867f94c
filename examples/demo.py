"""jax_na demo: a tiny neighborhood-attention classifier trained on scikit-learn's digits, then a
backend comparison on one 2-D problem.

Usage: python demo.py [--steps 300] [--backend auto|naive|reference]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jax_na
from jax_na.flax import NeighborhoodAttention2D


class TinyDiNAT(nn.Module):
    """Conv stem -> NA blocks (dilation 1, then 2, as in DiNAT) -> pooled classifier."""

    dim: int = 32
    heads: int = 4
    backend: str | None = None

    @nn.compact
    def __call__(self, x):  # x: [B, 8, 8, 1]
        x = nn.Conv(self.dim, (3, 3))(x)
        for dilation in (1, 2):
            h = nn.LayerNorm()(x)
            x = x + NeighborhoodAttention2D(num_heads=self.heads, kernel_size=3, dilation=dilation,
                                            rel_pos_bias=dilation == 1, backend=self.backend)(h)
            h = nn.LayerNorm()(x)
            x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(2 * self.dim)(h)))
        return nn.Dense(10)(nn.LayerNorm()(x).mean(axis=(1, 2)))


def load_digits():
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = d.images.astype(np.float32)[..., None] / 16.0  # [1797, 8, 8, 1]
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    split = int(0.8 * len(x))
    return (x[idx[:split]], d.target[idx[:split]]), (x[idx[split:]], d.target[idx[split:]])


def train(steps: int, backend):
    (xtr, ytr), (xte, yte) = load_digits()
    model = TinyDiNAT(backend=backend)
    params = model.init(jax.random.key(0), xtr[:2])
    tx = optax.adamw(2e-3, weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss_fn(p):
            logits = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    accuracy = jax.jit(lambda p, x, y: (model.apply(p, x).argmax(-1) == y).mean())
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for i in range(steps):
        b = rng.integers(0, len(xtr), 64)
        params, opt, loss = step(params, opt, xtr[b], ytr[b])
        if i % 100 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.3f}  ({time.perf_counter() - t0:.1f} s)")
    acc = float(accuracy(params, xte, yte))
    print(f"test accuracy after {steps} steps: {acc:.3f}")
    return acc


def compare_backends():
    shape, ks = (1, 64, 64, 4, 64), 13
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
    ref = jax_na.na2d(q, k, v, ks, backend="reference")
    print(f"\nna2d {shape} kernel {ks}, float32, on {jax.devices()[0].platform}:")
    print(f"{'backend':<10} {'median ms':>10} {'rel err vs reference':>22}")
    for backend in jax_na.available_backends():
        f = jax.jit(lambda q, k, v: jax_na.na2d(q, k, v, ks, backend=backend))
        out = f(q, k, v).block_until_ready()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            f(q, k, v).block_until_ready()
            times.append(time.perf_counter() - t)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        print(f"{backend:<10} {1e3 * float(np.median(times)):>10.2f} {err:>22.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--backend", default=None)
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()}; jax_na backends here: {jax_na.available_backends()}")
    train(args.steps, args.backend)
    compare_backends()


if __name__ == "__main__":
    main()
