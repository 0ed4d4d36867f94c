"""What ptxas made of the fused kernels' main loops, from their SASS (no GPU needed).

    python tools/sass_report.py BINARY [--kernel SUBSTRING] [--arch sm_90a]

BINARY: the built extension (jax_na/_C*.so), a cubin or an object file. Needs cuobjdump: the CUDA
toolkit's, or `pip install nvidia-cuda-cuobjdump` (its bin/ on PATH or in $CUOBJDUMP).

For each kernel, each innermost loop that issues MMAs (HGMMA / HMMA) is listed with its size and
the instructions that matter for its rate: MMAs, exponentials (MUFU.EX2), local memory (spills),
PRMT (16-bit repacking), barriers. On Hopper it also flags a full wait on wgmma (WARPGROUP.DEPBAR.LE
gsb0, 0x0) that an exponential follows in the same straight-line code: those exponentials wait for
every product in flight, which they were meant to overlap (ptxas moves a wgmma.wait_group up
through independent instructions of its basic block: see hopper/gemm.cuh, wgmma_wait_in_arm).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")
_KEYS = ("HGMMA", "HMMA", "MUFU.EX2", "LDL", "STL", "PRMT", "BAR", "SYNCS")


def _cuobjdump() -> str:
    exe = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if not exe:
        sys.exit("cuobjdump not found: install the CUDA toolkit's or `pip install nvidia-cuda-cuobjdump`, "
                 "then put it on PATH or set CUOBJDUMP")
    return exe


def kernels(sass: str):
    """(mangled name, [(address, instruction text)]) per function of cuobjdump -sass output."""
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        yield name, [(int(a, 16), t.strip()) for a, t in _INSTR.findall(part)]


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def mma_loops(instrs):
    """Innermost loops (back-edge ranges holding no other back-edge) that issue MMAs."""
    index = {a: i for i, (a, _) in enumerate(instrs)}
    edges = []
    for i, (a, t) in enumerate(instrs):
        m = _BRANCH.search(t)
        if m and int(m.group(1), 16) <= a and int(m.group(1), 16) in index:
            edges.append((index[int(m.group(1), 16)], i))
    inner = [(s, e) for s, e in edges
             if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in edges)]
    return [(s, e) for s, e in sorted(inner) if any("MMA" in t for _, t in instrs[s:e + 1])]


def loop_report(instrs, s, e) -> dict:
    body = instrs[s:e + 1]
    counts = collections.Counter()
    for _, t in body:
        op = _opcode(t)
        for k in _KEYS:
            if op.startswith(k):
                counts[k] += 1
    # Full waits with an exponential after them in the same straight-line code (no branch between).
    early, waiting = 0, False
    for _, t in body:
        op = _opcode(t)
        if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in t:
            waiting = True
        elif op.startswith("BRA"):
            waiting = False
        elif waiting and op.startswith("MUFU.EX2"):
            early, waiting = early + 1, False
    return dict(start=body[0][0], end=body[-1][0], instructions=len(body), counts=dict(counts),
                full_waits_before_exponentials=early)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binary")
    ap.add_argument("--kernel", default="fused", help="substring of the mangled kernel names to report")
    ap.add_argument("--arch", default="sm_90a", help="the SASS to read (cuobjdump -arch)")
    a = ap.parse_args(argv)
    sass = subprocess.run([_cuobjdump(), "-sass", "-arch", a.arch, a.binary], check=True,
                          capture_output=True, text=True).stdout
    seen = set()
    for name, instrs in kernels(sass):
        if a.kernel not in name or name in seen:
            continue
        seen.add(name)
        print(name)
        for s, e in mma_loops(instrs):
            r = loop_report(instrs, s, e)
            warn = (f"  {r['full_waits_before_exponentials']} full wgmma wait(s) AHEAD of exponentials"
                    if r["full_waits_before_exponentials"] else "")
            counts = " ".join(f"{k}={v}" for k, v in sorted(r["counts"].items()))
            print(f"  loop 0x{r['start']:x}-0x{r['end']:x}: {r['instructions']} instructions, {counts}{warn}")
    if not seen:
        print(f"no kernel matches {a.kernel!r} in the {a.arch} SASS of {a.binary}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
