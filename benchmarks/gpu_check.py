"""GPU correctness + speed report for CUDA engines, in one device run.

    python benchmarks/gpu_check.py --out $OUT            # all cases
    python benchmarks/gpu_check.py --cases tiny          # quick: the tiny shapes only

For each case it makes a random-weight OLMo 2 checkpoint with transformers on the GPU (seeded),
builds an sm90a engine (afs_build, from this checkout), then, against HF transformers in the same
process: prompt logits vs HF bf16 and HF fp32 (relative error ||a - b|| / ||b||), 64 greedy tokens
under vLLM's top-5 rule, CUDA-graph vs eager tokens, and prefill / decode speed and load time.
Prints a table last. Correctness is checked before anything is timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "python")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

CASES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "mha_hd64": (256, 2, 4, 4, 704, 1024),
    "gqa2_hd64": (512, 2, 8, 4, 1376, 1024),
    "gqa4_hd128": (1024, 2, 8, 2, 2816, 1024),
    "gqa5_hd128": (1280, 2, 10, 2, 3456, 1024),
    "olmo2_32b_4layers": (5120, 4, 40, 8, 27648, 100352),
    "olmo2_7b": (4096, 32, 32, 32, 11008, 100352),
}


def make_checkpoint(name: str, out: Path) -> Path:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    hidden, layers, heads, kv, inter, vocab = CASES[name]
    cfg = Olmo2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      rope_theta=500000.0, rms_norm_eps=1e-6, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                      pad_token_id=vocab - 3)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Olmo2ForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    path = out / f"ckpt_{name}"
    model.save_pretrained(path, max_shard_size="4GB")
    del model
    return path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def top5_rule(ours: list[int], ref: list[int], ours_logits: np.ndarray | None, ref_logits: torch.Tensor) -> tuple[bool, int]:
    """vLLM's rule: equal up to the first divergence, where each token is in the other's top-5.
    Returns (passes, number of leading tokens that agree)."""
    n = 0
    while n < min(len(ours), len(ref)) and ours[n] == ref[n]:
        n += 1
    if n == min(len(ours), len(ref)):
        return True, n
    ref_top = torch.topk(ref_logits[n].float(), 5).indices.tolist()
    ok = ours[n] in ref_top
    if ours_logits is not None:
        ok = ok and ref[n] in np.argsort(-ours_logits[n])[:5].tolist()
    return ok, n


def run_case(name: str, work: Path, rows: list[dict]) -> None:
    import afs
    from afs_build.cli import build_engine
    from transformers import Olmo2ForCausalLM

    t0 = time.time()
    ckpt = make_checkpoint(name, work)
    t_ckpt = time.time() - t0
    res = build_engine(str(ckpt), arch="sm90a", dtype="bf16", output=work / f"engine_{name}", quiet=True, force=True)
    t_build = res.seconds
    vocab = CASES[name][5]
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, vocab - 3, 256).tolist()

    hf = Olmo2ForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        ref_bf16 = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
        gen_prompt = prompt[:32]
        hf_out = hf.generate(torch.tensor([gen_prompt], device="cuda"), max_new_tokens=64, min_new_tokens=64,
                             do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
        hf_tokens = hf_out.sequences[0, 32:].tolist()
        hf_step_logits = torch.stack([l[0] for l in hf_out.logits])
    hf = hf.float()
    with torch.no_grad():
        ref_fp32 = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
    del hf
    gc.collect()
    torch.cuda.empty_cache()

    t0 = time.time()
    # An explicit pool: the default takes 90% of the GPU, and a second engine is loaded below.
    eng = afs.load(work / f"engine_{name}", kv_blocks=1024)
    t_load = time.time() - t0
    ours = torch.from_numpy(eng.score(prompt)).cuda()
    err_bf16 = rel(ours, ref_bf16)
    err_fp32 = rel(ours, ref_fp32)
    hf_err_fp32 = rel(ref_bf16, ref_fp32)
    afs_tokens = eng.generate(gen_prompt, max_tokens=64, ignore_eos=True)
    # Our logits along our own greedy path, for the reverse top-5 check.
    our_path_logits = eng.score(gen_prompt + afs_tokens[:-1])[31:]
    ok5, agree = top5_rule(afs_tokens, hf_tokens, our_path_logits, hf_step_logits)
    eng_eager = afs.load(work / f"engine_{name}", cuda_graphs=False, kv_blocks=1024)
    eager_tokens = eng_eager.generate(gen_prompt, max_tokens=64, ignore_eos=True)
    del eng_eager
    graphs_equal = eager_tokens == afs_tokens

    # Speed (after correctness): prefill 2048 (or 512 on small), decode 128 tokens after a 128 prompt.
    bp = eng.bench(prompt_tokens=2048, gen_tokens=8, warmup=1)
    bd = eng.bench(prompt_tokens=128, gen_tokens=128, warmup=1)
    rows.append({
        "case": name, "rel_err_vs_hf_bf16": err_bf16, "rel_err_vs_hf_fp32": err_fp32, "hf_bf16_vs_fp32": hf_err_fp32,
        "greedy_agree": agree, "top5_rule": ok5, "graph_eq_eager": graphs_equal,
        "prefill_tok_s_2048": bp["prefill_tok_s"], "decode_tok_s": bd["decode_tok_s"], "load_s": t_load,
        "ckpt_s": t_ckpt, "build_s": t_build,
    })
    print(json.dumps(rows[-1]), flush=True)
    del eng
    gc.collect()
    shutil.rmtree(ckpt, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="all", help="comma list, 'tiny' or 'all'")
    ap.add_argument("--out", default="/tmp/afs_gpu_check")
    args = ap.parse_args()
    names = list(CASES) if args.cases == "all" else (
        [n for n in CASES if CASES[n][5] < 100000] if args.cases == "tiny" else args.cases.split(","))
    work = Path("/tmp/afs_gpu_work")
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for n in names:
        try:
            run_case(n, work, rows)
        except Exception as e:  # keep going: report every case
            import traceback

            traceback.print_exc()
            rows.append({"case": n, "error": f"{type(e).__name__}: {e}"[:200]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d')}")
    hdr = f"{'case':<20} {'err/bf16':>9} {'err/fp32':>9} {'hf b/f':>8} {'agree':>5} {'top5':>5} {'graph':>5} {'prefill/s':>10} {'decode/s':>9} {'load s':>7}"
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<20} ERROR {r['error']}")
            continue
        print(f"{r['case']:<20} {r['rel_err_vs_hf_bf16']:9.2e} {r['rel_err_vs_hf_fp32']:9.2e} {r['hf_bf16_vs_fp32']:8.2e} "
              f"{r['greedy_agree']:5d} {str(r['top5_rule']):>5} {str(r['graph_eq_eager']):>5} "
              f"{r['prefill_tok_s_2048']:10.0f} {r['decode_tok_s']:9.1f} {r['load_s']:7.2f}")


if __name__ == "__main__":
    main()
