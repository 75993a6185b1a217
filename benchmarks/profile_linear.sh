#!/usr/bin/env bash
# Nsight Compute on the sm90a GEMM (H100 / H200, a machine whose runtime lets ncu read the
# counters): for each "shape:M" in CASES (default qkv:384 o_proj:576 gate_up:576 down:576), plan()'s
# configuration with the engine's 16-bit TMA-store epilogue (SwiGLU for gate_up), the same without
# the epilogue's stores, and the loads alone (benchmarks/linear_bench.cu `profile`), with the
# sections that say where the time goes: duration, tensor-pipe and issue utilisation, warp stall
# reasons, memory and L2 traffic.
#
#   OUT=/some/dir bash benchmarks/profile_linear.sh
#
# Writes OUT/linear_ncu.txt (the details) and prints the headline counters of each launch (two per
# variant: the second reads another weight copy than the first). Clocks are left alone
# (--clock-control none), so the timings match linear_bench's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/afs_profile}
CASES=${CASES:-qkv:384 o_proj:576 gate_up:576 down:576}
mkdir -p "$OUT"
nvcc -std=c++17 -O3 -lineinfo -gencode=arch=compute_90a,code=sm_90a -I include -DAFS_NO_CUBLAS \
  benchmarks/linear_bench.cu -o /tmp/linear_bench_prof
: > "$OUT/linear_ncu.txt"
for c in $CASES; do
  ncu --clock-control none --kernel-name regex:gemm_wgmma \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section SchedulerStats --section WarpStateStats --section LaunchStats \
    /tmp/linear_bench_prof profile "${c%%:*}" "${c##*:}" >> "$OUT/linear_ncu.txt" 2>&1 || {
    tail -20 "$OUT/linear_ncu.txt"; exit 1; }
done
grep -E "^profiled|gemm_wgmma|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L2 Hit Rate|Issue Slots Busy|No Eligible|Stall" \
  "$OUT/linear_ncu.txt" | sed -E 's/^ +//' | cut -c1-150 | head -150
