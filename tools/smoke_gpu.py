"""Quick end-to-end check on a GPU: naive vs float64 reference through the public API (fwd + grads)."""
import jax
import jax.numpy as jnp
import numpy as np

import jax_na

jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
worst = 0.0
for dt, tol in ((jnp.float32, 1e-5), (jnp.float16, 2e-3), (jnp.bfloat16, 1e-2)):
    for S, ks, st, dl, ca in (((33, 20), (5, 4), (2, 1), (3, 2), (True, False)),
                              ((7, 9, 11), 3, 1, (1, 2, 3), (False, True, True)),
                              ((100,), 9, 3, 4, False)):
        B, H, Hkv, D = 2, 4, 2, 32
        q, k, v = (jnp.asarray(rng.standard_normal((B, *S, h, D)), dt) for h in (H, Hkv, Hkv))
        do = jnp.asarray(rng.standard_normal((B, *S, H, D)), dt)
        na = getattr(jax_na, f"na{len(S)}d")
        def run(q, k, v, do, backend):
            f = lambda q, k, v: na(q, k, v, ks, stride=st, dilation=dl, is_causal=ca, backend=backend)
            out, vjp = jax.vjp(f, q, k, v)
            return (out, *vjp(do))
        got = jax.jit(lambda *a: run(*a, "naive"))(q, k, v, do)
        up = [x.astype(jnp.float64) for x in (q, k, v, do)]
        ref = jax.jit(lambda *a: run(*a, "reference"))(*up)
        errs = [float(jnp.linalg.norm(g.astype(jnp.float64) - r) / jnp.linalg.norm(r)) for g, r in zip(got, ref)]
        ok = all(e <= tol for e in errs)
        worst = max(worst, max(e / tol for e in errs))
        print(f"{jnp.dtype(dt).name:9s} S={S} out/dq/dk/dv rel err {['%.1e' % e for e in errs]} {'ok' if ok else 'FAIL'}")
print(f"worst error / tolerance: {worst:.3f}")
