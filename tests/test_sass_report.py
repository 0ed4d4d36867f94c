"""tools/sass_report.py on literal SASS (no cuobjdump, no GPU): the MMA loops it finds and the full
wgmma waits it flags (a wait that exponentials follow in straight-line code)."""
import os
import runpy

import pytest

TOOL = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "tools", "sass_report.py"))


def _sass(body: str) -> str:
    lines = [t.strip() for t in body.strip().splitlines()]
    return "\n\tFunction : _Zkernel\n" + "\n".join(
        f"        /*{16 * i:04x}*/                   {t} ;" for i, t in enumerate(lines)) + "\n"


# A loop (0x10 .. back-edge) whose P.V wait comes right after S, ahead of the exponentials.
EARLY = """
MOV R1, R2
HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT, gsb0
HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR16].tnspB, R88, gsb0
WARPGROUP.DEPBAR.LE gsb0, 0x1
WARPGROUP.DEPBAR.LE gsb0, 0x0
FMNMX R13, R4, R30, !PT
MUFU.EX2 R14, R14
MUFU.EX2 R16, R16
PRMT R40, R44, 0x7632, R40
@!P0 BRA 0x10
EXIT
"""
# The same loop with the wait in both arms of a branch after the exponentials.
IN_ARMS = """
MOV R1, R2
HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT, gsb0
HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR16].tnspB, R88, gsb0
WARPGROUP.DEPBAR.LE gsb0, 0x1
FMNMX R13, R4, R30, !PT
MUFU.EX2 R14, R14
MUFU.EX2 R16, R16
@P0 BRA 0xa0
WARPGROUP.DEPBAR.LE gsb0, 0x0
BRA 0xc0
WARPGROUP.DEPBAR.LE gsb0, 0x0
FMUL R88, R88, R0
@!P0 BRA 0x10
EXIT
"""


@pytest.mark.parametrize("body,early,n", [(EARLY, 1, 9), (IN_ARMS, 0, 12)])
def test_loops_and_early_waits(body, early, n):
    [(name, instrs)] = list(TOOL["kernels"](_sass(body)))
    assert name == "_Zkernel"
    [(s, e)] = TOOL["mma_loops"](instrs)
    r = TOOL["loop_report"](instrs, s, e)
    assert (r["start"], r["instructions"]) == (0x10, n)
    assert r["full_waits_before_exponentials"] == early
    assert r["counts"]["HGMMA"] == 2 and r["counts"]["MUFU.EX2"] == 2
    assert r["counts"].get("PRMT", 0) == (1 if body is EARLY else 0)


def test_loop_without_mma_is_not_reported():
    body = "MOV R1, R2\nIADD3 R1, R1, 1, RZ\n@!P0 BRA 0x0\nEXIT"
    [(_, instrs)] = list(TOOL["kernels"](_sass(body)))
    assert TOOL["mma_loops"](instrs) == []
