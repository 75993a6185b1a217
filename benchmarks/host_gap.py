"""Where a prefill's wall time goes outside the GPU's kernels: for each prompt length, the wall
time of Engine.generate_full(max_tokens=1) from Python, the engine's own prefill_seconds, and (with
AFS_CUDA_STEP_TIMES=1, set here) the step's host split into metadata, launches and the wait for
the GPU, printed by the engine on stderr. Each length runs back to back and after an idle pause,
so a clock ramp after idle shows as a difference between the two.

    python3 benchmarks/host_gap.py ENGINE_DIR [--lens 128,512,2048,8192] [--repeats 5]

ENGINE_DIR defaults to $AFS_ENGINE (set by gpu_campaign.sh's script step)."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine_dir", nargs="?", default=os.environ.get("AFS_ENGINE"))
    ap.add_argument("--lens", default="128,512,2048,8192")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pause", type=float, default=0.5, help="idle seconds before each run of the 'after idle' set")
    a = ap.parse_args()
    if not a.engine_dir:
        ap.error("no engine directory (argument or $AFS_ENGINE)")
    os.environ.setdefault("AFS_CUDA_STEP_TIMES", "1")  # read when the engine loads
    import afs

    lens = [int(x) for x in a.lens.split(",") if x]
    eng = afs.load(a.engine_dir, max_context=max(lens) + 16, max_batch_tokens=max(lens))
    vocab = eng.vocab_size
    rng = np.random.default_rng(0)
    rows = []
    for T in lens:
        for mode in ("back to back", "after idle"):
            walls, pre = [], []
            eng.generate_full(rng.integers(0, vocab, T).tolist(), max_tokens=1, ignore_eos=True)  # warm-up
            for _ in range(a.repeats):
                ids = rng.integers(0, vocab, T).tolist()
                if mode == "after idle":
                    time.sleep(a.pause)
                print(f"--- T={T} {mode}", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                r = eng.generate_full(ids, max_tokens=1, ignore_eos=True)
                walls.append(time.perf_counter() - t0)
                pre.append(r["prefill_seconds"])
            w, p = statistics.median(walls) * 1e3, statistics.median(pre) * 1e3
            rows.append((T, mode, w, p, T / w * 1e3))
    print(f"{'tokens':>7} {'mode':<13} {'wall ms':>9} {'engine ms':>10} {'outside':>8} {'tok/s':>9}")
    for T, mode, w, p, tps in rows:
        print(f"{T:>7} {mode:<13} {w:>9.3f} {p:>10.3f} {w - p:>8.3f} {tps:>9.0f}")


if __name__ == "__main__":
    main()
