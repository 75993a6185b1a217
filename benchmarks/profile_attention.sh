#!/usr/bin/env bash
# Nsight Compute on the sm90a prefill attention (H100 / H200, a machine whose runtime lets ncu read
# the counters): one launch of each sm90a variant of benchmarks/attention_bench.cu at TOKENS
# (default 4096; causal, one sequence, 32 heads of 128), with the sections that say where a tile's
# time goes: tensor-pipe and issue utilisation, warp stall reasons, memory and L2 traffic.
#
#   OUT=/some/dir bash benchmarks/profile_attention.sh
#
# Writes OUT/attention_ncu.txt (the details) and prints the headline counters of each launch. Clocks are left
# alone (--clock-control none), so the timings match attention_bench's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/afs_profile}
TOKENS=${TOKENS:-4096}
mkdir -p "$OUT"
nvcc -std=c++17 -O3 -lineinfo -gencode=arch=compute_90a,code=sm_90a -I include benchmarks/attention_bench.cu \
  -o /tmp/attention_bench_prof
# Every launch (two per variant: read the second of each, the first warms the caches up).
ncu --clock-control none --kernel-name regex:attention_prefill_wgmma \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section SchedulerStats --section WarpStateStats --section LaunchStats --section Occupancy \
  /tmp/attention_bench_prof profile "$TOKENS" > "$OUT/attention_ncu.txt" 2>&1 || {
  tail -20 "$OUT/attention_ncu.txt"; exit 1; }
grep -E "attention_prefill_wgmma|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L2 Hit Rate|Issue Slots Busy|No Eligible|Stall|Achieved Occupancy" \
  "$OUT/attention_ncu.txt" | sed -E 's/^ +//' | head -120
