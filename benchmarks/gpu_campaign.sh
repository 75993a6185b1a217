#!/usr/bin/env bash
# One GPU measurement campaign inside a time budget, from the repository root of a checkout on the
# GPU machine (afs need not be installed: the build compiles the runtime from the checkout):
#
#   STEPS=tests,micro,bench,serving DEADLINE=560 OUT=/some/dir bash benchmarks/gpu_campaign.sh
#
# Steps, in this order, each skipped when the budget left is too small for it (MICRO, a comma
# list of linear, linear_check, attention and gemv, picks the micro benches, which compile in the
# background from the start; default linear,attention; LINEAR_ARGS the row counts linear_bench
# times, default "1 2 4 5 8 16 64 128 512 2048"; ATTN_ARGS attention_bench's, e.g. "prefill" for
# its prefill checks and timings alone):
#   tests    pytest -m gpu on TESTS (default tests/; with the 7B checkpoint and engine prepared
#            alongside: nothing is timed while the tests run)
#   micro    linear_bench (every GEMM configuration and cuBLAS, M = 1 .. 2048), attention_bench
#            (decode and prefill attention against a float32 reference) and gemv_bench (the batch-1
#            GEMV's work shape per warp), built with nvcc here
#   bench    bench_gpu.py on the 7B shape (ENGINES, default afs,hf; add torch when the budget
#            allows: its compiles take ~40 s per batch size; BENCH_ARGS added, e.g. "--batches 64")
#   ab       bench_gpu.py --only afs again for each ';'-separated group of environment assignments
#            in AB_ENV (e.g. AB_ENV="AFS_CUDA_SM90_ATTENTION=0;AFS_CUDA_PDL=0"), AB_ARGS added (e.g.
#            "--batches 8 --prefill 2048"): switches measured against the default in the same run
#            on the same GPU
#   serving  bench_serving.py: 256 requests of 512 / 128 tokens at concurrency 64, afs and HF
#            (SERVING_ARGS added, e.g. "--max-batch-tokens 0,320,512,1024" for a budget sweep)
#   script   SCRIPT (a command line) with AFS_CKPT and AFS_ENGINE set to the prepared 7B checkpoint
#            and engine, its output in OUT/script.log (e.g. SCRIPT="python3 benchmarks/host_gap.py")
# Small outputs (env, prep, micro build, linear_bench check, reports) end up in OUT/campaign.log.
# Work files live under WORK (default /tmp/afsw) so a second call on a still-warm machine reuses
# the checkpoint and engine. Logs and reports go under OUT ($OUT on the device tool).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/python:$PWD PYTHONUNBUFFERED=1
STEPS=${STEPS:-tests,micro,bench,serving}
DEADLINE=${DEADLINE:-560}
ENGINES=${ENGINES:-afs,hf}
MICRO=${MICRO:-linear,attention}  # micro: a comma list of linear, linear_check, attention, gemv
WORK=${WORK:-/tmp/afsw}
OUT=${OUT:-/tmp/afs_campaign}
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE - $(date +%s) + T0 )); }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
summary=()

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  git log --oneline -1 2>/dev/null; git status --short 2>/dev/null | head -20; } > "$OUT/env.txt" 2>&1
head -1 "$OUT/env.txt"

# The 7B checkpoint and engine, in the background (bench_gpu.py's own phases, so later steps reuse them).
prep() {
  python3 - "$WORK" > "$OUT/prep.log" 2>&1 <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import bench_gpu as b
work = sys.argv[1]
cfg = b.make_config(b.parse_args(["--only", "afs", "--work", work, "--out", work + "/prep"]))
Path(work, "prep", "logs").mkdir(parents=True, exist_ok=True)
p = Path(work, "prep", "config.json")
p.write_text(json.dumps(cfg, indent=1))
for ph in ("checkpoint", "build"):
    if not b.run_phase(ph, cfg, p).get("ok"):
        sys.exit(f"{ph} failed")
print("CKPT", cfg["checkpoint"])
print("ENGINE", cfg["engine_dir"])
PY
}
PREP=
if want bench || want ab || want serving || want script; then prep & PREP=$!; fi

# The micro benches compile in the background meanwhile (nvcc, CPU only).
micro() { [[ ",$MICRO," == *",$1,"* ]]; }
build_micro() {
  local NV=(nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I include)
  { if micro linear || micro linear_check; then
      "${NV[@]}" benchmarks/linear_bench.cu -lcublas -o /tmp/linear_bench > "$OUT/micro_build_linear.log" 2>&1 & fi
    if micro attention; then
      "${NV[@]}" benchmarks/attention_bench.cu -o /tmp/attention_bench > "$OUT/micro_build_attention.log" 2>&1 & fi
    if micro gemv; then "${NV[@]}" benchmarks/gemv_bench.cu -o /tmp/gemv_bench > "$OUT/micro_build_gemv.log" 2>&1 & fi
    wait; }
}
BUILD=
if want micro; then build_micro & BUILD=$!; fi

if want tests && (( $(left) > 200 )); then
  # TEST_ENV: assignments for the tests alone (e.g. TEST_ENV="AFS_CUDA_SM90_ATTN=ovps").
  # TEST_LIMIT: seconds the tests may take (default 300). TESTS is split on spaces (paths and node
  # ids); a -k expression with spaces goes in TEST_K (e.g. TEST_K="fp8 or long_steps").
  TL=${TEST_LIMIT:-300}
  env ${TEST_ENV:-} timeout $(( $(left) - 60 > TL ? TL : $(left) - 60 )) \
    python3 -m pytest -m gpu ${TESTS:-tests/} ${TEST_K:+-k "$TEST_K"} -q -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  summary+=("tests: $(tail -1 "$OUT/pytest.log") ($(el) s)")
fi
[[ -n "$PREP" ]] && wait $PREP
CK= EN=
if [[ -n "$PREP" ]]; then
  CK=$(grep '^CKPT' "$OUT/prep.log" | cut -d' ' -f2)
  EN=$(grep '^ENGINE' "$OUT/prep.log" | cut -d' ' -f2)
  [[ -n "$EN" ]] || summary+=("prep FAILED: $(tail -2 "$OUT/prep.log" | tr '\n' ' ')")
fi

if want micro && (( $(left) > 120 )); then
  [[ -n "$BUILD" ]] && wait $BUILD
  cat "$OUT"/micro_build_*.log > "$OUT/micro_build.log" 2>/dev/null; rm -f "$OUT"/micro_build_*.log
  if micro linear_check; then
    timeout 90 /tmp/linear_bench check > "$OUT/linear_check.txt" 2>&1
    summary+=("micro: linear_bench check: $(tail -1 "$OUT/linear_check.txt") ($(el) s)")
  fi
  if micro linear; then
    timeout 90 /tmp/linear_bench ${LINEAR_ARGS:-1 2 4 5 8 16 64 128 512 2048} > "$OUT/linear_bench.txt" 2>&1
    summary+=("micro: linear_bench $(grep -c WRONG "$OUT/linear_bench.txt") rows WRONG ($(el) s)")
  fi
  if micro attention; then
    timeout 150 /tmp/attention_bench ${ATTN_ARGS:-} > "$OUT/attention_bench.txt" 2>&1
    summary+=("micro: attention_bench: $(tail -1 "$OUT/attention_bench.txt") ($(el) s)")
  fi
  if micro gemv; then
    timeout 60 /tmp/gemv_bench > "$OUT/gemv_bench.txt" 2>&1
    summary+=("micro: gemv_bench: $(tail -1 "$OUT/gemv_bench.txt") ($(el) s)")
  fi
fi

if want bench && [[ -n "$EN" ]] && (( $(left) > 120 )); then
  L=$(left)
  timeout $(( L - 5 )) python3 benchmarks/bench_gpu.py --only "$ENGINES" --work "$WORK" --out "$WORK/bench" \
    --phase-timeout $(( L - 40 )) ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  rc=$?
  cp "$WORK/bench/report.txt" "$WORK/bench/bench_gpu.json" "$OUT/" 2>/dev/null
  summary+=("bench: rc $rc ($(el) s)")
fi

if want ab && [[ -n "$EN" ]]; then
  # One bench per ';'-separated group of assignments; reports appended to one file (the device
  # tool brings back a limited number of files).
  IFS=';' read -ra groups <<< "${AB_ENV:-}"
  : > "$OUT/report_ab.txt"
  : > "$OUT/bench_ab.log"
  for g in "${groups[@]:-}"; do
    (( $(left) > 60 )) || { summary+=("ab ($g): skipped, out of time"); continue; }
    L=$(left)
    rm -rf "$WORK/bench_ab"
    env $g timeout $(( L - 5 )) python3 benchmarks/bench_gpu.py --only afs --work "$WORK" --out "$WORK/bench_ab" \
      --phase-timeout $(( L - 20 )) ${AB_ARGS:-} >> "$OUT/bench_ab.log" 2>&1
    rc=$?
    { echo "=== with ${g:-no change}"; cat "$WORK/bench_ab/report.txt" 2>/dev/null; } >> "$OUT/report_ab.txt"
    summary+=("ab (${g:-no change}): rc $rc ($(el) s)")
  done
fi

if want script && [[ -n "$EN" ]] && (( $(left) > 30 )); then
  AFS_CKPT=$CK AFS_ENGINE=$EN timeout $(( $(left) - 10 )) bash -c "${SCRIPT:?SCRIPT names the command}" \
    > "$OUT/script.log" 2>&1
  summary+=("script: rc $? ($(el) s)")
fi

if want serving && [[ -n "$EN" ]] && (( $(left) > 150 )); then
  timeout $(( $(left) - 10 )) python3 benchmarks/bench_serving.py --checkpoint "$CK" --engine-dir "$EN" --out "$OUT/serving.json" \
    ${SERVING_ARGS:-} > "$OUT/serving.log" 2>&1
  summary+=("serving: $(grep -E '^(afs|hf)[ /]' "$OUT/serving.log" | tr -s ' ' | tr '\n' ';') $(grep 'afs / hf' "$OUT/serving.log") ($(el) s)")
fi

echo
printf '%s\n' "${summary[@]}"
[[ -f "$OUT/report.txt" ]] && sed -n '/^## summary/,$p' "$OUT/report.txt"
[[ -s "$OUT/report_ab.txt" ]] && sed -n '/^=== with/p; /^## summary/,/^targets/p' "$OUT/report_ab.txt"
echo "done at $(el) s"

# The device tool brings back a limited number of files: the small ones go into campaign.log (the
# reports are also at the end of bench.log and bench_ab.log).
for f in env.txt prep.log micro_build.log linear_check.txt report.txt report_ab.txt serving.json; do
  [[ -f "$OUT/$f" ]] || continue
  { echo "=== $f"; cat "$OUT/$f"; echo; } >> "$OUT/campaign.log"
  rm -f "$OUT/$f"
done
