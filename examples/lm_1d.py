"""A 1-D long-sequence example: a character-level language model built from causal 1-D neighborhood
attention blocks (each token attends to itself and the ``window - 1`` tokens before it: sliding-window
causal attention, linear in the sequence length).

It trains on the Zen of Python (shipped with every Python: ``import this``), checks that causal NA
with a window as long as the sequence equals dense causal self attention, and samples some text.

    python lm_1d.py                         # ~40 s on a 2-core CPU
    python lm_1d.py --seq-len 4096 --window 256 --steps 300 --bf16 --backend naive   # on a GPU
"""

from __future__ import annotations

import argparse
import codecs
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jax_na
from jax_na.flax import NeighborhoodAttention1D


class CausalNABlock(nn.Module):
    """Pre-norm block: x + causal NA1D(LN(x)), x + MLP(LN(x))."""

    num_heads: int
    window: int
    mlp_ratio: float = 4.0
    backend: Optional[str] = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = NeighborhoodAttention1D(num_heads=self.num_heads, kernel_size=self.window, is_causal=True,
                                    backend=self.backend, dtype=self.dtype, name="attn")(
            nn.LayerNorm(dtype=self.dtype)(x))
        x = x + h
        h = nn.Dense(int(c * self.mlp_ratio), dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(x))
        return x + nn.Dense(c, dtype=self.dtype)(nn.gelu(h))


class NALanguageModel(nn.Module):
    """Tokens [B, L] -> logits [B, L, vocab] (float32)."""

    vocab: int
    dim: int = 128
    depth: int = 2
    num_heads: int = 4
    window: int = 64
    max_len: int = 4096
    backend: Optional[str] = None
    dtype: Any = None

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.dim, dtype=self.dtype)(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.dim))
        x = x + pos[: tokens.shape[1]].astype(x.dtype)
        for i in range(self.depth):
            x = CausalNABlock(self.num_heads, self.window, backend=self.backend, dtype=self.dtype,
                              name=f"block{i}")(x)
        return nn.Dense(self.vocab, dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(x)).astype(jnp.float32)


def make_train_step(model, tx):
    def step(params, opt_state, tokens):
        def loss_fn(p):
            logits = model.apply(p, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def corpus() -> str:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this

    return codecs.decode(this.s, "rot13")


def check_against_dense(backend=None, length: int = 64) -> float:
    """Causal 1-D NA with window == length is dense causal attention: max abs difference."""
    q, k, v = (jax.random.normal(kk, (2, length, 4, 32), jnp.float32)
               for kk in jax.random.split(jax.random.key(0), 3))
    na = jax_na.na1d(q, k, v, kernel_size=length, is_causal=True, backend=backend)
    dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return float(jnp.abs(na - dense).max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--sample", type=int, default=120, help="characters to generate")
    a = ap.parse_args(argv)

    print(f"causal NA (window = length) vs dense causal attention: max |diff| "
          f"{check_against_dense(a.backend):.2e}")
    text = corpus()
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], np.int32)
    data = np.concatenate([ids] * (1 + (a.seq_len + 1) * 4 // len(ids)))  # long enough for any window
    model = NALanguageModel(vocab=len(chars), dim=a.dim, depth=a.depth, window=a.window,
                            max_len=a.seq_len, backend=a.backend, dtype=jnp.bfloat16 if a.bf16 else None)
    params = model.init(jax.random.key(0), jnp.zeros((1, a.seq_len), jnp.int32))
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, a.lr, 20, a.steps), weight_decay=0.01)
    opt_state = tx.init(params)
    step = make_train_step(model, tx)
    rng = np.random.default_rng(0)
    print(f"char LM on the Zen of Python ({len(text)} chars, vocab {len(chars)}): seq {a.seq_len}, "
          f"causal window {a.window}, {a.depth} blocks of dim {a.dim}")
    t0 = time.perf_counter()
    for i in range(a.steps):
        starts = rng.integers(0, len(data) - a.seq_len - 1, a.batch)
        batch = np.stack([data[s:s + a.seq_len + 1] for s in starts])
        params, opt_state, loss = step(params, opt_state, batch)
        if i % 100 == 0 or i == a.steps - 1:
            print(f"step {i:4d}  loss {float(loss):.3f} nats/char ({float(loss) / np.log(2):.2f} bits)  "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)

    # Greedy sampling with a fixed-length buffer: causality makes the padding after t irrelevant.
    logits_at = jax.jit(lambda p, buf, t: model.apply(p, buf[None])[0, t])
    prompt = "Beautiful is"
    buf = np.zeros(a.seq_len, np.int32)
    n = len(prompt)
    buf[:n] = [chars.index(c) for c in prompt]
    out = prompt
    for _ in range(a.sample):
        if n >= a.seq_len:  # slide the buffer
            buf[:-1] = buf[1:]
            n -= 1
        nxt = int(jnp.argmax(logits_at(params, jnp.asarray(buf), n - 1)))
        buf[n] = nxt
        n += 1
        out += chars[nxt]
    print("sample:", out.replace("\n", " / "))
    return float(loss)


if __name__ == "__main__":
    main()
