"""Serving throughput of afs beside HF transformers, in one run on one GPU.

    # on the GPU machine, after bench_gpu.py made the checkpoint and the engine (same --work)
    PYTHONPATH=$PWD/python:$PWD python3 benchmarks/bench_serving.py --checkpoint CKPT --engine-dir ENGINE

afs: the engine binary's continuous-batching benchmark (`afs-engine bench --concurrency C
--requests R --prompt-tokens P --gen-tokens G --json`): R requests with prompts of 0.5-1.5 x P
random tokens, G output tokens each (EOS ignored), at most C in flight; output tok/s, TTFT and
inter-token percentiles.
hf: transformers generate (bf16, SDPA) on static batches of C requests of P-token prompts, G new
tokens each, R / C batches back to back; output tok/s. The static batch is how HF serves a batch
of this size; it gets no credit or penalty for arrival times.

--max-batch-tokens B1,B2,... runs afs once per per-step token budget (decode tokens + prompt
chunks; 0: the engine's default), each a row of the table: how the chunked-prefill budget trades
throughput against inter-token latency. --kv-cache-dtype auto,fp8 runs each of those with the
default and with the fp8 K/V cache.

Prints one table with the ratio afs / hf. Results also go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run_afs(engine_dir: Path, a: argparse.Namespace, max_batch_tokens: int = 0, kv_cache_dtype: str = "auto") -> dict:
    binary = engine_dir / "bin" / "afs-engine"
    if not binary.exists():
        found = sorted(engine_dir.rglob("afs-engine"))
        if not found:
            raise SystemExit(f"no afs-engine binary under {engine_dir}")
        binary = found[0]
    cmd = [str(binary), "bench", "--concurrency", str(a.concurrency), "--requests", str(a.requests),
           "--prompt-tokens", str(a.prompt), "--gen-tokens", str(a.gen), "--json"]
    if max_batch_tokens > 0:
        cmd += ["--max-batch-tokens", str(max_batch_tokens)]
    if kv_cache_dtype != "auto":
        cmd += ["--kv-cache-dtype", kv_cache_dtype]
    print("afs:", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if p.returncode != 0:
        raise SystemExit(f"afs-engine bench failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def run_hf(checkpoint: str, a: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map="cuda").eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def batch() -> torch.Tensor:
        return torch.randint(0, vocab - 3, (a.concurrency, a.prompt), generator=g).cuda()

    def generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=vocab - 3)

    generate(batch(), 4)  # warm-up
    torch.cuda.synchronize()
    n_batches = max(1, a.requests // a.concurrency)
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(n_batches):
        ids = batch()
        out = generate(ids, a.gen)
        tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return {"batches": n_batches, "batch": a.concurrency, "seconds": secs, "output_tok_s": tokens / secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the HF checkpoint the engine was built from")
    ap.add_argument("--engine-dir", required=True, help="afs-build output directory")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--only", default="afs,hf")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="comma list of afs-engine --kv-cache-dtype values (auto, fp8: e4m3 K/V), one run each")
    ap.add_argument("--max-batch-tokens", default="0",
                    help="comma list of afs per-step token budgets, one run each (0: the engine's default)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", help="JSON results file")
    a = ap.parse_args()
    only = set(a.only.split(","))
    try:
        budgets = [int(b) for b in a.max_batch_tokens.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--max-batch-tokens: a comma list of integers, got {a.max_batch_tokens!r}")
    if not budgets or any(b < 0 for b in budgets):
        ap.error(f"--max-batch-tokens: budgets >= 0 (0: the engine's default), got {a.max_batch_tokens!r}")
    kv_dtypes = [k.strip() for k in a.kv_cache_dtype.split(",") if k.strip()]
    if not kv_dtypes or any(k not in ("auto", "fp8") for k in kv_dtypes):
        ap.error(f"--kv-cache-dtype: a comma list of auto and fp8, got {a.kv_cache_dtype!r}")
    res: dict = {"concurrency": a.concurrency, "requests": a.requests, "prompt": a.prompt, "gen": a.gen}
    runs: list[tuple[str, dict]] = []
    if "afs" in only:
        for kv in kv_dtypes:
            for b in budgets:
                r = run_afs(Path(a.engine_dir), a, b, kv)
                r["max_batch_tokens"], r["kv_cache_dtype"] = b, kv
                label = "afs" + ("" if len(budgets) == 1 else f"/{b or 'default'}") + ("" if kv == "auto" else f"/{kv}")
                runs.append((label, r))
                print(f"{label}:", json.dumps(r), flush=True)
        res["afs"] = max((r for _, r in runs), key=lambda r: r["output_tok_s"])
        if len(runs) > 1:
            res["afs_runs"] = [r for _, r in runs]
    if "hf" in only:
        res["hf"] = run_hf(a.checkpoint, a)
        print("hf:", json.dumps(res["hf"]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"\n## serving: {a.requests} requests, {a.prompt} prompt / {a.gen} output tokens, concurrency {a.concurrency}")
    print(f"{'engine':8s} {'output tok/s':>13s} {'TTFT p50/p99 ms':>17s} {'ITL p50/p99 ms':>16s}")
    for label, r in runs:
        print(f"{label:12s} {r['output_tok_s']:9,.0f} {r['ttft_ms']['p50']:8.1f}/{r['ttft_ms']['p99']:<8.1f}"
              f" {r['itl_ms']['p50']:7.2f}/{r['itl_ms']['p99']:<8.2f}  failed {r['failed']}, {r.get('steps', '?')} steps")
    if "hf" in res:
        print(f"{'hf':8s} {res['hf']['output_tok_s']:13,.0f}   (static batches of {a.concurrency})")
    if "afs" in res and "hf" in res:
        best = "" if len(runs) == 1 else (f" (the best run: budget {res['afs']['max_batch_tokens'] or 'default'}, "
                                          f"K/V {res['afs']['kv_cache_dtype']})")
        print(f"afs / hf: {res['afs']['output_tok_s'] / res['hf']['output_tok_s']:.2f}x{best}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
