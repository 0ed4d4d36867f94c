"""The default JAX configuration (x64 off, as most users run): forward, grads, vmap, unfused and Flax
in float32 against the float64 NumPy oracle. Runs in a fresh interpreter, since conftest turns x64 on."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    assert not jax.config.jax_enable_x64
    import jax_na, oracle, helpers
    from helpers import Case
    from jax_na.flax import NeighborhoodAttention2D

    case = Case((7, 9), (3, 4), stride=(2, 1), dilation=(2, 1), is_causal=(True, False), H=4, Hkv=2,
                D=8, Dv=5, Na=2, B=2)
    q, k, v, ak, av = helpers.rand_inputs(case, np.float32, seed=1)
    out, lse = jax_na.na2d(q, k, v, **case.kwargs(), additional_keys=ak, additional_values=av,
                           return_lse=True)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    ref, ref_lse = oracle.attention(q, k, v, **case.kwargs(), add_k=ak, add_v=av)
    oracle.assert_close(out, ref, 1e-5, "out")
    oracle.assert_close(lse, ref_lse, 1e-5, "lse")

    ct = (helpers.rand_like(out.shape, 2, np.float32), helpers.rand_like(lse.shape, 3, np.float32))
    f = lambda *a: jax_na.na2d(*a[:3], **case.kwargs(), additional_keys=a[3], additional_values=a[4],
                               return_lse=True)
    _, vjp = jax.vjp(f, q, k, v, ak, av)
    grads = jax.jit(lambda c: vjp(c))(ct)
    _, _, want = helpers.dense_reference(case, (q, k, v, ak, av), ct)
    for g, w in zip(grads, want):
        assert g.dtype == jnp.float32
        oracle.assert_close(g, w, 1e-5, "grad")

    outs = jax.jit(jax.vmap(lambda q: jax_na.na2d(q, k, v, **case.kwargs())))(np.stack([q, 2 * q]))
    oracle.assert_close(outs[1], oracle.attention(2 * q, k, v, **case.kwargs())[0], 1e-5, "vmap")

    rpb = helpers.rand_like((4, 5, 7), 4, np.float32)
    s = jax_na.na2d_qk(q, k, (3, 4), dilation=(2, 1), is_causal=(True, False), rpb=rpb)
    sw = oracle.qk(q, k, (3, 4), (2, 1), (True, False), rpb=rpb)
    fin = np.isfinite(sw)
    assert (np.isfinite(np.asarray(s)) == fin).all()
    oracle.assert_close(np.asarray(s)[fin], sw[fin], 1e-5, "qk")
    p = jax.nn.softmax(s, axis=-1)
    o2 = jax_na.na2d_av(p, v, (3, 4), dilation=(2, 1), is_causal=(True, False))
    oracle.assert_close(o2, oracle.av(np.asarray(p), v, (3, 4), (2, 1), (True, False)), 1e-5, "av")

    x = jax.random.normal(jax.random.key(0), (1, 6, 7, 8))
    layer = NeighborhoodAttention2D(num_heads=2, kernel_size=3, rel_pos_bias=True, num_kv_heads=1)
    params = layer.init(jax.random.key(1), x)
    g = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
    assert all(bool(jnp.all(jnp.isfinite(l))) and float(jnp.abs(l).max()) > 0 for l in jax.tree.leaves(g))
    print("X32-OK")
''')


def test_float32_without_x64():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])  # the jax_na under test
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "X32-OK" in r.stdout, r.stdout + r.stderr
