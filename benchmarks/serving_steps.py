"""Where a serving run's wall time goes, step by step: runs the engine binary's concurrent bench
(256 requests of 512 / 128 tokens at concurrency 64 unless told otherwise) with
AFS_CUDA_STEP_TIMES=1, reads each step's line from its stderr (tokens, decode rows, host
metadata / launch times and the wait for the GPU), and prints the steps grouped by their row
count: how many, their mean wall time and their share of the run. The gap between the steps'
sum and the run's seconds is the scheduler's time outside the engine's step.

    python3 benchmarks/serving_steps.py ENGINE_DIR [--kv-cache-dtype auto,fp8] [-- extra bench args]

ENGINE_DIR defaults to $AFS_ENGINE (set by gpu_campaign.sh's script step)."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

STEP = re.compile(
    r"afs step: (\d+) tokens \((\d+) decode\)(, graph)?: metadata (\d+) us, launches (\d+) us, wait (\d+) us")


def bucket(tokens: int, decode: int) -> str:
    """A step's group: decode-only, or its prompt rows rounded up to the next 256."""
    prompt = tokens - decode
    if prompt == 0:
        return "decode only"
    hi = (prompt + 255) // 256 * 256
    return f"prompt {hi - 255}-{hi}"


def summarise(lines: list[str]) -> tuple[list[tuple], float, int]:
    groups: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    total_us = 0.0
    for line in lines:
        m = STEP.search(line)
        if not m:
            continue
        t, d = int(m.group(1)), int(m.group(2))
        wall = sum(int(m.group(i)) for i in (4, 5, 6))
        groups[bucket(t, d)].append((t, d, wall))
        total_us += wall
    rows = []
    for name in sorted(groups, key=lambda k: (k != "decode only", k)):
        g = groups[name]
        n = len(g)
        rows.append((name, n, sum(x[0] for x in g) / n, sum(x[1] for x in g) / n, sum(x[2] for x in g) / n / 1e3,
                     sum(x[2] for x in g) / 1e6))
    return rows, total_us / 1e6, sum(len(g) for g in groups.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine_dir", nargs="?", default=os.environ.get("AFS_ENGINE"))
    ap.add_argument("--kv-cache-dtype", default="auto", help="comma list: one run each")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("extra", nargs="*", help="more afs-engine bench arguments (after --)")
    a = ap.parse_args()
    if not a.engine_dir:
        ap.error("no engine directory (argument or $AFS_ENGINE)")
    binary = Path(a.engine_dir) / "bin" / "afs-engine"
    env = dict(os.environ, AFS_CUDA_STEP_TIMES="1")
    for kv in [x for x in a.kv_cache_dtype.split(",") if x]:
        cmd = [str(binary), "bench", "--concurrency", str(a.concurrency), "--requests", str(a.requests),
               "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens), "--json",
               "--kv-cache-dtype", kv, *a.extra]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
        result = json.loads(p.stdout.strip().splitlines()[-1])
        rows, steps_s, n = summarise(p.stderr.splitlines())
        print(f"## kv {kv}: {result['output_tok_s']:,.0f} output tok/s, {result['seconds']:.3f} s, "
              f"{n} steps summing to {steps_s:.3f} s ({result['seconds'] - steps_s:.3f} s outside the steps)")
        print(f"{'group':<16} {'steps':>6} {'rows':>7} {'decode':>7} {'ms/step':>8} {'seconds':>8} {'share':>6}")
        for name, cnt, rows_mean, dec_mean, ms, sec in rows:
            print(f"{name:<16} {cnt:>6} {rows_mean:>7.0f} {dec_mean:>7.1f} {ms:>8.2f} {sec:>8.3f} "
                  f"{sec / result['seconds']:>6.1%}")


if __name__ == "__main__":
    main()
