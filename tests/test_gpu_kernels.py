"""The CUDA linear-layer kernels alone on the GPU (pytest -m gpu; skipped without a GPU).

benchmarks/linear_bench.cu's `check` mode runs every path linear() can take (the GEMV, the mma.sync
tiles, and on sm90a every wgmma tile shape x K split with both epilogues, besides what the planner
picks) on odd shapes (K and N not multiples of 64) and the 7B projection shapes, for 1 to 777 rows,
against a naive float32 reference kernel, with the outputs poisoned before each run. The engine
tests see only the shapes and row counts their prompts happen to produce; this sees them all.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from afs_build.compile import find_nvcc
from afs_build.plan import detect_local_arch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]


def test_linear_kernels_match_float32_reference(tmp_path):
    arch = detect_local_arch()  # "sm90a", "sm80", ...
    num = arch[2:]
    binary = tmp_path / "linear_bench"
    build = subprocess.run(
        [find_nvcc(), "-std=c++17", "-O3", "-DAFS_NO_CUBLAS", f"-gencode=arch=compute_{num},code=sm_{num}",
         "-I", str(ROOT / "include"), str(ROOT / "benchmarks" / "linear_bench.cu"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    r = subprocess.run([str(binary), "check"], capture_output=True, text=True, timeout=600)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0, f"{summary}\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    assert " 0 failed" in summary, summary
    if arch == "sm90a":
        assert "sm90a GEMM on" in summary, summary  # the H100 path was the one checked
