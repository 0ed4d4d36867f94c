"""The problem-set benchmark: ``python -m jax_na.profile --problem all`` (kept for old commands).

All timing, metrics and the problem table live in jax_na/profile.py; this only changes the default
to the whole problem set. Usage: python benchmarks/bench.py [--problems p2-2d,p4-nat-small]
[--backends naive,reference] [--dtype bfloat16] [--modes fwd,fwdbwd] [--json out.json] [--plot out.png]
"""

import sys

from jax_na.profile import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a.split("=")[0] in ("--problem", "--problems", "--spatial", "--list") for a in argv):
        argv = ["--problem", "all", *argv]
    sys.exit(main(argv))
