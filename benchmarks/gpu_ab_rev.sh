#!/usr/bin/env bash
# The working tree against an earlier revision, on the same GPU in one run: for changes that have
# no environment switch (an AB_ENV group of gpu_campaign.sh is the lighter way where one exists).
#
#   REV=HEAD~1 ROUNDS=2 DEADLINE=560 OUT=/some/dir bash benchmarks/gpu_ab_rev.sh
#
# Builds the 7B checkpoint and this tree's engine (gpu_campaign.sh's bench step), then REV's tree
# in a git worktree with its own engine, sharing the checkpoint and the HF reference, then
# alternates: this tree, REV, this tree, ... ROUNDS times each (bench_gpu.py --only afs with
# BENCH_ARGS, default "--batches 64 --prefill 2048"), so a drift of the GPU's clocks shows as a
# difference between rounds of the same tree. Prints each run's summary rows, labelled.
# The first line printed names both sides: a copy of the checkout may carry a .git whose HEAD lags
# the files, so name REV by hash.
set -u
cd "$(dirname "$0")/.."
REV=${REV:-HEAD~1}
ROUNDS=${ROUNDS:-2}
DEADLINE=${DEADLINE:-560}
OUT=${OUT:-/tmp/afs_ab_rev}
BENCH_ARGS=${BENCH_ARGS:---batches 64 --prefill 2048}
WORK=${WORK:-/tmp/afsw}
BASE_WORK=${WORK}_rev
BASE_TREE=/tmp/afs_rev_tree
export PYTHONPATH=$PWD/python:$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( DEADLINE - $(date +%s) + T0 )); }

rev_id=$(git rev-parse --short "$REV") || { echo "unknown revision $REV"; exit 2; }
echo "this tree: $(git log --oneline -1 | cut -c1-80) + $(git status --short | wc -l) changed files; REV $REV = $rev_id"
rm -rf "$BASE_TREE"; git worktree prune
git worktree add -f --detach "$BASE_TREE" "$REV" > "$OUT/worktree.log" 2>&1 || { cat "$OUT/worktree.log"; exit 2; }

# This tree: checkpoint, HF reference, engine and a first bench (the campaign's bench step).
STEPS=bench ENGINES=afs WORK=$WORK OUT=$OUT/tree_1 DEADLINE=$(( $(left) - 60 )) BENCH_ARGS=$BENCH_ARGS \
  bash benchmarks/gpu_campaign.sh > "$OUT/tree_1.out" 2>&1
mkdir -p "$BASE_WORK"
for f in "$WORK"/ckpt_* "$WORK"/hf_reference_*; do [[ -e "$f" ]] && ln -sfn "$f" "$BASE_WORK/"; done

bench() {  # bench DIR WORKDIR LABEL
  local L; L=$(left)
  (( L > 50 )) || { echo "$3: skipped, out of time"; return; }
  (cd "$1" && PYTHONPATH=$1/python:$1 timeout $(( L - 5 )) python3 benchmarks/bench_gpu.py --only afs --work "$2" \
     --out "$2/bench_$3" --phase-timeout $(( L - 15 )) $BENCH_ARGS > "$OUT/$3.log" 2>&1)
  cp "$2/bench_$3/report.txt" "$OUT/report_$3.txt" 2>/dev/null
}
bench "$BASE_TREE" "$BASE_WORK" "rev_1"  # builds REV's engine first
for r in $(seq 2 "$ROUNDS"); do
  bench "$PWD" "$WORK" "tree_$r"
  bench "$BASE_TREE" "$BASE_WORK" "rev_$r"
done
cp "$WORK/bench/report.txt" "$OUT/report_tree_1.txt" 2>/dev/null

echo
for f in "$OUT"/report_tree_* "$OUT"/report_rev_*; do
  [[ -f "$f" ]] || continue
  label=$(basename "$f" .txt); label=${label#report_}
  sed -n '/^## summary/,/^targets/p' "$f" | grep -E '^(decode|prefill|TTFT)' | sed "s/^/$label  /" | cut -c1-60
done
echo "done at $(( $(date +%s) - T0 )) s"
