"""The kernels' plain C++ helpers against brute force, compiled with the system C++ compiler and run
on the host (no GPU, no CUDA needed):

- cuda/geometry/test_window.cc: the window geometry (cuda/geometry/window.cuh, shared by every
  kernel), windows and inverse ranges on every axis configuration.
- cuda/fused/test_column_mask.cc: the fused kernels' per-row column words (cuda/fused/column_mask.cuh:
  which of a thread's score columns lie inside a row's window) on every power-of-two tile box of 32,
  64 and 128 keys.
- cuda/fused/test_tile_grid.cc: the key-stationary grids' CTA order (cuda/fused/tile_grid.h): CTA
  indices decode to every key tile once, and the order picked is the one the query-span model
  prefers, a bound on the resident CTAs' queries counted one by one.
- cuda/fused/test_smem_layouts.cu: the portable kernels' swizzled shared-memory tiles
  (cuda/fused/kernel_traits.cuh) for every instantiated dtype and head dim: bijective, chunks
  contiguous, ldmatrix reads free of bank conflicts. A host program too, but built with nvcc against
  the CUTLASS/CuTe headers (skipped where either is missing).
"""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (source, lines its output must contain: the verdict and a count showing the whole sweep ran)
HOST_TESTS = [
    ("geometry/test_window.cc", ["test_window: OK", "inverse ranges"]),
    ("fused/test_column_mask.cc", ["test_column_mask: OK", "57818880 column bits checked, 0 wrong"]),
    ("fused/test_tile_grid.cc", ["test_tile_grid: OK", "3000 problems, ", " checks, 0 failed"]),
]


@pytest.mark.parametrize("source,expected", HOST_TESTS, ids=[os.path.basename(s) for s, _ in HOST_TESTS])
def test_host_cc(tmp_path, source, expected):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "test"
    subprocess.run([cxx, "-std=c++17", "-O2", "-I", os.path.join(ROOT, "cuda"), os.path.join(ROOT, "cuda", source),
                    "-o", str(exe)], check=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for line in expected:
        assert line in proc.stdout, proc.stdout[-4000:]


def _nvcc():
    for path in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if path and os.path.exists(path):
            return path
    return None


def _cutlass_include():
    try:
        import cutlass_library
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isdir(path) else None


def test_smem_layouts(tmp_path):
    nvcc, cutlass = _nvcc(), _cutlass_include()
    if nvcc is None or cutlass is None:
        pytest.skip(f"needs nvcc ({nvcc or 'not found'}) and the CUTLASS headers ({cutlass or 'not found'})")
    exe = tmp_path / "test"
    subprocess.run([nvcc, "-std=c++17", "-O1", "--expt-relaxed-constexpr", "-I", os.path.join(ROOT, "cuda"),
                    "-isystem", cutlass, os.path.join(ROOT, "cuda", "fused", "test_smem_layouts.cu"), "-o", str(exe)],
                   check=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "test_smem_layouts: OK" in proc.stdout and "199680 elements checked, 0 wrong" in proc.stdout, proc.stdout
