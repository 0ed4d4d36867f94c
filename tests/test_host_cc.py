"""The kernels' plain C++ helpers against brute force, compiled with the system C++ compiler and run
on the host (no GPU, no CUDA needed):

- cuda/geometry/test_window.cc: the window geometry (cuda/geometry/window.cuh, shared by every
  kernel), windows and inverse ranges on every axis configuration.
- cuda/fused/test_column_mask.cc: the fused kernels' per-row column words (cuda/fused/column_mask.cuh:
  which of a thread's score columns lie inside a row's window) on every power-of-two tile box of 32,
  64 and 128 keys.
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
