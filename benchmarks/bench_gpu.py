"""Single-GPU speed of afs against HF transformers and a torch.compile baseline, in one run.

    # on the GPU machine, from the repository root (afs is not installed there: the build compiles
    # the runtime from this checkout)
    PYTHONPATH=$PWD/python:$PWD python3 benchmarks/bench_gpu.py --out $OUT            # OLMo-2-1124-7B shape
    PYTHONPATH=$PWD/python:$PWD python3 benchmarks/bench_gpu.py --quick --out $OUT    # 4 layers, short
    PYTHONPATH=$PWD/python:$PWD python3 benchmarks/bench_gpu.py --only afs,torch      # a subset
    # on a CPU machine, to exercise the harness: a tiny model, the afs CPU engine
    PYTHONPATH=$PWD/python:$PWD python3 benchmarks/bench_gpu.py --device cpu --tiny --quick

On an OLMo-2-1124-7B-shaped bf16 checkpoint with random weights (made on the benchmark device by
transformers, seeded, kept under --work), three engines:
  afs    the engine afs_build builds for this device (--arch, auto-detected), loaded with afs.load;
  hf     transformers AutoModelForCausalLM, bf16, attn_implementation="sdpa", model.generate;
  torch  torch_baseline.py: plain-torch OLMo 2 over the HF weights, static KV cache, decode step
         compiled with torch.compile(mode="reduce-overhead"), i.e. replayed as a CUDA graph.
Each runs in its own process (bench_gpu_phases.py), so its peak memory is its own. Correctness
comes first: afs and the torch baseline are compared with HF bf16 on a 128-token prompt (prompt
logits, ||a - b|| / ||b||, and 32 greedy tokens under vLLM's top-5 rule); an engine that disagrees
is not timed. Then, per engine: TTFT (128-token prompt), prefill tok/s at 512 / 2048 / 8192 tokens,
decode tok/s at batch 1, 8 and 64 (128-token prompts, 256 new tokens, EOS ignored, prefill
subtracted), peak device memory. The same run measures device-to-device copy bandwidth and the
bf16 matmul rate; from them and the model's shape come the floors (decode: bytes read per step /
copy bandwidth; prefill: FLOPs / matmul rate). Last: afs's batch-1 decode step kernel by kernel
(torch.profiler / CUPTI), and a summary with every afs figure as a ratio to each peer and to the floor.

Output: the console; --out gets report.txt, bench_gpu.json, logs/<phase>.log, traces/*.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for p in (HERE, ROOT / "python", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from kernel_profile import format_breakdown  # noqa: E402

SHAPES = {
    # OLMo-2-1124-7B (config.json of allenai/OLMo-2-1124-7B)
    "olmo2_7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=100352,
                     rope_theta=500000.0, eps=1e-6),
    # a few-MB model with GQA, for trying the harness on a CPU
    "tiny": dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=704, vocab=2048, rope_theta=500000.0,
                 eps=1e-6),
}
ENGINES = ("afs", "hf", "torch")


def model_counts(s: dict, kv_value_bytes: int = 2) -> dict:
    """Parameter and byte counts of an OLMo 2 shape (bf16 weights; K/V of kv_value_bytes a value:
    2, or 1 with the fp8 K/V cache)."""
    H, I, V, L = s["hidden"], s["intermediate"], s["vocab"], s["layers"]
    hd = H // s["heads"]
    QD, KVD = s["heads"] * hd, s["kv_heads"] * hd
    matmul = H * QD + 2 * H * KVD + QD * H + 3 * H * I  # per layer
    per_layer = matmul + QD + KVD + 2 * H  # + q_norm, k_norm, two block norms
    return {
        "params": L * per_layer + 2 * V * H + H,
        "matmul_params_per_layer": matmul,
        # a decode step reads every weight except the embedding table (one row per token)
        "decode_weight_bytes": 2 * (L * per_layer + V * H + H),
        "all_weight_bytes": 2 * (L * per_layer + 2 * V * H + H),
        "kv_bytes_per_token": L * 2 * KVD * kv_value_bytes,
    }


def prefill_flops(s: dict, c: dict, T: int) -> float:
    """FLOPs of a T-token prefill from position 0, logits for the last token only: the projections,
    causal attention (QK^T and PV over T(T+1)/2 pairs per head) and one lm_head row."""
    hd = s["hidden"] // s["heads"]
    return (2.0 * s["layers"] * c["matmul_params_per_layer"] * T + 2.0 * s["vocab"] * s["hidden"]
            + 2.0 * s["layers"] * s["heads"] * hd * T * (T + 1))


def floors(cfg: dict, fl: dict) -> dict:
    """Best possible figures on this device at the measured copy bandwidth and matmul rate."""
    s, c = cfg["shape"], cfg["counts"]
    bw, mm = fl["copy_bytes_per_s"], fl["matmul_flop_per_s"]
    P, N = cfg["prompt"], cfg["new_tokens"]

    def prefill_time(T: int) -> float:
        bytes_ = c["decode_weight_bytes"] + T * c["kv_bytes_per_token"]
        return max(prefill_flops(s, c, T) / mm, bytes_ / bw)

    out = {"ttft_s": prefill_time(P)}
    for T in cfg["prefill_lens"]:
        out[f"prefill_{T}_tok_s"] = T / prefill_time(T)
    for B in [1] + cfg["batches"]:
        # weights once per step, plus each sequence's K/V at its average context over the decode
        step_bytes = c["decode_weight_bytes"] + B * c["kv_bytes_per_token"] * (P + N / 2)
        out[f"decode_b{B}_tok_s"] = B * bw / step_bytes
        out[f"decode_b{B}_step_bytes"] = step_bytes
    return out


# ---------------------------------------------------------------------------------------------
# Configuration


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is a GPU")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (for trying the harness on a CPU)")
    ap.add_argument("--quick", action="store_true",
                    help="short run: 4 layers (2 with --tiny), 64 new tokens, prefill 512 and 2048, 2 repeats")
    ap.add_argument("--layers", type=int, help="number of layers (default: the model's 32)")
    ap.add_argument("--only", default=",".join(ENGINES), help="comma list of engines: afs,hf,torch")
    ap.add_argument("--work", default="/tmp/afs_bench_gpu", help="checkpoints, engines, HF reference (kept, reused)")
    ap.add_argument("--out", help="report, JSON, logs, traces (default: <work>/out)")
    ap.add_argument("--arch", default="auto", help="afs-build --arch (default: the local GPU, cpu on --device cpu)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens for TTFT and decode")
    ap.add_argument("--new-tokens", type=int, help="tokens generated per sequence in decode (default 256; quick 64)")
    ap.add_argument("--batches", help="decode batch sizes besides 1 (default 8,64)")
    ap.add_argument("--prefill", help="prefill lengths (default 512,2048,8192; quick 512,2048)")
    ap.add_argument("--repeats", type=int, help="repeats for TTFT, prefill and t(1); the median counts (default 3)")
    ap.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared with HF")
    ap.add_argument("--max-rel-err", type=float, default=None,
                    help="bound on ||logits - hf|| / ||hf|| (default: tests/reference.py's GPU tolerance)")
    ap.add_argument("--torch-compile-mode", default=None,
                    help="reduce-overhead (default on cuda), max-autotune, default (default on cpu), or none (eager)")
    ap.add_argument("--profile-steps", type=int, help="decode steps profiled kernel by kernel (default 16)")
    ap.add_argument("--profile-peers", action="store_true", help="profile the HF and torch decode steps too")
    ap.add_argument("--afs-max-batch-tokens", type=int, help="afs.load max_batch_tokens (default: the longest prefill)")
    ap.add_argument("--afs-kv-blocks", type=int, help="afs.load kv_blocks (default: enough for the largest batch)")
    ap.add_argument("--afs-no-cuda-graphs", action="store_true", help="afs.load cuda_graphs=False")
    ap.add_argument("--afs-kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                    help="afs.load kv_cache_dtype (fp8: e4m3 K/V; pass --max-rel-err for its accuracy)")
    ap.add_argument("--phase-timeout", type=float, default=0, help="seconds before a phase is stopped (0: none)")
    ap.add_argument("--fresh", action="store_true", help="make the checkpoint again even when one is kept")
    ap.add_argument("--resume", action="store_true",
                    help="reuse engine results already in --out from a run with the same settings (to split a run "
                         "over several commands, e.g. --only hf,torch then --only afs --resume)")
    return ap.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def make_config(a: argparse.Namespace) -> dict:
    device = a.device
    if device is None:
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    shape_name = "tiny" if a.tiny else "olmo2_7b"
    shape = dict(SHAPES[shape_name])
    shape["layers"] = a.layers or ((2 if a.tiny else 4) if a.quick else shape["layers"])
    P = a.prompt
    N = a.new_tokens or (64 if a.quick else 256)
    batches = [b for b in (ints(a.batches) if a.batches is not None else [8, 64]) if b > 1]  # batch 1 always runs
    prefill = ints(a.prefill) if a.prefill is not None else ([512, 2048] if a.quick else [512, 2048, 8192])
    need_ctx = max(prefill + [P + N]) + 16
    # NOTE: one value for every usual run, so that changing lengths does not remake the checkpoint
    shape["max_positions"] = max(16384, 1 << math.ceil(math.log2(need_ctx)))
    engines = [e.strip() for e in a.only.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise SystemExit(f"--only: unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    arch = a.arch
    if device == "cpu":
        arch = "cpu"
    elif arch == "auto":
        from afs_build.plan import detect_local_arch

        arch = detect_local_arch()
    work = Path(a.work).resolve()
    tag = f"{shape_name}_l{shape['layers']}"
    max_b = max([1] + batches)
    block = 16
    kv_tokens = max(max_b * (P + N + block), max(prefill, default=0) + block)
    cfg = {
        "device": device, "shape_name": shape_name, "shape": shape, "counts": model_counts(shape, 1 if a.afs_kv_cache_dtype == "fp8" else 2),
        "engines": engines, "arch": arch, "seed": a.seed, "prompt": P, "new_tokens": N, "batches": batches,
        "prefill_lens": prefill, "repeats": a.repeats or (2 if a.quick else 3), "decode_repeats": 1,
        "check_tokens": a.check_tokens, "max_rel_err": a.max_rel_err,
        "torch_compile_mode": a.torch_compile_mode or ("reduce-overhead" if device == "cuda" else "default"),
        "profile_steps": a.profile_steps or (8 if a.quick else 16), "profile_peers": a.profile_peers,
        "time_hf": "hf" in engines,
        "work": str(work), "out": str(Path(a.out).resolve() if a.out else work / "out"),
        "checkpoint": str(work / f"ckpt_{tag}_s{a.seed}"),
        "engine_dir": str(work / f"engine_{tag}_s{a.seed}_{arch}"),
        "reference": str(work / f"hf_reference_{tag}_s{a.seed}_p{P}.npz"),
        "afs": {"max_context": need_ctx, "kv_block_size": block,
                "kv_blocks": a.afs_kv_blocks or (math.ceil(kv_tokens / block) + max_b),
                "max_batch_tokens": a.afs_max_batch_tokens or max(prefill + [P]),
                "cuda_graphs": not a.afs_no_cuda_graphs, "kv_cache_dtype": a.afs_kv_cache_dtype},
        "phase_timeout": a.phase_timeout, "fresh": a.fresh, "resume": a.resume,
    }
    if N < 2:
        raise SystemExit("--new-tokens must be at least 2 (decode is t(N) - t(1))")
    return cfg


# ---------------------------------------------------------------------------------------------
# Running the phases


# Settings that do not change what an engine phase measures (a result can be reused across them).
NOT_SETTINGS = ("engines", "time_hf", "fresh", "phase_timeout", "profile_peers", "resume")


def settings_key(cfg: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in cfg.items() if k not in NOT_SETTINGS},
                                     sort_keys=True).encode()).hexdigest()[:16]


def previous_result(name: str, cfg: dict) -> dict | None:
    """An engine phase's result from an earlier run into the same --out with the same settings."""
    path = Path(cfg["out"]) / f"{name}.result.json"
    try:
        r = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not r.get("ok") or r.get("settings") != settings_key(cfg) or "timings" not in r:
        return None
    if name == "hf" and not Path(cfg["reference"]).exists():
        return None
    return r


def run_phase(name: str, cfg: dict, cfg_path: Path) -> dict:
    out = Path(cfg["out"])
    res_path = out / f"{name}.result.json"
    log_path = out / "logs" / f"{name}.log"
    res_path.unlink(missing_ok=True)
    print(f"\n== {name} ({time.strftime('%H:%M:%S')})", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT)] + [x for x in [env.get("PYTHONPATH")] if x])
    cmd = [sys.executable, "-u", str(HERE / "bench_gpu_phases.py"), name, str(cfg_path), str(res_path)]
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    timed_out = threading.Event()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                                cwd=ROOT, start_new_session=True)
        timer = None
        if cfg["phase_timeout"] > 0:
            def stop() -> None:
                timed_out.set()
                os.killpg(proc.pid, signal.SIGKILL)  # the phase's own process group

            timer = threading.Timer(cfg["phase_timeout"], stop)
            timer.start()
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            logf.write(line)
        rc = proc.wait()
        if timer is not None:
            timer.cancel()
    if res_path.exists():
        r = json.loads(res_path.read_text())
    elif timed_out.is_set():
        r = {"ok": False, "error": f"stopped after --phase-timeout {cfg['phase_timeout']:.0f} s; see {log_path}"}
    else:
        r = {"ok": False, "error": f"the phase process ended with code {rc} without a result; see {log_path}"}
    r.setdefault("wall_s", time.perf_counter() - t0)
    r["started"], r["settings"] = started, settings_key(cfg)
    res_path.write_text(json.dumps(r, indent=1))
    status = "ok" if r.get("ok") else f"FAILED: {r.get('refused') or r.get('error')}"
    print(f"== {name}: {status} ({r['wall_s']:.0f} s)", flush=True)
    return r


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except OSError:
        return "?"


def main(argv=None) -> int:
    a = parse_args(argv)
    cfg = make_config(a)
    out = Path(cfg["out"])
    (out / "logs").mkdir(parents=True, exist_ok=True)
    Path(cfg["work"]).mkdir(parents=True, exist_ok=True)
    if cfg["fresh"]:
        marker = Path(cfg["checkpoint"]) / ".complete"
        marker.unlink(missing_ok=True)
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    c = cfg["counts"]
    print(f"bench_gpu: {cfg['shape_name']} shape, {cfg['shape']['layers']} layers, {c['params'] / 1e9:.3f} B parameters, "
          f"device {cfg['device']}, engines {','.join(cfg['engines'])}, afs arch {cfg['arch']}; work {cfg['work']}, out {out}",
          flush=True)

    results: dict = {}
    reused = {}
    if cfg["resume"]:  # earlier results first: a phase that runs now overwrites its own
        for e in ENGINES:
            if (r := previous_result(e, cfg)) is not None:
                reused[e] = r
    results["floors"] = run_phase("floors", cfg, cfg_path)
    results["checkpoint"] = run_phase("checkpoint", cfg, cfg_path)
    have_ckpt = results["checkpoint"].get("ok")
    want = cfg["engines"]

    def engine_phase(name: str) -> dict:
        if name in reused:
            print(f"\n== {name}: reusing the result of {reused[name]['started']} (--resume)", flush=True)
            return reused[name]
        return run_phase(name, cfg, cfg_path) if have_ckpt else {"ok": False, "error": "no checkpoint"}

    if "afs" in want:
        results["build"] = run_phase("build", cfg, cfg_path) if have_ckpt else {"ok": False, "error": "no checkpoint"}
    if "afs" in want or "hf" in want:
        results["hf"] = engine_phase("hf")
    if "afs" in want:  # before torch, whose compiles are the slowest phase when time runs short
        if not results["build"].get("ok"):
            results["afs"] = {"ok": False, "error": "the engine build failed"}
        elif not results["hf"].get("ok"):
            results["afs"] = {"ok": False, "error": "no HF reference: afs is not timed unchecked"}
        else:
            results["afs"] = engine_phase("afs")
    if "torch" in want:
        results["torch"] = engine_phase("torch")
    for e in ENGINES:  # engines not asked for this time, measured by an earlier run
        if e not in results and e in reused:
            results[e] = reused[e]

    report, summary, problems = make_report(cfg, results, started)
    print("\n" + report, flush=True)
    (out / "report.txt").write_text(report + "\n")
    (out / "bench_gpu.json").write_text(json.dumps({"config": cfg, "started": started, "commit": git_describe(),
                                                    "results": results, "summary": summary}, indent=1))
    print(f"\nwritten: {out / 'report.txt'}, {out / 'bench_gpu.json'}, {out / 'logs'}", flush=True)
    return 0 if not problems else 1


# ---------------------------------------------------------------------------------------------
# Report


def _timing(results: dict, engine: str, key: str, field: str):
    """A number, or a short reason it is missing."""
    r = results.get(engine)
    if r is None:
        return "-"
    if not r.get("ok") and "timings" not in r:
        return "refused" if r.get("refused") else "failed"
    t = (r.get("timings") or {}).get(key)
    if t is None:
        return "-"
    if "error" in t:
        return "error"
    return t.get(field, "-")


def _memory(results: dict, engine: str):
    r = results.get(engine) or {}
    m = r.get("memory")
    if not m:
        return "refused" if r.get("refused") else ("failed" if engine in results and not r.get("ok") else "-")
    return m.get("peak_bytes", "-")


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt(v, scale: float = 1.0, digits: int = 1) -> str:
    if isinstance(v, (int, float)):
        return f"{v * scale:,.{digits}f}"
    return str(v)


def _ratio(num, den, pct: bool = False) -> str:
    if isinstance(num, (int, float)) and isinstance(den, (int, float)) and den > 0 and num > 0:
        return f"{100 * num / den:.0f}%" if pct else f"{num / den:.2f}x"
    return "-"


def make_report(cfg: dict, results: dict, started: str) -> tuple[str, list[dict], list[str]]:
    """The printed report, the summary rows, and a line per failed phase or section."""
    lines: list[str] = []
    fl = results.get("floors") or {}
    s, c = cfg["shape"], cfg["counts"]
    dev = fl.get("gpu") or fl.get("cpu") or cfg["device"]
    lines.append(f"# bench_gpu: {dev}, driver {fl.get('driver', '-')}, CUDA {fl.get('cuda', '-')}, torch {fl.get('torch', '-')}; "
                 f"{started}; commit {git_describe()}")
    lines.append(f"model: {cfg['shape_name']} shape, {s['layers']} layers, hidden {s['hidden']}, heads {s['heads']}/{s['kv_heads']}, "
                 f"intermediate {s['intermediate']}, vocab {s['vocab']}: {c['params'] / 1e9:.3f} B parameters, bf16, random weights")
    lines.append(f"decode reads {_bytes(c['decode_weight_bytes'])} of weights per step (all but the embedding table) "
                 f"+ {_bytes(c['kv_bytes_per_token'])} of K/V per context token and sequence")
    fd = floors(cfg, fl) if fl.get("ok") else {}
    if fd:
        lines.append(f"measured: copy {fl['copy_bytes_per_s'] / 1e12:.3f} TB/s (bytes read + written), "
                     f"bf16 matmul {fl['matmul_n']}^3 {fl['matmul_flop_per_s'] / 1e12:.1f} TFLOP/s")
    else:
        lines.append(f"floors: not measured ({fl.get('error', 'floors phase missing')})")
    for e in ENGINES:
        r = results.get(e) or {}
        if r.get("started") and r.get("started") < started:
            lines.append(f"{e}: measured by an earlier run, {r['started']} (--resume)")

    # Correctness
    lines.append("\n## correctness (before any timing): vs HF bf16 on a "
                 f"{cfg['prompt']}-token prompt, {cfg['check_tokens']} greedy tokens")
    href = results.get("hf") or {}
    if "hf_bf16_vs_fp32" in href:
        lines.append(f"HF bf16 vs HF fp32: {href['hf_bf16_vs_fp32']:.3g}")
    lines.append(f"{'engine':<8} {'||d||/||hf||':>13} {'max|d|/max|hf|':>15} {'vs fp32':>9} {'bound':>8} {'greedy':>8} {'identical':>9}  result")
    for e in ("afs", "torch"):
        r = results.get(e)
        if r is None:
            continue
        ch = r.get("check") or {}
        if ch:
            lines.append(f"{e:<8} {ch['rel_err_vs_hf_bf16']:13.3g} {ch['max_rel_err_vs_hf_bf16']:15.3g} "
                         f"{_fmt(ch.get('rel_err_vs_hf_fp32', '-'), digits=4):>9} {ch['rel_err_bound']:8.3g} "
                         f"{ch['greedy_agree']:>4}/{ch['greedy_tokens']:<3} {ch['greedy_identical']:>9}  passed"
                         + (f"; batched path {ch['batched']['greedy_agree']}/{ch['greedy_tokens']}" if "batched" in ch else ""))
        else:
            lines.append(f"{e:<8} {'':>13} {'':>15} {'':>9} {'':>8} {'':>8} {'':>9}  "
                         f"{'REFUSED: ' + r['refused'] if r.get('refused') else 'FAILED: ' + str(r.get('error'))}")

    # Kernel breakdown
    prof_engines = ["afs"] + (["torch", "hf"] if cfg["profile_peers"] else [])
    # (result key, what it is, full title, rows shown) of each kernel table, in report order
    tables = [("profile", "decode step",
               lambda b: f"one batch-1 decode step, kernel by kernel ({b['steps']} steps profiled; calls and us per step)", 30),
              ("profile_batch", "batched decode step",
               lambda b: f"one batch-{b['batch']} decode step, kernel by kernel ({b['steps']} steps profiled; calls and us "
                         f"per step)", 30),
              ("profile_exposed", "batch-1 decode step as it runs",
               lambda b: f"one batch-1 decode step as it runs (kernels overlapping), exposed time per kernel "
                         f"({b['steps']} steps)", 16),
              ("profile_batch_exposed", "batched decode step as it runs",
               lambda b: f"one batch-{b['batch']} decode step as it runs (kernels overlapping), exposed time per kernel "
                         f"({b['steps']} steps)", 16),
              ("prefill_profile", "prefill",
               lambda b: f"one {b['tokens']}-token prefill, kernel by kernel (calls and us for the whole prefill)", 20)]
    for e in prof_engines:
        if (results.get(e) or {}).get("profile") is None:
            continue
        for key, what, title, limit in tables:
            bd = (results.get(e) or {}).get(key)
            if bd is None:
                continue
            lines.append("")
            if "error" in bd:
                lines.append(f"## {e} {what}, kernel by kernel: failed ({bd['error']})")
            else:
                lines.append(format_breakdown(bd, f"## {e}: {title(bd)}", limit=limit))

    # Whatever failed, in one place
    problems = [f"{name}: {r.get('refused') or r.get('error')}" for name, r in results.items() if not r.get("ok")]
    for e in ENGINES:
        for key, t in ((results.get(e) or {}).get("timings") or {}).items():
            if "error" in t:
                problems.append(f"{e} {key}: {t['error']}")
        for key, what, _, _ in tables:
            bd = (results.get(e) or {}).get(key) or {}
            if "error" in bd:
                problems.append(f"{e} {what} profile: {bd['error']}")
    if problems:
        lines.append("\n## failures")
        lines += [f"- {p}" for p in problems]

    # Summary
    engines = ["afs", "hf", "torch"]
    rows = []
    mem_label = "peak GPU memory GB" if cfg["device"] == "cuda" else "peak RSS GB"
    for B in [1] + cfg["batches"]:
        rows.append((f"decode b{B} tok/s", f"decode_b{B}", "tok_s", "higher", fd.get(f"decode_b{B}_tok_s")))
    for T in cfg["prefill_lens"]:
        rows.append((f"prefill {T} tok/s", f"prefill_{T}", "tok_s", "higher", fd.get(f"prefill_{T}_tok_s")))
    rows.append((f"TTFT {cfg['prompt']} ms", "ttft", "seconds", "lower", fd.get("ttft_s")))
    rows.append((mem_label, None, None, "memory", c["all_weight_bytes"]))

    summary = []
    lines.append("\n## summary (ratios: tok/s afs/peer; TTFT peer/afs, so >1x means afs is faster; "
                 "memory afs/peer, <1x means afs is smaller)")
    lines.append(f"{'metric':<22} {'afs':>10} {'hf':>10} {'torch':>10} {'floor':>10} {'afs/hf':>8} {'afs/torch':>9} {'afs/floor':>9}")
    for label, key, field, kind, floor in rows:
        if kind == "memory":
            vals = {e: _memory(results, e) for e in engines}
            shown = {e: _fmt(v, 1e-9, 2) for e, v in vals.items()}
            floor_s = f"{floor / 1e9:.2f}"
            rh, rt = _ratio(vals["afs"], vals["hf"]), _ratio(vals["afs"], vals["torch"])
            rf = _ratio(vals["afs"], floor)
        elif kind == "lower":
            vals = {e: _timing(results, e, key, field) for e in engines}
            shown = {e: _fmt(v, 1e3, 2) for e, v in vals.items()}
            floor_s = _fmt(floor, 1e3, 2) if floor else "-"
            rh, rt = _ratio(vals["hf"], vals["afs"]), _ratio(vals["torch"], vals["afs"])
            rf = _ratio(floor, vals["afs"], pct=True)
        else:
            vals = {e: _timing(results, e, key, field) for e in engines}
            shown = {e: _fmt(v) for e, v in vals.items()}
            floor_s = _fmt(floor) if floor else "-"
            rh, rt = _ratio(vals["afs"], vals["hf"]), _ratio(vals["afs"], vals["torch"])
            rf = _ratio(vals["afs"], floor, pct=True)
        lines.append(f"{label:<22} {shown['afs']:>10} {shown['hf']:>10} {shown['torch']:>10} {floor_s:>10} "
                     f"{rh:>8} {rt:>9} {rf:>9}")
        summary.append({"metric": label, **{e: vals[e] for e in engines}, "floor": floor, "afs_over_hf": rh,
                        "afs_over_torch": rt, "afs_over_floor": rf})
    lines.append(f"(memory floor: the weights alone; decode floors include K/V reads at the mean context of "
                 f"{cfg['prompt']} + {cfg['new_tokens']}/2 tokens"
                 + (", afs's fp8 K/V: 1 byte a value)" if cfg["afs"].get("kv_cache_dtype") == "fp8" else ")"))

    # afs-specific lines: achieved bandwidth, batch scaling, issue targets
    b1 = _timing(results, "afs", "decode_b1", "step_ms")
    if isinstance(b1, float) and fd:
        bw = fd["decode_b1_step_bytes"] / (b1 / 1e3)
        lines.append(f"afs batch-1 decode step {b1:.3f} ms = {bw / 1e12:.2f} TB/s of weights + K/V "
                     f"({100 * bw / fl['copy_bytes_per_s']:.0f}% of copy bandwidth)")
    for B in cfg["batches"]:
        sb = _timing(results, "afs", f"decode_b{B}", "step_ms")
        if isinstance(sb, float) and isinstance(b1, float):
            lines.append(f"afs batch-{B} decode step {sb:.3f} ms = {sb / b1:.2f}x the batch-1 step")
    full = cfg["shape_name"] == "olmo2_7b" and s["layers"] == 32 and cfg["device"] == "cuda"
    if full:
        targets = [("batch-1 decode >= 200 tok/s", _timing(results, "afs", "decode_b1", "tok_s"), 200.0, True),
                   ("prefill 2048 >= 40k tok/s", _timing(results, "afs", "prefill_2048", "tok_s"), 40000.0, True),
                   ("prefill 8192 >= 30k tok/s", _timing(results, "afs", "prefill_8192", "tok_s"), 30000.0, True)]
        sb64 = _timing(results, "afs", "decode_b64", "step_ms")
        if isinstance(sb64, float) and isinstance(b1, float):
            targets.append(("batch-64 step <= 1.5x batch-1 step", sb64 / b1, 1.5, False))
        tv = _timing(results, "torch", "decode_b1", "tok_s")
        av = _timing(results, "afs", "decode_b1", "tok_s")
        if isinstance(tv, float) and isinstance(av, float):
            targets.append(("batch-1 decode >= 1.4x torch.compile", av / tv, 1.4, True))
        lines.append("targets (H100 80GB):")
        for name, v, goal, higher in targets:
            if isinstance(v, (int, float)):
                ok = v >= goal if higher else v <= goal
                lines.append(f"  {name:<40} {v:>10,.2f}  {'met' if ok else 'not met'}")
            else:
                lines.append(f"  {name:<40} {str(v):>10}")
    return "\n".join(lines), summary, problems


if __name__ == "__main__":
    sys.exit(main())
