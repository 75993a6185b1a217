#!/usr/bin/env bash
# Builds the libFuzzer harnesses with ASan + UBSan and runs each for N seconds (default 60).
#
#   fuzz/run.sh            # every target, 60 s each
#   fuzz/run.sh 20         # 20 s each (CI)
#   fuzz/run.sh 600 json   # one target for 10 minutes
#
# Needs clang++ with libFuzzer (Debian/Ubuntu: apt-get install clang). Work files go to
# fuzz/build/ (git-ignored): the binaries, the data files they read, the corpus each run grows
# (fuzz/build/corpus/<target>/, seeded from the checked-in fuzz/corpus/<target>/) and crash
# artifacts (fuzz/build/crashes/). Exits non-zero if any target finds a crash, leak, timeout or
# sanitizer report. See fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift || true
if (( $# )); then TARGETS=("$@"); else TARGETS=(engine_file json tokenizer tokenizer_json); fi
CXX=${AFS_FUZZ_CXX:-clang++}
B=fuzz/build
mkdir -p "$B/obj" "$B/data" "$B/crashes"

if ! command -v "$CXX" >/dev/null; then
  echo "fuzz: $CXX not found (apt-get install clang)" >&2
  exit 1
fi

# The data files the harnesses read (the demo tokenizer, made locally).
PYTHONPATH=python:. python fuzz/make_corpus.py --data "$B/data"

FLAGS=(-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
       -Iinclude -Ifuzz)
RUNTIME=(engine_file tokenizer tokenizer_pretokenize tokenizer_chat)
OBJS=()
for src in "${RUNTIME[@]}"; do OBJS+=("$B/obj/$src.o"); done
build_start=$(date +%s)
# Runtime objects, compiled once for all harnesses (two at a time: this is a small machine).
pids=()
for src in "${RUNTIME[@]}"; do
  obj="$B/obj/$src.o"
  if [[ ! -f $obj || src/runtime/$src.cpp -nt $obj || -n $(find include -newer "$obj" -name '*.h' -print -quit) ]]; then
    "$CXX" "${FLAGS[@]}" -fsanitize=fuzzer-no-link -c "src/runtime/$src.cpp" -o "$obj" &
    pids+=($!)
    if (( ${#pids[@]} >= 2 )); then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
pids=()
for t in "${TARGETS[@]}"; do
  "$CXX" "${FLAGS[@]}" -fsanitize=fuzzer "fuzz/${t}_fuzzer.cpp" "${OBJS[@]}" -o "$B/${t}_fuzzer" &
  pids+=($!)
  if (( ${#pids[@]} >= 2 )); then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
echo "fuzz: built ${#TARGETS[@]} targets in $(( $(date +%s) - build_start )) s"

declare -A MAX_LEN=([engine_file]=16384 [json]=4096 [tokenizer]=4096 [tokenizer_json]=8192)
failed=()
for t in "${TARGETS[@]}"; do
  mkdir -p "$B/corpus/$t"
  log="$B/$t.log"
  echo "fuzz: $t for ${SECONDS_EACH} s"
  set +e
  AFS_FUZZ_DATA="$B/data" ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$B/${t}_fuzzer" "$B/corpus/$t" "fuzz/corpus/$t" -max_total_time="$SECONDS_EACH" -timeout=10 \
    -rss_limit_mb=2048 -max_len="${MAX_LEN[$t]}" -print_final_stats=1 -artifact_prefix="$B/crashes/$t-" \
    -dict="fuzz/json.dict" >"$log" 2>&1
  rc=$?
  set -e
  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+ +DONE" "$log" | sed "s/^/  /" || true
  if (( rc != 0 )); then
    failed+=("$t")
    echo "fuzz: $t FAILED (exit $rc); last lines of $log:" >&2
    tail -n 40 "$log" >&2
  fi
done
if (( ${#failed[@]} )); then
  echo "fuzz: failures in: ${failed[*]} (inputs in $B/crashes/)" >&2
  exit 1
fi
echo "fuzz: ${#TARGETS[@]} targets ran ${SECONDS_EACH} s each with no findings"
