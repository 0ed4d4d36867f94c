"""Bytes communicated per training step by spatially sharded neighborhood attention: the halo
exchange (jax_na/sharding.py) against gathering the spatial axis, read from the compiled HLO.

Runs on the devices it finds; on a CPU it forces 8 host devices. The problems are p6-flux and p8-video
of BENCHMARKS.md scaled down (fewer tokens, heads and head dims, the same window-to-shard geometry
class) so they compile in seconds on a CPU. One step is forward + backward of ``sum(out)`` w.r.t.
q, k, v, with the batch over a 2-way mesh axis and one spatial axis over a 4-way one (or two spatial
axes over 2 x 2).

    python benchmarks/sharding_comm.py [--json out.json]

The bytes are the sizes of the results of the collective ops (all-gather, collective-permute,
all-reduce, reduce-scatter, all-to-all) of one device's program, i.e. what each device receives.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jax_na  # noqa: E402
from jax_na import sharding as na_sharding  # noqa: E402

# name: (rank, spatial shape, kernel, heads, head dim, sharded spatial axes); scaled from BENCHMARKS.md.
# One sharded axis: 4-way ("space"); two: 2 x 2 ("space0", "space1").
PROBLEMS = {
    "p6-flux/4": (2, (64, 64), (20, 20), 4, 32, (0,)),          # 256x256, k 80x80, 24 heads, D 128
    "p6-flux/2x2": (2, (64, 64), (20, 20), 4, 32, (0, 1)),      # the same, rows and columns sharded
    "p8-video/2": (3, (15, 24, 40), (9, 12, 12), 4, 32, (2,)),  # 30x48x80, k 18x24x24, 24 heads, D 128
}
COLLECTIVES = ("all-gather", "collective-permute", "all-reduce", "reduce-scatter", "all-to-all")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def collective_bytes(hlo: str) -> dict:
    """Bytes of the results of each kind of collective op in an optimized HLO module's text."""
    out = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo.splitlines():
        m = re.search(r"= \(?([a-z]+\d*)\[([\d,]*)\][^=]*? (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if m:
            dims = [int(d) for d in m.group(2).split(",") if d]
            n = 1
            for d in dims:
                n *= d
            out[m.group(3)] += n * _BYTES.get(m.group(1), 4)
    return out


def step_bytes(problem, halo: bool, batch=2, dtype=jnp.bfloat16):
    rank, S, ks, H, D, axes = problem
    n = len(jax.devices())
    if len(axes) == 1:
        mesh, names = jax.make_mesh((2, n // 2), ("data", "space")), ("space",)
    else:
        names = tuple(f"space{i}" for i in range(len(axes)))
        mesh = jax.make_mesh((2, *([2] * (len(axes) - 1)), n // 2 ** len(axes)), ("data", *names))
    spatial = [None] * rank
    for axis, name in zip(axes, names):
        spatial[axis] = name
    sharding = NamedSharding(mesh, P("data", *spatial, None, None))
    x = jax.ShapeDtypeStruct((batch, *S, H, D), dtype, sharding=sharding)
    na = {1: jax_na.na1d, 2: jax_na.na2d, 3: jax_na.na3d}[rank]
    grad = jax.grad(lambda q, k, v: jnp.sum(na(q, k, v, ks).astype(jnp.float32)), argnums=(0, 1, 2))
    na_sharding.HALO_EXCHANGE = halo
    try:
        jax.clear_caches()
        text = jax.jit(grad).lower(x, x, x).compile().as_text()
    finally:
        na_sharding.HALO_EXCHANGE = True
    return collective_bytes(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    import warnings
    warnings.simplefilter("ignore", UserWarning)  # the gather fallback's warning is expected here
    rows = {}
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}; mesh data=2 x space="
          f"{len(jax.devices()) // 2} (or 2 x 2 for two axes); bytes received per device per step (fwd+bwd, bf16)")
    print(f"{'problem':<14} {'halo exchange':>14} {'gather':>14} {'ratio':>8}")
    for name, problem in PROBLEMS.items():
        halo, gather = step_bytes(problem, True), step_bytes(problem, False)
        h, g = sum(halo.values()), sum(gather.values())
        rows[name] = dict(halo=halo, gather=gather)
        print(f"{name:<14} {h:>14,} {g:>14,} {g / max(h, 1):>7.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
