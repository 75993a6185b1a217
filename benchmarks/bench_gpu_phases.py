"""The phases of bench_gpu.py, each run in its own process so that an engine's memory is its own.

    python benchmarks/bench_gpu_phases.py PHASE CONFIG.json RESULT.json

    floors      device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate (8192^3)
    checkpoint  a seeded random OLMo 2 checkpoint made with transformers on the benchmark device (kept)
    build       the afs engine, with afs_build.cli.build_engine from this checkout
    hf          the HF reference (prompt logits in bf16 and fp32, greedy tokens), then HF timings
    torch       the torch.compile static-cache baseline (torch_baseline.py): checked against HF, then timed
    afs         the afs engine: checked against the HF reference, timed, its decode step profiled

CONFIG.json is written by bench_gpu.py. All three engines are timed by measure_engine(), one
protocol; an engine that disagrees with HF is not timed.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
STALL_DUMP_S = 120  # a section running longer prints its stacks (see section())
for p in (ROOT / "benchmarks", ROOT / "tests", ROOT / "python", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402


class Refused(RuntimeError):
    """An engine failed its correctness check; it is not timed."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Peak memory


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class Nvml:
    """Device memory in use, read through NVML (no CUDA call, so safe while CUDA graphs are captured)."""

    def __init__(self, lib, handle) -> None:
        self.lib, self.handle = lib, handle

    @classmethod
    def open(cls) -> "Nvml | None":
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                return None
            handle = ctypes.c_void_p()
            first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
            if first.isdigit():
                rc = lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(int(first)), ctypes.byref(handle))
            else:
                rc = lib.nvmlDeviceGetHandleByUUID(first.encode(), ctypes.byref(handle))
            return cls(lib, handle) if rc == 0 else None
        except (OSError, AttributeError):
            return None

    def used(self) -> int:
        m = _NvmlMemory()
        if self.lib.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(m)) != 0:
            return 0
        return int(m.used)

    def driver(self) -> str:
        buf = ctypes.create_string_buffer(96)
        return buf.value.decode() if self.lib.nvmlSystemGetDriverVersion(buf, ctypes.c_uint(96)) == 0 else "?"


class PeakMemory:
    """Peak memory of this process.

    cuda: device memory in use (NVML, sampled every 50 ms by a thread) minus what was in use before
    this process touched the device, so CUDA context, allocator pools, cuBLAS workspaces, CUDA
    graphs and memory an engine allocates outside torch all count. Without NVML: cudaMemGetInfo at
    section boundaries (after the context exists; misses peaks inside a section).
    cpu: peak resident set size."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0
        self.base = None
        self.nvml = Nvml.open() if device == "cuda" else None
        self._stop = threading.Event()
        if self.nvml is not None:
            self.method = "NVML device memory used, minus before start"
            self.base = self.nvml.used()
            threading.Thread(target=self._sample, daemon=True).start()
        elif device == "cuda":
            import torch

            self.method = "cudaMemGetInfo at section boundaries, minus after CUDA init"
            torch.cuda.init()
            free, total = torch.cuda.mem_get_info()
            self.base = self.peak = total - free
        else:
            self.method = "peak RSS"

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.nvml.used())

    def note(self) -> None:
        """A section boundary."""
        if self.device == "cuda" and self.nvml is None:
            import torch

            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)

    def result(self) -> dict:
        out = {"method": self.method}
        if self.device == "cuda":
            if self.nvml is not None:
                self.peak = max(self.peak, self.nvml.used())
            out["peak_bytes"] = max(0, self.peak - (self.base or 0))
            import torch

            if torch.cuda.is_initialized():
                out["torch_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
                out["torch_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        else:
            out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return out


# ---------------------------------------------------------------------------------------------
# Common pieces


class Prompts:
    """Fresh random prompts: no two requests share a prefix, so no engine can reuse cached KV."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)

    def one(self, length: int) -> list[int]:
        # the top three ids are bos / eos / pad in the generated checkpoint
        return self.rng.integers(0, self.vocab - 3, length).tolist()

    def many(self, batch: int, length: int) -> list[list[int]]:
        return [self.one(length) for _ in range(batch)]


def reference_prompt(cfg: dict) -> list[int]:
    return Prompts(cfg["shape"]["vocab"], cfg["seed"] + 1000).one(cfg["prompt"])


def device_sync(device: str) -> Callable[[], None]:
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def load_hf(cfg: dict):
    """HF Olmo2ForCausalLM from the checkpoint, bf16, SDPA attention, on the benchmark device."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = cfg["device"]
    kw = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg["checkpoint"], device_map=dev, **kw)
    except (ImportError, ValueError, TypeError) as e:  # device_map needs accelerate in some versions
        log(f"  from_pretrained(device_map={dev!r}) failed ({type(e).__name__}: {e}); loading on the CPU first")
        model = AutoModelForCausalLM.from_pretrained(cfg["checkpoint"], **kw).to(dev)
    model.eval().requires_grad_(False)
    log(f"  HF model loaded in {time.perf_counter() - t0:.1f} s ({type(model).__name__}, "
        f"attn {model.config._attn_implementation})")
    return model


def sane_logits(x: np.ndarray, what: str) -> None:
    """Never time on zeros: logits must be finite and vary."""
    if not np.isfinite(x).all():
        raise Refused(f"{what}: non-finite logits")
    if float(np.std(x)) == 0.0:
        raise Refused(f"{what}: constant logits (all {float(x.flat[0])})")


def logit_bound(cfg: dict, ref: dict) -> float:
    """Bound on ||engine - hf_bf16|| / ||hf_bf16||: --max-rel-err when given, else the GPU tolerance of
    tests/reference.py (2e-2, or HF bf16's own distance from HF fp32 when that is larger)."""
    from reference import GPU_TOLERANCE

    if cfg.get("max_rel_err"):
        return float(cfg["max_rel_err"])
    own = ref.get("hf_bf16_vs_fp32")
    return GPU_TOLERANCE.vs_hf_bf16_bound(float(own)) if own is not None else GPU_TOLERANCE.vs_hf_bf16


def compare(name: str, logits: np.ndarray, tokens: list[int], step_logits: np.ndarray, ref: dict, cfg: dict) -> dict:
    """Prompt logits and greedy tokens of an engine against HF bf16; raises Refused when they disagree."""
    from reference import check_greedy_close, max_rel_error, norm_rel_error

    sane_logits(logits, f"{name} prompt logits")
    out = {"rel_err_vs_hf_bf16": norm_rel_error(logits, ref["logits"]),
           "max_rel_err_vs_hf_bf16": max_rel_error(logits, ref["logits"])}
    if ref.get("logits_fp32") is not None:
        out["rel_err_vs_hf_fp32"] = norm_rel_error(logits, ref["logits_fp32"])
    bound = logit_bound(cfg, ref)
    out["rel_err_bound"] = bound
    ref_tokens = [int(t) for t in ref["tokens"]]
    out["greedy_tokens"] = len(ref_tokens)
    out["greedy_identical"] = sum(1 for _ in iter_equal(tokens, ref_tokens))
    if len(tokens) != len(ref_tokens):
        raise Refused(f"{name} made {len(tokens)} greedy tokens, HF {len(ref_tokens)}")
    try:
        out["greedy_agree"] = check_greedy_close(tokens, step_logits, ref_tokens, ref["step_logits"], k=5,
                                                 names=(name, "hf"))
    except AssertionError as e:
        raise Refused(f"{name}: {e}") from None
    if out["rel_err_vs_hf_bf16"] > bound:
        raise Refused(f"{name}: prompt logits differ from HF bf16 by {out['rel_err_vs_hf_bf16']:.3g} "
                      f"(||a - b|| / ||b||), above the bound {bound:.3g}")
    out["passed"] = True
    return out


def iter_equal(a, b):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


# ---------------------------------------------------------------------------------------------
# The timing protocol, the same for every engine


def wall(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    r = fn()
    sync()
    return time.perf_counter() - t0, r


def measure_engine(runner, cfg: dict, prompts: Prompts, mem: PeakMemory) -> dict:
    """TTFT, prefill at each length, decode at batch 1 and each batch size. Each section stands
    alone: a failure is recorded and the next one runs.

    TTFT: wall time of a request for one token after a P-token prompt (median of --repeats).
    prefill T: the same for a T-token prompt; T / time.
    decode B: B fresh P-token prompts, greedy, EOS ignored; t(N) = wall time for N new tokens each,
    t(1) for one; decode tok/s = B * (N - 1) / (t(N) - t(1)), which leaves prefill out."""
    sync = device_sync(cfg["device"])
    P, N, reps = cfg["prompt"], cfg["new_tokens"], cfg["repeats"]
    res: dict = {}

    def section(key: str, fn: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        # A section still running after two minutes prints every thread's stack, every two minutes, into
        # the log: a stall then shows where it is (blocked in the engine on the GPU, or elsewhere).
        faulthandler.dump_traceback_later(STALL_DUMP_S, repeat=True)
        try:
            res[key] = fn()
        except Exception as e:  # keep going: every section is reported
            traceback.print_exc()
            res[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            faulthandler.cancel_dump_traceback_later()
        mem.note()
        r = res[key]
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if not isinstance(v, list)}
        log(f"  [{runner.name}] {key}: {shown}  ({time.perf_counter() - t0:.1f} s)")

    def first_token_time(T: int) -> dict:
        runner.prepare(1, T + 1)
        runner.first_token(prompts.one(T))  # warm-up
        times = []
        for _ in range(reps):
            ids = prompts.one(T)
            times.append(wall(lambda: runner.first_token(ids), sync)[0])
        t = statistics.median(times)
        return {"seconds": t, "tok_s": T / t, "times": times}

    section("ttft", lambda: first_token_time(P))
    for T in cfg["prefill_lens"]:
        section(f"prefill_{T}", lambda T=T: first_token_time(T))

    def decode(B: int) -> dict:
        runner.prepare(B, P + N)
        warm_s, _ = wall(lambda: runner.generate(prompts.many(B, P), min(N, 8)), sync)
        t1s = []
        for _ in range(reps):
            batch = prompts.many(B, P)
            t1s.append(wall(lambda: runner.generate(batch, 1), sync)[0])
        t1 = statistics.median(t1s)
        tns = []
        for _ in range(cfg["decode_repeats"]):
            batch = prompts.many(B, P)
            tn, out = wall(lambda: runner.generate(batch, N), sync)
            lens = sorted({len(o) for o in out})
            if len(out) != B or lens != [N]:
                raise RuntimeError(f"asked for {B} x {N} tokens, got {len(out)} sequences of lengths {lens}")
            tns.append(tn)
        tn = statistics.median(tns)
        if tn <= t1:
            raise RuntimeError(f"t({N}) = {tn:.4f} s is not above t(1) = {t1:.4f} s")
        step = (tn - t1) / (N - 1)
        return {"tok_s": B * (N - 1) / (tn - t1), "step_ms": step * 1e3, "t_1": t1, "t_n": tn,
                "wall_tok_s": B * N / tn, "warmup_s": warm_s}

    for B in [1] + cfg["batches"]:
        section(f"decode_b{B}", lambda B=B: decode(B))
    return res


def _decode_request(runner, cfg: dict, prompts: Prompts, timings: dict, tag: str, batch: int):
    """What a decode profile of `batch` sequences runs: run(n) generates n tokens for fresh
    P-token prompts; the trace file stem; the measured step in seconds (None if not measured)."""
    P, K = cfg["prompt"], cfg["profile_steps"]
    runner.prepare(batch, P + max(cfg["new_tokens"], K + 1))
    run = lambda n: runner.generate(prompts.many(batch, P), n)  # noqa: E731
    stem = Path(cfg["out"]) / "traces" / (tag if batch == 1 else f"{tag}_b{batch}")
    step_ms = timings.get(f"decode_b{batch}", {}).get("step_ms")
    return run, stem, step_ms / 1e3 if step_ms else None


def profile_decode(runner, cfg: dict, prompts: Prompts, timings: dict, tag: str, batch: int = 1) -> dict:
    """Kernel-by-kernel cost of a decode step of `batch` sequences (kernel_profile.py). A trace
    that splits into steps needs nothing else; otherwise (peers' kernels have no step marker) a
    second trace of the prefill alone is subtracted."""
    from kernel_profile import decode_breakdown, format_breakdown, trace_events, uniform_decode_steps

    K = cfg["profile_steps"]
    run, stem, step_s = _decode_request(runner, cfg, prompts, timings, tag, batch)
    run(1 + K)  # warm-up
    b = trace_events(lambda: run(1 + K), cfg["device"], Path(f"{stem}_prefill_and_{K}_decode_steps.json"))
    a: list[dict] = []
    if not uniform_decode_steps(b):
        run(1)
        a = trace_events(lambda: run(1), cfg["device"], Path(f"{stem}_prefill_only.json"))
    bd = decode_breakdown(a, b, K, cfg["shape"], step_s)
    bd["batch"] = batch
    log(format_breakdown(bd, f"{tag}: one batch-{batch} decode step, kernel by kernel ({bd['steps']} steps profiled)"))
    return bd


def profile_exposed(runner, cfg: dict, prompts: Prompts, timings: dict, tag: str, batch: int = 1) -> dict:
    """A decode step of `batch` sequences as engines run it (kernels overlapping): what each kernel
    leaves exposed (kernel_profile.exposed_breakdown)."""
    from kernel_profile import exposed_breakdown, format_breakdown, trace_events

    K = cfg["profile_steps"]
    run, stem, step_s = _decode_request(runner, cfg, prompts, timings, tag, batch)
    run(1 + K)  # warm-up
    ev = trace_events(lambda: run(1 + K), cfg["device"], Path(f"{stem}_decode_overlapped.json"))
    bd = exposed_breakdown(ev, step_s)
    bd["batch"] = batch
    log(format_breakdown(bd, f"{tag}: one batch-{batch} decode step as it runs, exposed time per kernel "
                             f"({bd['steps']} steps)"))
    return bd


def profile_prefill(runner, cfg: dict, prompts: Prompts, timings: dict, tag: str) -> dict:
    """Kernel-by-kernel cost of one prefill at the longest measured length up to 2048 tokens."""
    from kernel_profile import format_breakdown, prefill_breakdown, trace_events

    lens = [T for T in cfg["prefill_lens"] if T <= 2048] or [min(cfg["prefill_lens"])]
    T = max(lens)
    runner.prepare(1, T + 1)
    run = lambda: runner.first_token(prompts.one(T))  # noqa: E731
    run()
    ev = trace_events(run, cfg["device"], Path(cfg["out"]) / "traces" / f"{tag}_prefill_{T}.json")
    secs = timings.get(f"prefill_{T}", {}).get("seconds")
    bd = prefill_breakdown(ev, T, secs)
    log(format_breakdown(bd, f"{tag}: one {T}-token prefill, kernel by kernel"))
    return bd


# ---------------------------------------------------------------------------------------------
# Phases


def phase_floors(cfg: dict) -> dict:
    import torch

    dev = cfg["device"]
    sync = device_sync(dev)
    out = {"device": dev, "torch": torch.__version__}
    if dev == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
        nv = Nvml.open()
        out["driver"] = nv.driver() if nv else "?"
        out["cuda"] = torch.version.cuda
        copy_bytes, n_mm, iters = 2 << 30, 8192, 10
    else:
        import platform

        out["cpu"] = platform.processor() or platform.machine()
        copy_bytes, n_mm, iters = 256 << 20, 1024, 3

    def median_time(fn: Callable[[], object]) -> float:
        """Seconds per call: median over 5 rounds of `iters` back-to-back calls (one sync per round)."""
        for _ in range(3):
            fn()
        rounds = []
        for _ in range(5):
            t, _ = wall(lambda: [fn() for _ in range(iters)], sync)
            rounds.append(t / iters)
        return statistics.median(rounds)

    x = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x))
    out["copy_bytes_per_s"] = 2 * copy_bytes / t  # read + written
    out["copy_buffer_bytes"] = copy_bytes
    del x, y
    a = torch.randn(n_mm, n_mm, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n_mm, n_mm, dtype=torch.bfloat16, device=dev)
    t = median_time(lambda: torch.mm(a, b))
    out["matmul_flop_per_s"] = 2 * n_mm**3 / t
    out["matmul_n"] = n_mm
    log(f"  copy {out['copy_bytes_per_s'] / 1e12:.3f} TB/s (read + written), "
        f"bf16 matmul {n_mm}^3 {out['matmul_flop_per_s'] / 1e12:.1f} TFLOP/s")
    return out


def phase_checkpoint(cfg: dict) -> dict:
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    s, path = cfg["shape"], Path(cfg["checkpoint"])
    marker = path / ".complete"
    if marker.exists() and json.loads(marker.read_text()) == {"shape": s, "seed": cfg["seed"]}:
        log(f"  reusing {path}")
        return {"path": str(path), "reused": True}
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    need = 2 * cfg["counts"]["params"] * 1.05
    free = shutil.disk_usage(path).free
    if free < need:
        raise RuntimeError(f"{path}: {free / 1e9:.1f} GB free, the checkpoint needs {need / 1e9:.1f} GB; choose --work")
    config = Olmo2Config(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=s["max_positions"], rope_theta=s["rope_theta"], rms_norm_eps=s["eps"],
        tie_word_embeddings=False, bos_token_id=s["vocab"] - 2, eos_token_id=s["vocab"] - 1,
        pad_token_id=s["vocab"] - 3)
    t0 = time.perf_counter()
    torch.manual_seed(cfg["seed"])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: a 7B model in fp32 would be 29 GB
    try:
        with torch.device(cfg["device"]):
            model = Olmo2ForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):  # not all ones, so a missing norm shows
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size="4GB")
    del model
    marker.write_text(json.dumps({"shape": s, "seed": cfg["seed"]}))
    log(f"  {params / 1e9:.3f} B parameters written to {path} in {time.perf_counter() - t0:.1f} s")
    return {"path": str(path), "reused": False, "params": params, "seconds": time.perf_counter() - t0}


def phase_build(cfg: dict) -> dict:
    from afs_build.cli import build_engine

    r = build_engine(cfg["checkpoint"], arch=cfg["arch"], dtype="bf16", output=cfg["engine_dir"], quiet=False)
    log(f"  engine {r.output} ({r.spec.name}): {'up to date' if r.up_to_date else f'built in {r.seconds:.0f} s'}")
    return {"engine": str(r.output), "spec": r.spec.name, "up_to_date": r.up_to_date, "seconds": r.seconds}


class HfRunner:
    name = "hf"

    def __init__(self, model, cfg: dict) -> None:
        import torch

        self.model, self.torch = model, torch
        self.device = cfg["device"]
        self.pad = cfg["shape"]["vocab"] - 3

    def prepare(self, batch: int, context: int) -> None:
        pass

    def first_token(self, prompt: list[int]) -> int:
        return self.generate([prompt], 1)[0][0]

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        ids = self.torch.tensor(prompts, device=self.device)
        # min_new_tokens = max_new_tokens: EOS cannot end a sequence early
        out = self.model.generate(input_ids=ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=self.pad)
        return out[:, ids.shape[1]:].tolist()


def phase_hf(cfg: dict) -> dict:
    import torch
    from reference import hf_greedy, hf_logits, norm_rel_error

    mem = PeakMemory(cfg["device"])
    model = load_hf(cfg)
    mem.note()
    prompt = reference_prompt(cfg)
    logits = hf_logits(model, prompt)
    sane_logits(logits, "HF prompt logits")
    tokens, step_logits = hf_greedy(model, prompt, cfg["check_tokens"])
    ref_path = Path(cfg["reference"])
    np.savez(ref_path, prompt=np.array(prompt), logits=logits, tokens=np.array(tokens), step_logits=step_logits)
    log(f"  HF reference: {len(prompt)}-token prompt, {len(tokens)} greedy tokens -> {ref_path}")
    result: dict = {"engine": "hf", "reference": str(ref_path)}
    if cfg["time_hf"]:
        result["timings"] = measure_engine(HfRunner(model, cfg), cfg, Prompts(cfg["shape"]["vocab"], cfg["seed"] + 1),
                                           mem)
        result["memory"] = mem.result()  # before the profiler adds its own buffers
        if cfg["profile_peers"]:
            try:
                result["profile"] = profile_decode(HfRunner(model, cfg), cfg, Prompts(cfg["shape"]["vocab"], 7),
                                                   result["timings"], "hf")
            except Exception as e:
                traceback.print_exc()
                result["profile"] = {"error": f"{type(e).__name__}: {e}"}
    # HF in fp32 on the same prompt: how far bf16 rounding alone moves the logits (sets the afs bound).
    try:
        model.float()
        logits_fp32 = hf_logits(model, prompt)
        own = norm_rel_error(logits, logits_fp32)
        np.savez(ref_path, prompt=np.array(prompt), logits=logits, tokens=np.array(tokens), step_logits=step_logits,
                 logits_fp32=logits_fp32, hf_bf16_vs_fp32=np.array(own))
        result["hf_bf16_vs_fp32"] = own
        log(f"  HF bf16 vs HF fp32 on the prompt: {own:.3g} (||a - b|| / ||b||)")
    except Exception as e:  # noqa: BLE001 - the fixed bound is used instead
        traceback.print_exc()
        result["hf_bf16_vs_fp32_error"] = f"{type(e).__name__}: {e}"
    del model
    if cfg["device"] == "cuda":
        torch.cuda.empty_cache()
    return result


class TorchRunner:
    name = "torch"

    def __init__(self, base, cfg: dict) -> None:
        import torch

        self.base, self.torch, self.device = base, torch, cfg["device"]

    def prepare(self, batch: int, context: int) -> None:
        self.base.set_cache(batch, context)

    def first_token(self, prompt: list[int]) -> int:
        ids = self.torch.tensor([prompt], device=self.device)
        return int(self.base.prefill(ids)[0, -1].argmax())

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        return self.base.generate(self.torch.tensor(prompts, device=self.device), n).tolist()


def phase_torch(cfg: dict) -> dict:
    import torch
    import torch._dynamo
    from reference import hf_greedy, hf_logits
    from torch_baseline import StaticOlmo2

    # One static graph per batch size, as gpt-fast compiles for the batch it serves.
    torch._dynamo.config.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    mem = PeakMemory(cfg["device"])
    model = load_hf(cfg)
    mode = cfg["torch_compile_mode"]
    base = StaticOlmo2(model, compile_mode=None if mode == "none" else mode)
    if not base.borrowed_weights(model):
        raise RuntimeError("the baseline holds weights that are not the HF model's own tensors")
    mem.note()
    result: dict = {"engine": "torch", "compile_mode": mode}

    # Correctness first, against HF in this process, on the reference prompt.
    prompt = reference_prompt(cfg)
    n = cfg["check_tokens"]
    logits = hf_logits(model, prompt)
    ref_tokens, ref_steps = hf_greedy(model, prompt, n)
    ref = {"logits": logits, "tokens": ref_tokens, "step_logits": ref_steps}
    ids = torch.tensor([prompt], device=cfg["device"])
    base.set_cache(1, cfg["prompt"] + cfg["new_tokens"])
    ours = base.prefill(ids, last_only=False)[0].float().cpu().numpy()
    steps: list = []
    t0 = time.perf_counter()
    tokens = base.generate(ids, n, step_logits=steps)[0].tolist()
    result["first_compile_s"] = time.perf_counter() - t0
    check = compare("torch", ours, tokens, np.stack([s[0].numpy() for s in steps]), ref, cfg)
    result["check"] = check
    log(f"  torch baseline vs HF: rel err {check['rel_err_vs_hf_bf16']:.3g}, greedy agree "
        f"{check['greedy_agree']}/{n} (identical {check['greedy_identical']}); compile + check {result['first_compile_s']:.1f} s")

    runner = TorchRunner(base, cfg)
    result["timings"] = measure_engine(runner, cfg, Prompts(cfg["shape"]["vocab"], cfg["seed"] + 2), mem)
    result["cudagraph_skips"] = _cudagraph_skips()
    if result["cudagraph_skips"]:
        log(f"  WARNING: torch.compile skipped CUDA graphs {result['cudagraph_skips']} time(s); see the log above")
    result["memory"] = mem.result()  # before the profiler adds its own buffers
    if cfg["profile_peers"]:
        try:
            result["profile"] = profile_decode(runner, cfg, Prompts(cfg["shape"]["vocab"], 7), result["timings"], "torch")
        except Exception as e:
            traceback.print_exc()
            result["profile"] = {"error": f"{type(e).__name__}: {e}"}
    return result


def _cudagraph_skips() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:  # noqa: BLE001 - only informative
        return 0


class AfsRunner:
    name = "afs"

    def __init__(self, engine) -> None:
        self.eng = engine

    def prepare(self, batch: int, context: int) -> None:
        pass

    def first_token(self, prompt: list[int]) -> int:
        return self.eng.generate(prompt, max_tokens=1, ignore_eos=True)[0]

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        if len(prompts) == 1:  # the single-request path, the batch-1 headline
            return [self.eng.generate(prompts[0], max_tokens=n, ignore_eos=True)]
        return self.eng.generate(prompts, max_tokens=n, ignore_eos=True)


def phase_afs(cfg: dict) -> dict:
    ref_path = Path(cfg["reference"])
    if not ref_path.exists():
        raise Refused(f"no HF reference at {ref_path} (the hf phase failed): afs is not timed unchecked")
    ref = dict(np.load(ref_path))
    if "hf_bf16_vs_fp32" in ref:
        ref["hf_bf16_vs_fp32"] = float(ref["hf_bf16_vs_fp32"])
    mem = PeakMemory(cfg["device"])  # before any CUDA call, as in the other phases
    if cfg["device"] == "cuda":
        import torch

        torch.cuda.init()  # torch and the engine share the device's primary context; the profiler needs it
    import afs

    o = cfg["afs"]
    t0 = time.perf_counter()
    eng = afs.load(cfg["engine_dir"], max_context=o["max_context"], kv_blocks=o["kv_blocks"],
                   kv_block_size=o["kv_block_size"], max_batch_tokens=o["max_batch_tokens"], cuda_graphs=o["cuda_graphs"],
                   kv_cache_dtype=o.get("kv_cache_dtype", "auto"))
    result: dict = {"engine": "afs", "backend": eng.backend, "load_s": time.perf_counter() - t0, "options": o}
    log(f"  {eng!r} loaded in {result['load_s']:.1f} s; options {o}")
    mem.note()

    prompt = [int(t) for t in ref["prompt"]]
    n = len(ref["tokens"])
    logits = eng.score(prompt)
    tokens = eng.generate(prompt, max_tokens=n, ignore_eos=True)
    # our logits along our own greedy path, for the two-sided top-5 rule
    steps = eng.score(prompt + tokens[:-1])[len(prompt) - 1 :]
    check = compare("afs", logits, tokens, steps, ref, cfg)
    # the batched path, which batch-8/64 decode times, must agree as well
    others = Prompts(cfg["shape"]["vocab"], cfg["seed"] + 3).many(min(7, max(cfg["batches"] or [2]) - 1), len(prompt))
    batch_tokens = eng.generate([prompt] + others, max_tokens=n, ignore_eos=True)[0]
    bsteps = eng.score(prompt + batch_tokens[:-1])[len(prompt) - 1 :]
    check["batched"] = compare("afs batched", logits, batch_tokens, bsteps, ref, cfg)
    result["check"] = check
    log(f"  afs vs HF: rel err {check['rel_err_vs_hf_bf16']:.3g} (bound {check['rel_err_bound']:.3g}), "
        f"greedy agree {check['greedy_agree']}/{n} (identical {check['greedy_identical']}); "
        f"batched path agree {check['batched']['greedy_agree']}/{n}")

    stats0 = _stats(eng)
    runner = AfsRunner(eng)
    result["timings"] = measure_engine(runner, cfg, Prompts(cfg["shape"]["vocab"], cfg["seed"] + 4), mem)
    result["stats_before"], result["stats_after"] = stats0, _stats(eng)
    try:
        result["engine_bench"] = dict(eng.bench(prompt_tokens=cfg["prompt"], gen_tokens=cfg["new_tokens"], warmup=1))
        log(f"  Engine.bench({cfg['prompt']}, {cfg['new_tokens']}): {result['engine_bench']}")
    except Exception as e:  # noqa: BLE001 - informative only
        result["engine_bench"] = {"error": f"{type(e).__name__}: {e}"}
    result["memory"] = mem.result()
    vocab = cfg["shape"]["vocab"]
    if cfg["device"] == "cuda":  # before the serialised tables below: the step as engines run it
        for key, b in (("profile_exposed", 1), ("profile_batch_exposed", max(cfg["batches"] or [0]))):
            if b >= 1:
                _attempt(result, key, lambda: profile_exposed(runner, cfg, Prompts(vocab, 10 + b), result["timings"],
                                                              "afs", batch=b))
    try:
        # Kernel by kernel without programmatic dependent launch: with it, each kernel starts while
        # its predecessor drains and CUPTI counts the overlap (the wait) in both. The step totals
        # above are with it, as engines run.
        if cfg["device"] == "cuda":
            del runner, eng
            gc.collect()
            os.environ["AFS_CUDA_PDL"] = "0"
            eng = afs.load(cfg["engine_dir"], max_context=o["max_context"], kv_blocks=o["kv_blocks"],
                           kv_block_size=o["kv_block_size"], max_batch_tokens=o["max_batch_tokens"],
                           cuda_graphs=o["cuda_graphs"], kv_cache_dtype=o.get("kv_cache_dtype", "auto"))
            runner = AfsRunner(eng)
            log("  kernel table measured with AFS_CUDA_PDL=0 (serialised launches)")
        result["profile"] = profile_decode(runner, cfg, Prompts(cfg["shape"]["vocab"], 7), result["timings"], "afs")
    except Exception as e:
        traceback.print_exc()
        result["profile"] = {"error": f"{type(e).__name__}: {e}"}
    if cfg["batches"]:  # the largest batch too: where a batched step's time goes
        _attempt(result, "profile_batch", lambda: profile_decode(runner, cfg, Prompts(vocab, 9), result["timings"],
                                                                 "afs", batch=max(cfg["batches"])))
    _attempt(result, "prefill_profile", lambda: profile_prefill(runner, cfg, Prompts(vocab, 8), result["timings"], "afs"))
    return result


def _attempt(result: dict, key: str, fn: Callable[[], dict]) -> None:
    """result[key] = fn(), or the failure as {"error": ...}: one table that fails leaves the others
    running, and the report names it."""
    try:
        result[key] = fn()
    except Exception as e:  # noqa: BLE001 - reported
        traceback.print_exc()
        result[key] = {"error": f"{type(e).__name__}: {e}"}


def _stats(eng) -> dict:
    try:
        return {k: v for k, v in eng.stats().items() if isinstance(v, (int, float))}
    except Exception:  # noqa: BLE001 - not every backend keeps scheduler counters
        return {}


PHASES = {"floors": phase_floors, "checkpoint": phase_checkpoint, "build": phase_build, "hf": phase_hf,
          "torch": phase_torch, "afs": phase_afs}


def main() -> None:
    phase, cfg_path, result_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    cfg = json.loads(cfg_path.read_text())
    t0 = time.perf_counter()
    try:
        result = PHASES[phase](cfg)
        result["ok"] = True
    except Refused as e:
        log(f"  REFUSED: {e}")
        result = {"ok": False, "refused": str(e)}
    except Exception as e:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000]}
    result["phase_seconds"] = time.perf_counter() - t0
    result_path.write_text(json.dumps(result, indent=1, default=_json_default))
    sys.stdout.flush()
    sys.stderr.flush()
    # NOTE: leave without interpreter teardown; a native engine module or compile workers must not
    # turn a finished phase into a hang or a crash at exit.
    os._exit(0)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    main()
