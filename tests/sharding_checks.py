"""Multi-device checks of jax_na's partitioning, run as a script on 8 forced CPU host devices.

``--xla_force_host_platform_device_count`` only works before jax starts its backend, which the rest of
the test session does first, so tests/test_sharding.py runs this file in a subprocess:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py [check ...]

Every check prints ``JAX_NA_CHECK <name> PASS <seconds>`` or ``JAX_NA_CHECK <name> FAIL`` (with the
traceback) and the exit status is the number of failures. Everything is compared in float64 with the
unsharded call of the same function (the oracle tests pin that one down against SEMANTICS.md).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import warnings

CHECKS: dict = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def _setup():
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    jax.config.update("jax_enable_x64", True)
    assert len(jax.devices()) == 8, f"need 8 host devices, got {jax.devices()}"


if __name__ == "__main__":  # before jax is imported anywhere
    _setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_na  # noqa: E402
from jax_na import sharding as na_sharding  # noqa: E402

NA = {1: jax_na.na1d, 2: jax_na.na2d, 3: jax_na.na3d}
QK = {1: jax_na.na1d_qk, 2: jax_na.na2d_qk, 3: jax_na.na3d_qk}
AV = {1: jax_na.na1d_av, 2: jax_na.na2d_av, 3: jax_na.na3d_av}
SPATIAL = {1: (12,), 2: (6, 5), 3: (4, 4, 5)}
KERNEL = {1: 5, 2: (3, 4), 3: (2, 3, 3)}


def _mesh(shape=(4, 2), names=("x", "y")):
    """A mesh of Auto axes (jit's sharding propagation; not sharding-in-types)."""
    try:
        from jax.sharding import AxisType
    except ImportError:  # pragma: no cover - older jax: Auto is the only kind
        return jax.make_mesh(shape, names)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _rand(seed, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _random_qkv(seed, S, with_add, B=4, H=4, Hkv=2):
    """Random q [B, *S, H, 4], k [.., Hkv, 4], v [.., Hkv, 3] and (with_add) 2 additional keys/values."""
    q, k, v = _rand(seed, (B, *S, H, 4)), _rand(seed + 1000, (B, *S, Hkv, 4)), _rand(seed + 2000, (B, *S, Hkv, 3))
    if not with_add:
        return q, k, v, None, None
    return q, k, v, _rand(seed + 3000, (B, 2, Hkv, 4)), _rand(seed + 4000, (B, 2, Hkv, 3))


def _put(mesh, x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def _spec(mesh, x):
    """x's sharding as a PartitionSpec padded to its rank, trivial (size-1) mesh axes dropped."""
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    out = []
    for e in spec:
        axes = (e,) if isinstance(e, str) else tuple(e or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return tuple(out)


def _close(a, b, what, tol=1e-10):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def _compiled(f, *args):
    """(result, optimized HLO text) of jit(f) on args, compiling once."""
    exe = jax.jit(f).lower(*args).compile()
    return exe(*args), exe.as_text()


def _no_gather(text, what=""):
    assert "all-gather" not in text, f"{what}: the compiled program all-gathers:\n" + "\n".join(
        line for line in text.splitlines() if "all-gather" in line)
    return text


def _attention_case(rank, B=4, H=4, Hkv=2, D=4, Dv=3, Na=3, seed=0):
    S = SPATIAL[rank]
    q = _rand(seed, (B, *S, H, D))
    k = _rand(seed + 1, (B, *S, Hkv, D))
    v = _rand(seed + 2, (B, *S, Hkv, Dv))
    ak = _rand(seed + 3, (B, Na, Hkv, D)) if Na else None
    av = _rand(seed + 4, (B, Na, Hkv, Dv)) if Na else None
    return q, k, v, ak, av


def _attention_fns(rank, with_add, **kw):
    """forward (out, lse) and the gradient of a loss with non-trivial cotangents for both outputs."""
    kernel_size = kw.pop("kernel_size", KERNEL[rank])

    def fwd(q, k, v, ak=None, av=None):
        extra = dict(additional_keys=ak, additional_values=av) if with_add else {}
        return NA[rank](q, k, v, kernel_size, return_lse=True, **extra, **kw)

    def loss(*args):
        out, lse = fwd(*args)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(lse))

    return fwd, jax.grad(loss, argnums=tuple(range(5 if with_add else 3)))


def _attention_specs(rank, batch, heads, spatial=None):
    """Specs of q/k/v/out ([B, *S, H, D]), lse ([B, *S, H]) and add_k/add_v ([B, Na, Hkv, D]);
    ``spatial``: (spatial axis, mesh axes), or a list of them, to shard spatial axes too."""
    S = [None] * rank
    for axis, mesh_axes in ([spatial] if isinstance(spatial, tuple) else spatial or []):
        S[axis] = mesh_axes
    return P(batch, *S, heads, None), P(batch, *S, heads), P(batch, None, heads, None)


_REFS: dict = {}


def _reference(key, f, *args):
    """The unsharded result of f (one device), cached under key (which must identify the data too)."""
    if key not in _REFS:
        _REFS[key] = jax.jit(f)(*args)
    return _REFS[key]


def _permutes(text):
    """The collective-permute instructions of a compiled program."""
    import re
    return [line for line in text.splitlines() if re.search(r"collective-permute(-start)?\(", line)]


def _halo_sized(text, k_shard, what=""):
    """Every collective-permute of the compiled program moves at most ``k_shard`` elements (a
    per-device key shard, with the halos of the axes exchanged before): one hop moves at most a
    neighbour's shard."""
    import re
    lines = _permutes(text)
    if k_shard is None:  # no halo needed at all
        assert not lines, f"{what}: collective-permutes without a halo:\n" + "\n".join(lines)
        return
    assert lines, f"{what}: no collective-permute in the compiled program"
    for line in lines:
        shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", line.split("collective-permute")[0])
        sizes = [int(np.prod([int(d) for d in sh.split(",") if d])) for sh in shapes]
        assert sizes and max(sizes) <= k_shard, f"{what}: a collective-permute of {sizes} elements " \
            f"(a key shard has {k_shard}):\n{line}"


def _mesh_count(mesh, entry):
    """How many shards a PartitionSpec entry splits an axis into."""
    return int(np.prod([mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry or ())]))


def _on_shards(mesh, args, specs, rank):
    """(sharded arguments, wrap, crop) for calling a function on ``args`` sharded by ``specs``: jit
    ``wrap(f)`` on the sharded arguments and ``crop`` its results. jax.Array cannot hold a sharding that
    splits an axis unevenly, so where a sharded spatial axis of q/k/v (axes 1..rank) does not divide
    over its shards, the arguments go in padded to whole shards with NaN (XLA's padding is unspecified:
    the op must never read it) and ``wrap(f)`` slices them back and constrains them to their (uneven)
    shardings inside the jit, then pads the results with spatial axes back to whole shards: shard for
    shard the same layout, so neither step moves data. An array has the spatial axes if it has at least
    rank + 2 axes and axes 1..rank of that size (so not add_k/add_v, the bias or their gradients)."""
    S = tuple(args[0].shape[1:1 + rank])
    whole = tuple(-(-n // _mesh_count(mesh, e)) * _mesh_count(mesh, e)
                  for n, e in zip(S, (tuple(specs[0]) + (None,) * rank)[1:1 + rank]))

    def fit(x, frm, to, value=0.0):  # crop or pad axes 1..rank of x from `frm` to `to`, if x has them
        if x.ndim < rank + 2 or tuple(x.shape[1:1 + rank]) != frm:
            return x
        x = x[(slice(None), *(slice(0, t) for t in to))]
        widths = [(0, 0), *((0, max(t - f, 0)) for f, t in zip(frm, to)), *((0, 0),) * (x.ndim - 1 - rank)]
        return jnp.pad(x, widths, constant_values=value)

    if whole == S:
        return tuple(_put(mesh, x, sp) for x, sp in zip(args, specs)), lambda f: f, lambda y: y

    def wrap(f):
        def padded(*xs):
            xs = [jax.lax.with_sharding_constraint(fit(x, whole, S), NamedSharding(mesh, sp))
                  for x, sp in zip(xs, specs)]
            return jax.tree.map(lambda y: fit(y, S, whole), f(*xs))
        return padded

    sargs = tuple(_put(mesh, fit(x, S, whole, np.nan), sp) for x, sp in zip(args, specs))
    return sargs, wrap, lambda y: jax.tree.map(lambda z: fit(z, whole, S), y)


def _run_attention(mesh, rank, batch, heads, *, gather_ok=False, case=None, spatial=None, halo=True,
                   planned=False, **kw):
    """Sharded vs unsharded forward and gradient; ``spatial`` = (axis, mesh axes) shards one spatial
    axis too, which must then run with a halo exchange (collective-permutes of halo size -- at most a
    key shard, times 3 per earlier exchanged axis --, no gather; none at all with ``halo=False``, where
    no shard needs its neighbours' keys); its shards may be uneven (``_on_shards``). ``planned``: the
    collective-permutes are exactly those ``halo_widths`` plans (``_exchange``), in number and size."""
    case = case or _attention_case(rank)
    q, k, v, ak, av = case
    with_add = ak is not None
    args = (q, k, v, ak, av) if with_add else (q, k, v)
    fwd, grad = _attention_fns(rank, with_add, **dict(kw))
    qs, ls, adds = _attention_specs(rank, batch, heads, spatial)
    specs = (qs, qs, qs, adds, adds)[: len(args)]
    sargs, wrap, crop = _on_shards(mesh, args, specs, rank)
    key = (rank, tuple((x.shape, hash(np.asarray(x).tobytes())) for x in args), tuple(sorted(kw.items())))
    ref_out, ref_lse = _reference(("fwd", key), fwd, *args)
    (out, lse), fwd_text = _compiled(wrap(fwd), *sargs)
    _close(crop(out), ref_out, "out")
    _close(crop(lse), ref_lse, "lse")
    g, grad_text = _compiled(wrap(grad), *sargs)
    for name, a, b in zip(("dq", "dk", "dv", "d_add_k", "d_add_v"), g, _reference(("grad", key), grad, *args)):
        _close(crop(a), b, name)
    if not gather_ok:
        _no_gather(fwd_text, what=f"fwd {rank}-D batch={batch} heads={heads}")
        _no_gather(grad_text, what=f"grad {rank}-D batch={batch} heads={heads}")
        assert _spec(mesh, out) == _spec(mesh, sargs[0]), (out.sharding, sargs[0].sharding)
        assert _spec(mesh, lse) == _spec(mesh, _put(mesh, jnp.zeros(lse.shape), ls)), lse.sharding
        for a, x in zip(g, sargs):
            assert _spec(mesh, a) == _spec(mesh, x), (a.sharding, x.sharding)
    if spatial is not None:
        k_shard = sargs[1].size // _shards(mesh, sargs[1])
        # a later axis' exchange carries the earlier axes' halos (at most 3x its extent each)
        n_axes = 1 if isinstance(spatial, tuple) else len(spatial)
        most = k_shard * 3 ** (n_axes - 1) if halo else None
        if planned:  # the forward extends k and v; the gradient does that, the backward again, and
            # folds dK/dV back over the same hops
            per_operand, factor, _ = _exchange(mesh, q.shape[1:1 + rank], kw.get("kernel_size", KERNEL[rank]),
                                               spatial, kw)
            most = int(k_shard * factor)
            counts = (len(_permutes(fwd_text)), len(_permutes(grad_text)))
            assert counts == (2 * per_operand, 6 * per_operand), f"{rank}-D spatial={spatial} {kw}: {counts} " \
                f"collective-permutes (forward, gradient), expected {(2 * per_operand, 6 * per_operand)}"
        _halo_sized(fwd_text, most, what=f"fwd {rank}-D spatial={spatial} {kw}")
        _halo_sized(grad_text, most, what=f"grad {rank}-D spatial={spatial} {kw}")
    return out, g


def _shards(mesh, x):
    """How many distinct shards x is split into."""
    return int(np.prod([mesh.shape[a] for e in x.sharding.spec if e is not None
                        for a in ((e,) if isinstance(e, str) else e)]))


@check
def attention_batch_heads():
    """na1d/na2d/na3d with GQA and additional KV: batch, heads, batch+heads, batch over 2 mesh axes."""
    mesh = _mesh()
    for rank in (1, 2, 3):
        case = _attention_case(rank, B=8)
        for batch, heads in (("x", None), (None, "y"), ("x", "y"), (("x", "y"), None)):
            _run_attention(mesh, rank, batch, heads, case=case, is_causal=rank == 2,
                           stride=2 if rank == 1 else 1)


@check
def attention_gqa_heads():
    """Heads on a 4-way axis with GQA (H=8, H_kv=4: one kv head per device), MHA, no additional KV."""
    mesh = _mesh((2, 4), ("x", "y"))
    _run_attention(mesh, 2, None, "y", case=_attention_case(2, B=2, H=8, Hkv=4))
    _run_attention(mesh, 1, "x", "y", case=_attention_case(1, B=2, H=4, Hkv=4, Na=0))
    _run_attention(mesh, 2, "x", ("y",), case=_attention_case(2, B=2, H=8, Hkv=4, Na=0), dilation=(2, 1))


@check
def unfused_qk_av_rpb():
    """na*d_qk (with rpb) + softmax + na*d_av, and their gradients (d_rpb psums over the batch)."""
    mesh = _mesh()
    for rank in (1, 2, 3):
        S, ks = SPATIAL[rank], KERNEL[rank]
        ks_t = ks if isinstance(ks, tuple) else (ks,)
        B, H, Hkv, D = 4, 4, 2, 4
        q, k, v = _rand(10, (B, *S, H, D)), _rand(11, (B, *S, Hkv, D)), _rand(12, (B, *S, Hkv, 3))
        rpb = _rand(13, (H, *(2 * x - 1 for x in ks_t)))
        causal = rank == 3

        def f(q, k, v, rpb):
            w = QK[rank](q, k, ks, rpb=rpb, is_causal=causal, dilation=2 if rank == 1 else 1)
            return AV[rank](jax.nn.softmax(w, -1), v, ks, is_causal=causal, dilation=2 if rank == 1 else 1)

        grad = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2, 3))
        ref, ref_g = jax.jit(f)(q, k, v, rpb), jax.jit(grad)(q, k, v, rpb)
        S0 = (None,) * rank
        for batch, heads in (("x", None), (None, "y"), ("x", "y")):
            spec = P(batch, *S0, heads, None)
            sargs = (_put(mesh, q, spec), _put(mesh, k, spec), _put(mesh, v, spec),
                     _put(mesh, rpb, P(heads)))
            out, text = _compiled(f, *sargs)
            _close(out, ref, f"out {rank}-D {batch} {heads}")
            assert _spec(mesh, out) == _spec(mesh, sargs[0])
            _no_gather(text, what="unfused fwd")
            g, text = _compiled(grad, *sargs)
            for name, a, b, x in zip(("dq", "dk", "dv", "d_rpb"), g, ref_g, sargs):
                _close(a, b, f"{name} {rank}-D {batch} {heads}")
                assert _spec(mesh, a) == _spec(mesh, x), (name, a.sharding, x.sharding)
            _no_gather(text, what="unfused grad")
            if batch is not None:  # d_rpb's psum over the batch is there
                assert "all-reduce" in text
        # the ops alone (no softmax in between), no bias
        qk = lambda q, k: QK[rank](q, k, ks)
        spec = P("x", *S0, "y", None)
        _close(jax.jit(qk)(_put(mesh, q, spec), _put(mesh, k, spec)), qk(q, k), "qk without bias")


def _spatial_warnings(caught):
    return [str(w.message) for w in caught if "spatial" in str(w.message)]


@check
def spatial_halo():
    """One sharded spatial axis (each rank, each axis position), with dilation, stride, causal, GQA,
    additional KV and mixed batch/head sharding: exact values and gradients, the spatial axis stays
    sharded, the program has collective-permutes of halo size and no all-gather, and no warning."""
    mesh = _mesh()
    na_sharding._WARNED.clear()
    cases = (  # (rank, spatial shape, kernel, (sharded axis, mesh axes), batch, heads, kwargs)
        (1, (32,), 5, (0, "x"), None, None, {}),
        (1, (32,), 5, (0, "x"), "y", None, dict(dilation=2)),
        (1, (32,), 4, (0, "x"), None, "y", dict(stride=2, is_causal=True)),
        (1, (32,), 3, (0, ("x", "y")), None, None, dict(stride=3)),  # 8 shards over two mesh axes
        (1, (24,), 6, (0, "x"), None, None, dict(stride=6)),  # blocked: halos only where blocks cross
        (2, (16, 6), (3, 4), (0, "x"), None, None, dict(dilation=(2, 1))),
        (2, (16, 6), (3, 4), (0, "x"), "y", None, dict(is_causal=(True, False), stride=(2, 1))),
        (2, (6, 32), (3, 5), (1, "x"), None, "y", dict(is_causal=(False, True), dilation=(1, 2))),
        (3, (4, 8, 5), (2, 3, 3), (1, "x"), "y", None, dict(is_causal=(False, True, False))),
        (3, (4, 5, 16), (2, 3, 3), (2, "x"), None, None, dict(stride=(1, 1, 2), dilation=(1, 1, 2))),
        (3, (8, 4, 5), (3, 2, 3), (0, "y"), "x", None, dict(is_causal=(True, False, False))),
        # two sharded spatial axes (corner halos), and three on a 2x2x2 mesh below
        (2, (12, 6), (3, 3), [(0, "x"), (1, "y")], None, None, dict(dilation=(1, 1))),
        (2, (16, 8), (3, 4), [(0, "x"), (1, "y")], None, None, dict(is_causal=(True, False), stride=(1, 2))),
        (3, (4, 8, 12), (2, 3, 3), [(1, "y"), (2, "x")], None, None, dict(dilation=(1, 2, 1))),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (rank, S, ks, spatial, batch, heads, kw) in enumerate(cases):
            q, k, v, ak, av = _random_qkv(100 + i, S, with_add=i % 2 == 0)
            _run_attention(mesh, rank, batch, heads, case=(q, k, v, ak, av), spatial=spatial,
                           kernel_size=ks, halo=kw.get("stride") != 6, **kw)
        cube = _mesh((2, 2, 2), ("x", "y", "z"))  # every spatial axis of a 3-D call sharded
        q, k, v = _rand(600, (2, 6, 8, 6, 2, 4)), _rand(601, (2, 6, 8, 6, 2, 4)), _rand(602, (2, 6, 8, 6, 2, 3))
        _run_attention(cube, 3, None, None, case=(q, k, v, None, None),
                       spatial=[(0, "x"), (1, "y"), (2, "z")], kernel_size=(3, 3, 5),
                       is_causal=(False, True, False))
    assert not _spatial_warnings(caught), _spatial_warnings(caught)


@check
def spatial_halo_unfused():
    """The unfused qk/av ops (with rpb, dilation, causal) on spatially sharded inputs, one and two sharded
    axes, with batch sharding: values and gradients (q, k, v, rpb) equal the unsharded call, no
    all-gather, collective-permutes of halo size, no warning."""
    mesh = _mesh()
    na_sharding._WARNED.clear()
    cases = (  # (rank, spatial, kernel, spec of q/k/v, kwargs)
        (1, (16,), 3, P(None, "x"), dict(dilation=2)),
        (1, (16,), 4, P("y", "x"), dict(is_causal=True)),
        (2, (8, 12), (3, 3), P(None, "y", "x"), dict(is_causal=(False, True))),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (rank, S, ks, spec, kw) in enumerate(cases):
            q, k, v = (_rand(700 + 3 * i + j, (2, *S, 4, 4)) for j in range(3))
            kt = ks if isinstance(ks, tuple) else (ks,) * rank
            rpb = _rand(710 + i, (4, *(2 * kk - 1 for kk in kt)))
            qk, av = getattr(jax_na, f"na{rank}d_qk"), getattr(jax_na, f"na{rank}d_av")
            f = lambda q, k, v, rpb: av(jax.nn.softmax(qk(q, k, ks, rpb=rpb, **kw), -1), v, ks, **kw)
            grad = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2, 3))
            sargs = (*(_put(mesh, x, spec) for x in (q, k, v)), rpb)
            out, text = _compiled(f, *sargs)
            _close(out, f(q, k, v, rpb), f"unfused {rank}-D {kw}")
            assert _spec(mesh, out) == _spec(mesh, sargs[0]), (out.sharding, spec)
            g, grad_text = _compiled(grad, *sargs)
            for name, a, b in zip(("dq", "dk", "dv", "drpb"), g, grad(q, k, v, rpb)):
                _close(a, b, f"unfused {name} {rank}-D {kw}")
            k_shard = k.size // _shards(mesh, sargs[1]) * 3 ** (sum(e is not None for e in spec[1:]) - 1)
            for t, what in ((text, "fwd"), (grad_text, "grad")):
                _no_gather(t, what=f"unfused {what} {rank}-D {kw}")
                _halo_sized(t, k_shard, what=f"unfused {what} {rank}-D {kw}")
    assert not _spatial_warnings(caught), _spatial_warnings(caught)


def _exchange(mesh, S, kernel, spatial, kw):
    """(ppermutes per exchanged operand, the largest one in key shards, the most hops of an axis) of the
    halo exchange ``halo_widths`` plans: one ppermute per hop, side and axis; a later axis' ppermutes
    carry the earlier axes' halos."""
    def per_axis(x):
        return x if isinstance(x, tuple) else (x,) * len(S)
    kernel, stride, dilation, causal = (per_axis(x) for x in (
        kernel, kw.get("stride", 1), kw.get("dilation", 1), kw.get("is_causal", False)))
    per_operand, growth, factor, most_hops = 0, 1.0, 1.0, 0
    for axis, mesh_axes in sorted([spatial] if isinstance(spatial, tuple) else spatial):
        n = _mesh_count(mesh, mesh_axes)
        widths = na_sharding.halo_widths(S[axis], n, kernel[axis], stride[axis], dilation[axis],
                                         bool(causal[axis]))
        assert not isinstance(widths, str), widths
        m = -(-S[axis] // n)  # uneven shards: XLA pads each to ceil(length / shards) tokens
        left, right = (max(w[j] for w in widths if w is not None) for j in (0, 1))
        hops = (-(-left // m), -(-right // m))
        per_operand += sum(hops)
        most_hops = max(most_hops, *hops)
        factor = growth  # this axis' ppermutes move at most a shard of the array extended so far
        growth *= (left + m + right) / m
    return per_operand, factor, most_hops


def _run_unfused(mesh, S, ks, spec, kw, seed):
    """The unfused qk (with a bias) + softmax + av on q/k/v sharded by ``spec`` (uneven shards too:
    ``_on_shards``), sharded vs unsharded: values, gradients (q, k, v, bias) and shardings, no
    all-gather, and the collective-permutes ``halo_widths`` plans (``_exchange``), in number and size.
    Returns the most hops of an axis."""
    rank = len(S)
    q, k, v = (_rand(seed + j, (2, *S, 4, 4)) for j in range(3))
    kt = ks if isinstance(ks, tuple) else (ks,) * rank
    rpb = _rand(seed + 3, (4, *(2 * kk - 1 for kk in kt)))
    qk, av = QK[rank], AV[rank]
    f = lambda q, k, v, rpb: av(jax.nn.softmax(qk(q, k, ks, rpb=rpb, **kw), -1), v, ks, **kw)
    grad = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2, 3))
    sargs, wrap, crop = _on_shards(mesh, (q, k, v, rpb), (spec, spec, spec, P()), rank)
    what = f"unfused {S} {ks} {spec} {kw}"
    out, text = _compiled(wrap(f), *sargs)
    _close(crop(out), jax.jit(f)(q, k, v, rpb), what)
    assert _spec(mesh, out) == _spec(mesh, sargs[0]), (what, out.sharding)
    g, grad_text = _compiled(wrap(grad), *sargs)
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), g, jax.jit(grad)(q, k, v, rpb)):
        _close(crop(a), b, f"{name}, {what}")
    for name, a, x in zip(("dq", "dk", "dv"), g, sargs):
        assert _spec(mesh, a) == _spec(mesh, x), (what, name, a.sharding, x.sharding)
    spatial = [(a, e) for a, e in enumerate(spec[1:1 + rank]) if e is not None]
    per_operand, factor, hops = _exchange(mesh, S, ks, spatial, kw)
    k_shard = sargs[1].size // _shards(mesh, sargs[1])
    # forward: qk extends k, av extends v; gradient: those, again in qk_bwd/av_bwd, and the dK/dV folded
    # back
    for t, kind, expected in ((text, "fwd", 2 * per_operand), (grad_text, "grad", 6 * per_operand)):
        _no_gather(t, what=f"{kind} {what}")
        _halo_sized(t, int(k_shard * factor), what=f"{kind} {what}")
        assert len(_permutes(t)) == expected, (kind, what, len(_permutes(t)), expected)
    return hops


@check
def spatial_halo_multihop():
    """Windows wider than a shard: the halo comes from several neighbours per side (one ppermute per
    hop), 1-D, 2-D (both axes sharded, corners) and 3-D, with dilation, stride, causal, GQA, additional KV
    and batch/head sharding, and the unfused qk + softmax + av with a bias: values and gradients equal
    the unsharded call, no all-gather, no warning, one collective-permute per hop, side, axis and
    exchanged operand, each moving at most a (halo-extended) key shard."""
    mesh = _mesh()
    na_sharding._WARNED.clear()
    cases = (  # (rank, spatial shape, kernel, (sharded axis, mesh axes), batch, heads, kwargs)
        (1, (64,), 21, (0, ("x", "y")), None, None, {}),  # halos of 10-13 tokens on 8-token shards
        (1, (64,), 21, (0, ("x", "y")), None, None, dict(is_causal=True, stride=2)),  # 20 back: 3 hops
        (1, (64,), 9, (0, ("x", "y")), None, None, dict(dilation=2)),
        (2, (16, 8), (9, 7), [(0, "x"), (1, "y")], None, None, {}),  # both axes wider than a shard
        (2, (32, 5), (9, 3), (0, "x"), "y", None, dict(dilation=(2, 1))),
        (2, (16, 8), (7, 5), [(0, "x"), (1, "y")], None, None, dict(is_causal=(True, False), stride=(2, 1))),
        (3, (4, 16, 5), (2, 9, 3), (1, "x"), None, "y", dict(is_causal=(False, False, True))),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (rank, S, ks, spatial, batch, heads, kw) in enumerate(cases):
            assert _exchange(mesh, S, ks, spatial, kw)[2] > 1, (S, ks, kw, "not a multi-hop case")
            _run_attention(mesh, rank, batch, heads, case=_random_qkv(800 + i, S, with_add=i % 2 == 0),
                           spatial=spatial, kernel_size=ks, planned=True, **kw)

        cases = (  # (spatial, kernel, spec of q/k/v, kwargs) for the unfused ops with a bias
            ((16, 8), (9, 7), P("y", "x", None, None, None), {}),  # rows 2 hops, batch sharded
            ((16, 8), (9, 7), P(None, "x", "y", None, None), {}),  # both axes
            ((64,), 13, P(None, ("x", "y"), None, None), dict(is_causal=True, dilation=2)),  # 24 back
        )
        for i, (S, ks, spec, kw) in enumerate(cases):
            hops = _run_unfused(mesh, S, ks, spec, kw, seed=850 + 5 * i)
            assert hops > 1, (S, ks, spec, kw, "not a multi-hop case")
    assert not _spatial_warnings(caught), _spatial_warnings(caught)


@check
def spatial_halo_uneven():
    """Sharded spatial axes that do not divide over their shards (XLA pads every shard to ceil(L / n)
    tokens; the padding enters as NaN, so a padding token attended or in a gradient would show): 1-D, 2-D
    (both axes uneven, corners) and 3-D (all three axes uneven), with dilation, stride, causal, GQA,
    additional KV, batch/head sharding, multi-hop halos, a last shard that is mostly padding and shards
    that are all padding, and the unfused qk + softmax + av with a bias: values and gradients equal the
    unsharded call, the axes stay sharded, no all-gather, no warning, and exactly the collective-permutes
    halo_widths plans (one per hop, side, axis and exchanged operand, each at most a padded key shard)."""
    mesh = _mesh()
    na_sharding._WARNED.clear()
    xy = ("x", "y")
    cases = (  # (rank, spatial shape, kernel, (sharded axis, mesh axes), batch, heads, kwargs)
        (1, (30,), 5, (0, "x"), None, None, {}),  # 8-token shards, the last holds 6
        (1, (30,), 5, (0, xy), None, None, dict(dilation=2)),  # 4-token shards, the last holds 2
        (1, (30,), 4, (0, "x"), None, "y", dict(stride=2, is_causal=True)),
        (1, (13,), 5, (0, "x"), "y", None, dict(stride=3)),  # the last shard: 1 token, 3 of padding
        (1, (9,), 3, (0, xy), None, None, dict(is_causal=True)),  # shard 4: 1 token; 5..7: none
        (1, (30,), 13, (0, xy), None, None, {}),  # multi-hop: 6+ tokens a side on 4-token shards
        (1, (27,), 5, (0, xy), None, None, dict(dilation=3, is_causal=True)),  # 12 back: 3 hops; 7: none
        (2, (10, 7), (3, 5), [(0, "x"), (1, "y")], None, None, {}),  # both axes uneven: corners
        (2, (30, 5), (3, 4), (0, "x"), "y", None, dict(dilation=(2, 1), is_causal=(True, False))),
        (2, (6, 9), (3, 5), (1, xy), None, None, dict(is_causal=(False, True), stride=(1, 2))),  # 5..7: none
        (2, (18, 7), (11, 5), [(0, "x"), (1, "y")], None, None, {}),  # rows multi-hop, both uneven
        (3, (5, 7, 4), (3, 3, 3), (0, "x"), "y", None, dict(is_causal=(False, True, False))),  # 3: none
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (rank, S, ks, spatial, batch, heads, kw) in enumerate(cases):
            _run_attention(mesh, rank, batch, heads, case=_random_qkv(900 + i, S, with_add=i % 2 == 0),
                           spatial=spatial, kernel_size=ks, planned=True, **kw)
        cube = _mesh((2, 2, 2), ("x", "y", "z"))  # every axis of a 3-D call sharded, every one uneven
        _run_attention(cube, 3, None, None, case=_random_qkv(950, (5, 7, 9), with_add=True),
                       spatial=[(0, "x"), (1, "y"), (2, "z")], kernel_size=(3, 5, 3), planned=True,
                       is_causal=(False, True, False), dilation=(1, 1, 2))

        cases = (  # (spatial, kernel, spec of q/k/v, kwargs) for the unfused ops with a bias
            ((30,), 5, P(None, xy, None, None), dict(dilation=2, is_causal=True)),
            ((10, 7), (3, 5), P("y", "x", None, None, None), {}),  # rows uneven, batch sharded
            ((10, 7), (3, 5), P(None, "x", "y", None, None), {}),  # both axes uneven
            ((9,), 3, P(None, xy, None, None), {}),  # shards 5..7 all padding
            ((30,), 13, P(None, xy, None, None), {}),  # multi-hop
        )
        for i, (S, ks, spec, kw) in enumerate(cases):
            _run_unfused(mesh, S, ks, spec, kw, seed=960 + 5 * i)
    assert not _spatial_warnings(caught), _spatial_warnings(caught)


@check
def spatial_halo_geometry():
    """halo_widths: exact by construction (the brute-force check), minimal where the window math says
    so, wider than a shard where the windows are (multi-hop); with uneven shards on the real tokens of
    each shard only (None for a shard without any), never reaching past the axis into the padding."""
    hw = na_sharding.halo_widths
    assert hw(12, 4, 5) == ((0, 2), (2, 2), (2, 2), (2, 0)), hw(12, 4, 5)  # k // 2 on each side
    assert hw(32, 4, 3, 1, 2) == ((0, 2), (2, 2), (2, 2), (2, 0))  # (k // 2) * dilation
    assert all(r == 0 for _, r in hw(32, 4, 4, 1, 1, True))  # causal: left halo only
    assert hw(24, 4, 6, 6) == ((0, 0), (0, 0), (0, 0), (0, 0))  # blocked, blocks inside the shards
    # 4 * 2 keys back: more than a 3-token shard; the first shard's slab must hold 5 * 2 tokens
    assert hw(12, 4, 5, 1, 2, True) == ((0, 7), (3, 4), (6, 1), (8, 0)), hw(12, 4, 5, 1, 2, True)
    # a 21-token window on 8-token shards: 10 a side inside, the border windows reach 13 tokens in
    assert hw(64, 8, 21) == ((0, 13), (8, 10), *((10, 10),) * 4, (10, 8), (13, 0)), hw(64, 8, 21)
    # uneven: 3-token shards, the last holds token 9 only (no right halo; its slab holds a whole kernel)
    assert hw(10, 4, 3) == ((0, 1), (1, 1), (1, 1), (2, 0)), hw(10, 4, 3)
    # 2-token shards: shard 4 holds token 8 only, shards 5..7 nothing
    assert hw(9, 8, 3) == ((0, 1), (1, 1), (1, 1), (1, 1), (2, 0), None, None, None), hw(9, 8, 3)
    # every returned halo is exact for every shard: recheck against neighborhood() lists
    from jax_na.geometry import neighborhood
    for L, n, k, s, d, c in ((32, 4, 5, 2, 2, False), (30, 3, 4, 3, 1, True), (40, 4, 3, 1, 3, False),
                             (16, 2, 7, 7, 1, False), (24, 4, 5, 5, 1, True), (64, 8, 21, 1, 1, True),
                             (64, 8, 9, 2, 2, False), (48, 8, 7, 1, 3, True),
                             # uneven shards
                             (30, 4, 5, 1, 1, False), (30, 8, 5, 1, 2, False), (13, 4, 5, 3, 1, True),
                             (9, 8, 3, 1, 1, True), (27, 8, 5, 1, 3, True), (30, 8, 13, 1, 1, False),
                             (10, 4, 4, 2, 1, False), (31, 4, 7, 2, 2, True), (5, 4, 3, 3, 1, False)):
        widths = hw(L, n, k, s, d, c)
        assert not isinstance(widths, str), (L, n, k, s, d, c, widths)
        full = neighborhood(L, k, s, d, c)
        for i, (w, (q0, q1)) in enumerate(zip(widths, na_sharding._shard_extents(L, n))):
            assert (w is None) == (q0 == q1), (L, n, i, w)
            if w is None:
                continue
            lo, hi = q0 - w[0], q1 + w[1]
            assert 0 <= lo and hi <= L, (L, n, k, s, d, c, i, w)
            local = neighborhood(hi - lo, k, s, d, c)
            for t in range(q0, q1):
                assert [j + lo for j in local[t - lo]] == full[t], (L, n, k, s, d, c, i, t)


@check
def spatial_fallback():
    """Sharded spatial axes the halo exchange does not cover (a multi-hop halo that would bring in more
    than all the other shards hold) are gathered with a one-time warning per reason; results stay exact
    (with dilation/stride/causal)."""
    mesh = _mesh()
    na_sharding._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cases = (  # (rank, spec of q/k/v, kwargs)
            # 12 tokens on 4 shards, keys up to 8 back: the halos (8 + 7 tokens, the first shard's slab
            # holds a whole dilated kernel) exceed the 9 tokens of the other shards
            (1, P("y", "x", None, None), dict(dilation=2, is_causal=True)),  # spatial + batch
            (2, P(None, "y", None, None, None), dict(stride=(2, 1), is_causal=(True, False))),
            (2, P(None, "y", None, None, None), dict(dilation=(2, 1))),
            (3, P(None, None, "y", None, None, None), dict(is_causal=(False, True, False), stride=(1, 1, 2))),
        )
        for rank, spec, kw in cases:
            case = _attention_case(rank, B=2, Na=0 if rank == 3 else 2)
            q, k, v, ak, av = case
            with_add = ak is not None
            args = (q, k, v, ak, av)[: 5 if with_add else 3]
            fwd, grad = _attention_fns(rank, with_add, **kw)
            sargs = tuple(_put(mesh, x, spec if i < 3 else P()) for i, x in enumerate(args))
            out, lse = jax.jit(fwd)(*sargs)
            ref_out, ref_lse = jax.jit(fwd)(*args)
            _close(out, ref_out, f"out {rank}-D {kw}")
            _close(lse, ref_lse, f"lse {rank}-D {kw}")
            assert _spec(mesh, out) == _spec(mesh, sargs[0]), (out.sharding, spec)
            for name, a, b in zip(("dq", "dk", "dv", "dak", "dav"), jax.jit(grad)(*sargs), jax.jit(grad)(*args)):
                _close(a, b, f"{name} {rank}-D {kw}")
        # two sharded axes, one of which cannot take a halo (the 9-token windows of the first and last
        # 3-token shards reach 6 tokens in: 6 + 6 > the 9 tokens of the other shards): that axis alone
        # is gathered, the other keeps its halo exchange
        q, k, v = _rand(23, (2, 12, 6, 4, 4)), _rand(24, (2, 12, 6, 2, 4)), _rand(25, (2, 12, 6, 2, 3))
        fwd, grad = _attention_fns(2, False, kernel_size=(9, 3))
        sargs = tuple(_put(mesh, x, P(None, "x", "y")) for x in (q, k, v))
        g, text = _compiled(grad, *sargs)
        for a, b in zip(g, grad(q, k, v)):
            _close(a, b, "one axis gathered, one with halos")
        assert "collective-permute" in text and "all-gather" in text
    messages = _spatial_warnings(caught)
    assert len(messages) == len(set(messages)), messages  # one-time (per reason)
    assert all("gather" in m and "halo" in m for m in messages), messages
    for reason in ("more than the other shards hold",):
        assert any(reason in m for m in messages), (reason, messages)


@check
def heads_fallback():
    """Heads that cannot be sharded consistently are replicated (warning), results exact."""
    mesh = _mesh((2, 4), ("x", "y"))
    na_sharding._WARNED.clear()
    q, k, v, _, _ = _attention_case(2, B=2, H=4, Hkv=1, Na=0)  # MQA: 1 kv head on 4 shards
    fwd, grad = _attention_fns(2, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sargs = (_put(mesh, q, P(None, None, None, "y")), k, v)
        _close(jax.jit(fwd)(*sargs)[0], fwd(q, k, v)[0], "MQA heads")
        for a, b in zip(jax.jit(grad)(*sargs), grad(q, k, v)):
            _close(a, b, "MQA heads grad")
        q, k, v, _, _ = _attention_case(2, B=2, H=8, Hkv=4, Na=0)  # q heads on x, kv heads on y
        sargs = (_put(mesh, q, P(None, None, None, "x")), _put(mesh, k, P(None, None, None, ("y",))),
                 _put(mesh, v, P(None, None, None, "y")))
        _close(jax.jit(fwd)(*sargs)[0], fwd(q, k, v)[0], "inconsistent heads")
    assert any("heads cannot be sharded" in str(w.message) for w in caught), [str(w.message) for w in caught]


@check
def eager_sharded_call():
    """An eager (un-jitted) call on sharded arrays partitions too."""
    mesh = _mesh()
    q, k, v, ak, av = _attention_case(2)
    qs, _, adds = _attention_specs(2, "x", "y")
    out = jax_na.na2d(_put(mesh, q, qs), _put(mesh, k, qs), _put(mesh, v, qs), KERNEL[2],
                      additional_keys=_put(mesh, ak, adds), additional_values=_put(mesh, av, adds))
    _close(out, jax_na.na2d(q, k, v, KERNEL[2], additional_keys=ak, additional_values=av), "eager")
    assert _spec(mesh, out) == ("x", None, None, "y", None), out.sharding


@check
def pmap_and_shard_map():
    """pmap over devices, and shard_map (the local op inside, fully manual), forward and gradient."""
    q, k, v, ak, av = _attention_case(2, B=8, Na=2)
    fwd, grad = _attention_fns(2, True, is_causal=(True, False))
    ref_out, ref_g = fwd(q, k, v, ak, av), grad(q, k, v, ak, av)
    split = lambda x: x.reshape(8, 1, *x.shape[1:])
    merge = lambda x: x.reshape(8, *x.shape[2:])
    out = jax.pmap(fwd)(*map(split, (q, k, v, ak, av)))
    _close(merge(out[0]), ref_out[0], "pmap out")
    g = jax.pmap(grad)(*map(split, (q, k, v, ak, av)))
    for a, b in zip(g, ref_g):
        _close(merge(a), b, "pmap grad")

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # pragma: no cover - older jax
        from jax.experimental.shard_map import shard_map
    mesh = _mesh()
    qs, ls, adds = _attention_specs(2, "x", "y")
    specs = (qs, qs, qs, adds, adds)
    sm_fwd = jax.jit(shard_map(fwd, mesh=mesh, in_specs=specs, out_specs=(qs, ls)))
    sm_grad = jax.jit(shard_map(grad, mesh=mesh, in_specs=specs, out_specs=specs))
    args = tuple(_put(mesh, x, s) for x, s in zip((q, k, v, ak, av), specs))
    for a, b in zip(sm_fwd(*args), ref_out):
        _close(a, b, "shard_map out")
    for a, b in zip(sm_grad(*args), ref_g):
        _close(a, b, "shard_map grad")
    assert "all-gather" not in sm_grad.lower(*args).compile().as_text()
    # grad of a function containing a shard_map
    loss = lambda *a: jnp.sum(jnp.sin(sm_fwd(*a)[0]))
    ref_loss = lambda *a: jnp.sum(jnp.sin(fwd(*a)[0]))
    for a, b in zip(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args), jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v, ak, av)):
        _close(a, b, "grad of shard_map")


@check
def vmap_grad_nesting():
    """vmap(grad), grad(vmap) and vmap of the unfused ops under jit with sharded inputs."""
    mesh = _mesh()
    V = 2
    q, k, v, _, _ = _attention_case(1, B=4, Na=0)
    qv, kv, vv = (jnp.stack([x, x[::-1] * 0.5]) for x in (q, k, v))  # [V, B, X, H, D]
    fwd, grad = _attention_fns(1, False, is_causal=True)
    spec = P(None, "x", None, "y", None)
    sargs = tuple(_put(mesh, x, spec) for x in (qv, kv, vv))
    for a, b in zip(jax.jit(jax.vmap(grad))(*sargs), jax.vmap(grad)(qv, kv, vv)):
        _close(a, b, "vmap(grad)")
    gv = jax.grad(lambda *a: jnp.sum(jnp.sin(jax.vmap(fwd)(*a)[0])), argnums=(0, 1, 2))
    for a, b in zip(jax.jit(gv)(*sargs), gv(qv, kv, vv)):
        _close(a, b, "grad(vmap)")
    # the vmapped axis itself sharded
    sargs = tuple(_put(mesh, x, P("y", "x")) for x in (qv, kv, vv))
    for a, b in zip(jax.jit(jax.vmap(grad))(*sargs), jax.vmap(grad)(qv, kv, vv)):
        _close(a, b, "vmap(grad), vmapped axis sharded")
    # unfused: vmap folds into heads; with a per-instance bias
    rpb = _rand(30, (V, 4, 5))
    f = lambda q, k, rpb: jnp.sum(jnp.sin(jax_na.na1d_qk(q, k, 3, rpb=rpb)))
    g = jax.vmap(jax.grad(f, argnums=(0, 1, 2)))
    sargs = (_put(mesh, qv, spec), _put(mesh, kv, spec), rpb)
    for a, b in zip(jax.jit(g)(*sargs), g(qv, kv, rpb)):
        _close(a, b, "vmap(grad(qk))")


@check
def vmap_sharded_batch():
    """vmap with the batch sharded and the vmapped axes not ([V, B, X, H, D] with B on "x", and the heads
    or the spatial axis on "y"; nested vmap over [V1, V2, B, ...]): the vmapped axes stay leading batch
    axes of the primitives (folded into the batch on each device), so the compiled program has no
    all-gather, and the values, gradients and shardings are those of the unsharded call. The fused
    attention (with additional KV) and the unfused qk/av ops with a per-instance bias."""
    mesh = _mesh()
    q, k, v, ak, av = _attention_case(1, B=4, Na=2)
    fwd, grad = _attention_fns(1, True, is_causal=True)
    grad_all = lambda *a: (grad(*a), fwd(*a))  # forward results and gradients in one program

    def stacked(x, lead):  # [*lead, B, ...], every instance different
        n = int(np.prod(lead))
        return jnp.stack([x * (1 + 0.25 * i) + 0.1 * i for i in range(n)]).reshape(*lead, *x.shape)

    cases = (  # (leading vmapped axes, q/k/v spec without them, add_k/add_v spec, halo exchange)
        ((2,), ("x", None, "y", None), ("x", None, "y", None), False),  # batch + heads
        ((2,), ("x", "y", None, None), ("x", None, None, None), True),  # batch + spatial (halos)
        ((2, 3), ("x", None, "y", None), ("x", None, "y", None), False),  # nested vmap
        ((3, 2), ("x", "y", None, None), ("x", None, None, None), True),
    )
    for lead, qkv_spec, add_spec, halo in cases:
        f = grad_all
        for _ in lead:
            f = jax.vmap(f)
        args = tuple(stacked(x, lead) for x in (q, k, v, ak, av))
        none = (None,) * len(lead)
        specs = (P(*none, *qkv_spec),) * 3 + (P(*none, *add_spec),) * 2
        sargs = tuple(_put(mesh, x, s) for x, s in zip(args, specs))
        what = f"vmap over {lead} with q/k/v {specs[0]}"
        (g, (out, lse)), text = _compiled(f, *sargs)
        (ref_g, (ref_out, ref_lse)) = jax.jit(f)(*args)
        _close(out, ref_out, f"out, {what}")
        _close(lse, ref_lse, f"lse, {what}")
        for name, a, b, x in zip(("dq", "dk", "dv", "d_add_k", "d_add_v"), g, ref_g, sargs):
            _close(a, b, f"{name}, {what}")
            assert _spec(mesh, a) == _spec(mesh, x), (what, name, a.sharding, x.sharding)
        assert _spec(mesh, out) == _spec(mesh, sargs[0]), (what, out.sharding)
        _no_gather(text, what=what)
        k_shard = args[1].size // _shards(mesh, sargs[1])
        _halo_sized(text, k_shard if halo else None, what=what)

    # the unfused ops, a bias per instance (d_rpb per instance: summed over the batch, not over V)
    V, H = 2, 4
    rpb = _rand(31, (V, H, 5))
    loss = lambda q, k, v, rpb: jnp.sum(jnp.sin(jax_na.na1d_av(
        jax.nn.softmax(jax_na.na1d_qk(q, k, 3, rpb=rpb), -1), v, 3)))
    g = jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    args = (*(stacked(x, (V,)) for x in (q, k, v)), rpb)
    for spec in (P(None, "x", None, "y", None), P(None, "x", "y", None, None)):
        sargs = (*(_put(mesh, x, spec) for x in args[:3]), rpb)
        (val, grads), text = _compiled(g, *sargs)
        ref_val, ref_grads = jax.jit(g)(*args)
        _close(val, ref_val, f"unfused value, vmap with {spec}")
        for name, a, b in zip(("dq", "dk", "dv", "d_rpb"), grads, ref_grads):
            _close(a, b, f"unfused {name}, vmap with {spec}")
        _no_gather(text, what=f"unfused, vmap with {spec}")
        for i in range(V):  # each instance on its own, without vmap: d_rpb is per instance
            one = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*(x[i] for x in args))
            _close(val[i], one[0], f"unfused value, instance {i}")
            for name, a, b in zip(("dq", "dk", "dv", "d_rpb"), grads, one[1]):
                _close(a[i], b, f"unfused {name}, instance {i}, vmap with {spec}")


@check
def gspmd_partitioner():
    """The GSPMD callbacks (jax_use_shardy_partitioner=False), where this jax still has them."""
    try:
        jax.config.update("jax_use_shardy_partitioner", False)
    except Exception:  # pragma: no cover - a jax without GSPMD
        print("gspmd_partitioner: this jax has no GSPMD; skipped")
        return
    try:
        mesh = _mesh()
        _run_attention(mesh, 2, "x", "y", case=_attention_case(2, Na=0))
        case = (_rand(60, (2, 32, 2, 4)), _rand(61, (2, 32, 2, 4)), _rand(62, (2, 32, 2, 4)), None, None)
        _run_attention(mesh, 1, None, "y", case=case, spatial=(0, "x"), kernel_size=5, dilation=2)  # halo
        _run_attention(mesh, 1, None, None, case=_random_qkv(63, (30,), with_add=True), spatial=(0, "x"),
                       kernel_size=5, planned=True)  # halo, uneven shards
        q, k, rpb = _rand(40, (4, 8, 4, 4)), _rand(41, (4, 8, 2, 4)), _rand(42, (4, 5))
        grad = jax.grad(lambda q, k, b: jnp.sum(jnp.sin(jax_na.na1d_qk(q, k, 3, rpb=b))), argnums=(0, 1, 2))
        spec = P("x", None, "y", None)
        sargs = (_put(mesh, q, spec), _put(mesh, k, spec), _put(mesh, rpb, P("y")))
        g, text = _compiled(grad, *sargs)
        for a, b in zip(g, grad(q, k, rpb)):
            _close(a, b, "gspmd qk grad")
        _no_gather(text, what="gspmd qk grad")
    finally:
        jax.config.update("jax_use_shardy_partitioner", True)


@check
def cuda_lowering():
    """The CUDA lowering goes through the partitioner too: the sharded module has the partitioner's
    custom call with its Shardy rule, and the per-device function of every primitive lowers to the
    FFI kernel on the local shapes. Lowering needs only the target names, so no GPU (and no compiled
    kernels: we pretend they exist, as tests/test_lowering.py does)."""
    from jax_na import _ext, primitives
    real, real_target = _ext.has_cuda_kernels, _ext.has_target
    _ext.has_cuda_kernels = lambda: True
    _ext.has_target = lambda name: True
    jax.clear_caches()
    try:
        mesh = _mesh()
        B, X, Y, H, Hkv, D = 4, 6, 5, 4, 2, 4
        f32 = jnp.float32
        q, k, v = _rand(50, (B, X, Y, H, D), f32), _rand(51, (B, X, Y, Hkv, D), f32), _rand(52, (B, X, Y, Hkv, D), f32)
        rpb = _rand(53, (H, 5, 5), f32)
        spec = P("x", None, None, "y", None)
        sq, sk, sv = (_put(mesh, x, spec) for x in (q, k, v))
        srpb = _put(mesh, rpb, P("y"))

        def loss(q, k, v, rpb):
            out = jax_na.na2d(q, k, v, 3, backend="naive")
            w = jax_na.na2d_qk(q, k, 3, rpb=rpb, backend="naive")
            out2 = jax_na.na2d_av(w, v, 3, backend="naive")
            return jnp.sum(out) + jnp.sum(out2)

        g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
        text = jax.jit(g).trace(sq, sk, sv, srpb).lower(lowering_platforms=("cuda",)).as_text()
        n = text.count('@CustomSPMDPartitioning')
        assert n == 6, f"expected the 6 primitives behind the partitioner, found {n}:\n{text}"
        assert text.count("sdy.sharding_rule") >= 6
        assert "jax_na_naive" not in text  # the kernels live inside the partitioned bodies
        # the per-device bodies, as the partitioner builds them, for each primitive
        params = jax_na._checks.window_params(2, (X, Y), 3, head_dim=D)
        W = params.window_size
        sds = lambda shape, s: jax.ShapeDtypeStruct(shape, f32, sharding=NamedSharding(mesh, s))
        Q, K = sds(q.shape, spec), sds(k.shape, spec)
        AK = sds((B, 0, Hkv, D), P("x", None, "y", None))
        O, L = sds((B, X, Y, H, D), spec), sds((B, X, Y, H), P("x", None, None, "y"))
        A = sds((B, X, Y, H, W), spec)
        R = sds(rpb.shape, P("y"))
        operands = {"fwd": (Q, K, K, AK, AK), "bwd": (Q, K, K, AK, AK, O, L, O, L), "qk": (Q, K, R),
                    "qk_bwd": (A, Q, K, R), "av": (A, K), "av_bwd": (O, A, K)}
        for kind, args in operands.items():
            local = na_sharding.LOCAL_PRIMITIVES[kind]
            m, per_device, out_s, arg_s = na_sharding._partition(kind, local, params, "naive", mesh, args)
            out_s = out_s if isinstance(out_s, tuple) else (out_s,)
            assert all(s.is_equivalent_to(a.sharding, len(a.shape)) for s, a in zip(arg_s, args)), (kind, arg_s)
            in_specs = tuple(s.spec for s in arg_s)
            out_specs = tuple(s.spec for s in out_s)
            shard_map = getattr(jax, "shard_map", None) or __import__(
                "jax.experimental.shard_map", fromlist=["shard_map"]).shard_map
            fn = shard_map(lambda *a: per_device(*a) if len(out_s) > 1 else (per_device(*a),), mesh=m,
                           in_specs=in_specs, out_specs=out_specs)
            body = jax.jit(fn).trace(*[jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for a in args]
                                     ).lower(lowering_platforms=("cuda",)).as_text()
            assert f"@jax_na_naive_{kind}(" in body, (kind, body)
            local_q = f"tensor<{B // 4}x{X}x{Y}x{H // 2}x"  # batch / 4, heads / 2 on each device
            assert local_q in body, (kind, local_q, body)
            if kind == "qk_bwd":
                assert "all_reduce" in body  # d_rpb psum over the batch
        # with a leading (vmapped) axis V in front of every operand, unsharded, and the batch on "x": each
        # device folds V into its batch shard (into its heads for qk/qk_bwd) and calls the same kernel
        V = 3
        lead = lambda a: sds((V, *a.shape), P(None, *a.sharding.spec))
        operands = {kind: tuple(lead(a) for a in args) for kind, args in operands.items()}
        for kind, args in operands.items():
            m, per_device, out_s, arg_s = na_sharding._partition(
                kind, na_sharding.LOCAL_PRIMITIVES[kind], params, "naive", mesh, args)
            out_s = out_s if isinstance(out_s, tuple) else (out_s,)
            assert all(s.is_equivalent_to(a.sharding, len(a.shape)) for s, a in zip(arg_s, args)), (kind, arg_s)
            fn = shard_map(lambda *a: per_device(*a) if len(out_s) > 1 else (per_device(*a),), mesh=m,
                           in_specs=tuple(s.spec for s in arg_s), out_specs=tuple(s.spec for s in out_s))
            body = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert f"@jax_na_naive_{kind}(" in body, (kind, body)
            folded = (f"tensor<{B // 4}x{X}x{Y}x{V * H // 2}x" if kind in ("qk", "qk_bwd")
                      else f"tensor<{V * B // 4}x{X}x{Y}x{H // 2}x")
            assert folded in body, (kind, folded, body)
            assert "all_gather" not in body, (kind, body)
        # and a shard_map over the public op lowers straight to the kernel
        shard_map = getattr(jax, "shard_map", None) or __import__(
            "jax.experimental.shard_map", fromlist=["shard_map"]).shard_map
        sm = shard_map(lambda q, k, v: jax_na.na2d(q, k, v, 3, backend="naive"), mesh=mesh,
                       in_specs=(spec,) * 3, out_specs=spec)
        text = jax.jit(sm).trace(sq, sk, sv).lower(lowering_platforms=("cuda",)).as_text()
        assert "@jax_na_naive_fwd(" in text and "CustomSPMDPartitioning" not in text, text
        # the fused kernels the same way (head dim 4 padded to 32 on each device), forward and backward
        bf = lambda x: x.astype(jnp.bfloat16)
        fsm = shard_map(lambda q, k, v: jax_na.na2d(q, k, v, 3, backend="fused"), mesh=mesh,
                        in_specs=(spec,) * 3, out_specs=spec)
        floss = jax.grad(lambda q, k, v: jnp.sum(fsm(q, k, v).astype(f32)), argnums=(0, 1, 2))
        text = jax.jit(floss).trace(bf(sq), bf(sk), bf(sv)).lower(lowering_platforms=("cuda",)).as_text()
        assert "@jax_na_fused_fwd(" in text and "@jax_na_fused_bwd(" in text, text
        assert f"tensor<{B // 4}x{X}x{Y}x{H // 2}x32xbf16>" in text, text
        # and auto under the partitioner: bf16 goes to the fused kernels inside the partitioned bodies
        text = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax_na.na2d(q, k, v, 3).astype(f32)), argnums=(0, 1, 2))
                       ).trace(bf(sq), bf(sk), bf(sv)).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("@CustomSPMDPartitioning") == 2 and "jax_na_fused" not in text, text
        # the halo-exchange bodies (X rows on the 4-way "x" axis, kernel 5): the fused kernels on the
        # extended slab of each static halo (border and interior shards: a switch), ppermutes around.
        # X = 15: uneven, 4-row shards (XLA pads the last one, which holds 3 rows); shard_map cannot
        # split 15 rows, so the body partitioned for 15 rows is traced on 16 (the same 4 per device).
        hspec, lspec = P(None, "x", None, "y", None), P(None, "x", None, "y")
        bf16 = jnp.bfloat16
        sdh = lambda shape, s, dt=bf16: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, s))
        shard_map = getattr(jax, "shard_map", None) or __import__(
            "jax.experimental.shard_map", fromlist=["shard_map"]).shard_map
        # the border shards: 4 own rows + 2 halo; the interior: 2 + 4 + 2; the uneven last one: 2 + 3
        for Xs, slabs in ((16, (6, 8)), (15, (6, 8, 5))):
            params = jax_na._checks.window_params(2, (Xs, Y), 5, head_dim=64)

            def operands(X):
                Q, K = sdh((2, X, Y, H, 64), hspec), sdh((2, X, Y, Hkv, 64), hspec)
                AK = sdh((2, 0, Hkv, 64), P(None, None, "y", None))
                L = sdh((2, X, Y, H), lspec, f32)
                return {"fwd": (Q, K, K, AK, AK), "bwd": (Q, K, K, AK, AK, Q, L, Q, L)}

            for kind, args in operands(Xs).items():
                m, per_device, out_s, arg_s = na_sharding._partition(
                    kind, na_sharding.LOCAL_PRIMITIVES[kind], params, "fused", mesh, args)
                assert all(s.is_equivalent_to(a.sharding, len(a.shape)) for s, a in zip(arg_s, args)), arg_s
                fn = shard_map(per_device, mesh=m, in_specs=tuple(s.spec for s in arg_s),
                               out_specs=tuple(s.spec for s in out_s))
                body = jax.jit(fn).trace(*operands(16)[kind]).lower(lowering_platforms=("cuda",)).as_text()
                assert body.count(f"@jax_na_fused_{kind}(") == 3, (kind, body)  # first, interior, last shard
                assert "collective_permute" in body and "all_gather" not in body, body
                for rows in slabs:
                    assert f"tensor<2x{rows}x{Y}x{H // 2}x64xbf16>" in body, (kind, Xs, rows, body)
        del primitives
    finally:
        _ext.has_cuda_kernels, _ext.has_target = real, real_target
        jax.clear_caches()


def main(names):
    names = names or list(CHECKS)
    failures = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            CHECKS[name]()
        except Exception:  # report every check
            failures += 1
            traceback.print_exc(file=sys.stdout)
            print(f"JAX_NA_CHECK {name} FAIL {time.perf_counter() - t0:.1f}", flush=True)
        else:
            print(f"JAX_NA_CHECK {name} PASS {time.perf_counter() - t0:.1f}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
