"""jax_na demo: train the DiNAT example briefly on scikit-learn's digits with the best backend
available here, then print the profiler table for one problem (every backend and dense self attention).

    python demo.py [--steps 500] [--backend NAME] [--problem ID]

The training is examples/train.py (model ``dinat_tiny32`` from examples/nat.py); the table is
``python -m jax_na.profile`` (p4-nat-small on a GPU, a small 2-D problem on a CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import jax_na  # noqa: E402
import jax_na.profile  # noqa: E402
import train  # noqa: E402  (examples/train.py)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--backend", default=None, help="default: automatic (the fastest here)")
    ap.add_argument("--problem", default=None, help="profiler problem (default: p4-nat-small on a GPU, "
                                                    "cpu-small elsewhere)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    on_gpu = any(d.platform == "gpu" for d in jax.devices())
    print(f"== jax {jax.__version__} on {jax.devices()[0].device_kind if on_gpu else 'CPU'}; jax_na "
          f"{jax_na.__version__}, backends here: {', '.join(jax_na.available_backends())} "
          f"(the automatic choice picks the fastest)")
    print("\n== 1. DiNAT on digits (examples/train.py)")
    targs = train.build_parser().parse_args(["--steps", str(a.steps)]
                                            + (["--backend", a.backend] if a.backend else []))
    acc = train.train(targs)
    print(f"\n== 2. profiler table (python -m jax_na.profile)")
    problem = a.problem or ("p4-nat-small" if on_gpu else "cpu-small")
    jax_na.profile.main(["--problem", problem, "--no-progress"])
    print(f"\n== done in {time.perf_counter() - t0:.0f} s: DiNAT test accuracy on digits {acc * 100:.1f}%")
    return acc


if __name__ == "__main__":
    main()
