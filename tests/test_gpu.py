"""CUDA engines against HF transformers on the GPU (pytest -m gpu; skipped without a GPU).

Engines are built for the local GPU (--arch auto) in bf16 and compared in the same process with HF
transformers run on the GPU: prompt logits against HF bf16 and HF fp32, greedy tokens under the
vLLM rule, CUDA-graph vs eager decoding, CPU vs GPU engines of one checkpoint, and seeded sampling
on the device. The 7B-shaped and 32B-shaped cases live in benchmarks/gpu_check.py (minutes each) and
run here when AFS_GPU_LARGE=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHAPES, Shape, make_checkpoint
from reference import (GPU_TOLERANCE, assert_greedy_matches, check_cancellation_frees_blocks, check_greedy_close,
                       hf_greedy, load_hf_model, norm_rel_error)

pytestmark = pytest.mark.gpu

GPU_SHAPES = ["mha_hd128", "gqa2_hd64", "gqa4_hd64", "gqa5_hd64"]


def _load(path, **kw):
    """afs.load with an explicit KV pool: the default takes 90% of the GPU, and HF models and
    other engines share it here."""
    import afs

    return afs.load(path, kv_blocks=kw.pop("kv_blocks", 2048), **kw)


@pytest.fixture(scope="module")
def gpu_engines(tmp_path_factory):
    import afs
    from afs_build.cli import build_engine

    from dataclasses import replace

    root = tmp_path_factory.mktemp("gpu")
    built = {}

    def get(shape: str, arch: str = "auto", max_positions: int | None = None):
        """(checkpoint, engine) of a GPU shape, built once per module (engine builds are most of
        this suite's time); max_positions: a longer context than the shape's own."""
        sh = SHAPES[shape] if max_positions is None else replace(SHAPES[shape], max_positions=max_positions)
        key = (shape, arch, sh.max_positions)
        if key not in built:
            ckpt = root / f"ckpt-{shape}-{sh.max_positions}"
            if not ckpt.exists():
                make_checkpoint(ckpt, sh)
            out = root / f"engine-{shape}-{sh.max_positions}-{arch}"
            build_engine(model=str(ckpt), arch=arch, dtype="bf16", output=out, quiet=True)
            built[key] = (ckpt, out)
        return built[key]

    return get


def _prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab - 8, n).tolist()


def _check_against_hf(engine, ckpt, prompt: list[int], label: str, greedy_prompt: int = 24, fp8_kv: bool = False) -> None:
    """Prompt logits against HF bf16 and fp32 (GPU_TOLERANCE), greedy tokens under the vLLM rule.
    fp8_kv: HF's k and v are rounded to e4m3 as the engine's fp8 K/V cache rounds them."""
    import contextlib

    from reference import hf_with_fp8_kv

    with hf_with_fp8_kv() if fp8_kv else contextlib.nullcontext():
        _check_against_hf_models(engine, ckpt, prompt, label, greedy_prompt, fp8_kv)


def _check_against_hf_models(engine, ckpt, prompt: list[int], label: str, greedy_prompt: int, fp8_kv: bool) -> None:
    import torch

    ours = torch.from_numpy(engine.score(prompt)).double()
    hf16 = load_hf_model(ckpt, "bfloat16", device="cuda")
    with torch.no_grad():
        ref16 = hf16(torch.tensor([prompt], device="cuda")).logits[0].double().cpu()
    hf_tokens, hf_steps = hf_greedy(hf16, prompt[:greedy_prompt])
    hf32 = load_hf_model(ckpt, "float32", device="cuda")
    with torch.no_grad():
        ref32 = hf32(torch.tensor([prompt], device="cuda")).logits[0].double().cpu()

    err16 = norm_rel_error(ours.numpy(), ref16.numpy())
    err32 = norm_rel_error(ours.numpy(), ref32.numpy())
    hf_err32 = norm_rel_error(ref16.numpy(), ref32.numpy())
    print(f"{label}: vs HF bf16 {err16:.3e}, vs HF fp32 {err32:.3e}, HF bf16 vs HF fp32 {hf_err32:.3e}")
    # fp8 K/V: rounded HF fp32 is the oracle (see the note in GpuTolerance).
    assert fp8_kv or err16 <= GPU_TOLERANCE.vs_hf_bf16_bound(hf_err32), (
        f"relative error {err16:.3e} vs HF bf16 (vs HF fp32 {err32:.3e}; HF bf16 vs HF fp32 {hf_err32:.3e})"
    )
    assert err32 <= GPU_TOLERANCE.vs_hf_fp32_factor * hf_err32, (
        f"relative error vs HF fp32 {err32:.3e} is more than {GPU_TOLERANCE.vs_hf_fp32_factor} x HF bf16's own {hf_err32:.3e}"
    )
    tokens = engine.generate(prompt[:greedy_prompt], max_tokens=len(hf_tokens), ignore_eos=True)
    assert_greedy_matches("bf16", tokens, engine.score, prompt[:greedy_prompt], hf_tokens, hf_steps)


@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_engine_matches_hf(gpu_engines, shape):
    ckpt, out = gpu_engines(shape)
    engine = _load(out)
    assert engine.backend == "cuda"
    _check_against_hf(engine, ckpt, _prompt(SHAPES[shape].vocab, 200), shape)


@pytest.mark.parametrize("out16", ["1", "0"])
@pytest.mark.parametrize("shape", ["mha_hd128", "gqa5_hd64"])
def test_gpu_long_steps_match_hf(gpu_engines, monkeypatch, shape, out16):
    """Steps of more than 512 tokens write the projections' outputs in 16 bits (AFS_CUDA_OUT16=0
    keeps float32); both forms against HF, on a 1,100-token prompt run as one step, greedy
    continuation from 600 tokens of it."""
    ckpt, out = gpu_engines(shape, max_positions=2048)
    monkeypatch.setenv("AFS_CUDA_OUT16", out16)  # read when the engine loads
    engine = _load(out)
    _check_against_hf(engine, ckpt, _prompt(SHAPES[shape].vocab, 1100, seed=5), f"{shape} OUT16={out16}",
                      greedy_prompt=600)


def test_gpu_k_split_planes_match_hf(tmp_path_factory, monkeypatch):
    """Steps of 5-256 rows may split a projection's K over float32 planes that the next row kernel
    sums (linear_planes on sm90a; on unless AFS_CUDA_GEMM_PLANES=0). It needs K >= 1024, so this
    shape is wider than GPU_SHAPES: prompt logits of a 200-token step and the greedy continuations of a batch of 8 (decode steps of
    8 rows, CUDA graphs) against HF."""
    from afs_build.cli import build_engine

    sh = Shape("wide_hd128", hidden=1024, heads=8, kv_heads=4, intermediate=2816, vocab=512, rope_theta=10000.0)
    root = tmp_path_factory.mktemp("planes")
    ckpt = make_checkpoint(root / "ckpt", sh)
    build_engine(model=str(ckpt), arch="auto", dtype="bf16", output=root / "engine", quiet=True)
    monkeypatch.setenv("AFS_CUDA_GEMM_PLANES", "1")  # read when the engine loads
    engine = _load(root / "engine")
    _check_against_hf(engine, ckpt, _prompt(sh.vocab, 200, seed=9), sh.name)

    hf16 = load_hf_model(ckpt, "bfloat16", device="cuda")
    prompts = [_prompt(sh.vocab, n, seed=40 + n) for n in (9, 17, 23, 30, 38, 44, 51, 60)]
    batched = engine.generate(prompts, max_tokens=16, ignore_eos=True)
    for p, tokens in zip(prompts, batched):
        hf_tokens, hf_steps = hf_greedy(hf16, p, n=16)
        assert_greedy_matches("bf16", tokens, engine.score, p, hf_tokens, hf_steps)


@pytest.mark.parametrize("shape", ["gqa2_hd64", "mha_hd128"])
def test_cuda_graph_and_eager_agree(gpu_engines, shape):
    import afs

    _, out = gpu_engines(shape)
    prompt = _prompt(SHAPES[shape].vocab, 40, seed=3)
    graph = _load(out).generate(prompt, max_tokens=64, ignore_eos=True)
    eager = _load(out, cuda_graphs=False).generate(prompt, max_tokens=64, ignore_eos=True)
    assert graph == eager


def test_cpu_and_gpu_engines_agree(gpu_engines):
    import afs

    shape = "gqa4_hd64"
    _, gpu_dir = gpu_engines(shape)
    _, cpu_dir = gpu_engines(shape, arch="cpu")
    prompt = _prompt(SHAPES[shape].vocab, 128, seed=5)
    gpu = _load(gpu_dir).score(prompt)
    cpu = _load(cpu_dir).score(prompt)
    assert norm_rel_error(gpu, cpu) <= GPU_TOLERANCE.vs_hf_bf16


def test_device_sampling_is_seeded(gpu_engines):
    import afs

    _, out = gpu_engines("gqa2_hd64")
    e = _load(out)
    prompt = _prompt(SHAPES["gqa2_hd64"].vocab, 16, seed=7)
    kw = dict(max_tokens=48, temperature=1.0, top_k=50, top_p=0.9, ignore_eos=True)
    a = e.generate(prompt, seed=11, **kw)
    b = e.generate(prompt, seed=11, **kw)
    c = e.generate(prompt, seed=12, **kw)
    assert a == b
    assert a != c
    # top_k=1 is greedy whatever the temperature.
    assert e.generate(prompt, max_tokens=16, temperature=0.7, top_k=1, seed=3) == e.generate(prompt, max_tokens=16)


# ---- continuous batching on the GPU ---------------------------------------------------------
# A batched row runs other kernels than a solo one (GEMM instead of GEMV past 8 rows, decode vs
# prefill attention for single-token chunks), so outputs are compared under the top-5 rule: equal
# until the first divergence, where each side's token is in the other's top 5.


def _prompts(vocab: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab - 8, int(k)).tolist() for k in rng.integers(lo, hi, n)]


def _assert_close_to_solo(e, prompts, batched, solo) -> int:
    exact = 0
    for p, a, b in zip(prompts, batched, solo):
        assert len(a) == len(b)
        if a == b:
            exact += 1
            continue
        la = e.score(p + a[:-1])[len(p) - 1:]
        lb = e.score(p + b[:-1])[len(p) - 1:]
        check_greedy_close(a, la, b, lb, k=5, names=("batched", "solo"))
    return exact


@pytest.mark.parametrize("shape", ["gqa4_hd64", "mha_hd128"])
def test_gpu_batched_greedy_matches_solo(gpu_engines, shape):
    _, out = gpu_engines(shape)
    e = _load(out, kv_blocks=1024, max_batch_tokens=256)  # small steps: prefill chunks mix with decodes
    prompts = _prompts(SHAPES[shape].vocab, 24, 1, 400, seed=21)
    solo = [e.generate(p, max_tokens=32, ignore_eos=True) for p in prompts]
    batched = e.generate(prompts, max_tokens=32, ignore_eos=True)
    exact = _assert_close_to_solo(e, prompts, batched, solo)
    print(f"{shape}: {exact} of {len(prompts)} batched outputs token-identical to solo")
    assert e.stats()["kv_blocks_free"] == 1024


@pytest.mark.parametrize("shape", ["mha_hd128", "gqa5_hd64"])
def test_gpu_fused_decode_attention(gpu_engines, monkeypatch, shape):
    """The decode attention of decode-only steps may do the q/k norm, RoPE and K/V write itself
    (by default up to 4 rows; AFS_CUDA_FUSED_DECODE=1 at every batch size, =0 never). It is built
    to compute the same bits as the separate kernels, as is the attention's own combine of its
    splits (on unless AFS_CUDA_FUSED_COMBINE=0; with one split per sequence it writes the output
    directly): the greedy continuations (one request, and a batch of 8 in CUDA graphs) with both on
    must equal those with both off, and so must every decode step's log-probabilities, float for
    float (a token can survive a changed bit; a logsumexp over the vocabulary hardly can). Run at
    the default context and at max_context 256 (one split). The fused engine passes the HF checks
    itself."""
    import afs

    ckpt, out = gpu_engines(shape)
    prompts = _prompts(SHAPES[shape].vocab, 8, 5, 120, seed=31)
    with_lp = afs.SamplingParams(max_tokens=32, ignore_eos=True, logprobs=5)

    def run(engine):
        return (engine.generate(prompts[0], max_tokens=48, ignore_eos=True),
                engine.generate(prompts, max_tokens=48, ignore_eos=True),
                engine.generate_full(prompts[0], max_tokens=32, ignore_eos=True, logprobs=5)["logprobs"],
                [r["logprobs"] for r in engine.generate_batch(prompts, with_lp)])

    def plain_and_fused(**kw):
        monkeypatch.setenv("AFS_CUDA_FUSED_DECODE", "0")  # read when the engine loads
        monkeypatch.setenv("AFS_CUDA_FUSED_COMBINE", "0")  # attention_decode_combine after the attention
        plain = _load(out, **kw)
        want = run(plain)
        del plain
        monkeypatch.setenv("AFS_CUDA_FUSED_DECODE", "1")
        monkeypatch.setenv("AFS_CUDA_FUSED_COMBINE", "1")
        fused = _load(out, **kw)
        # TokenLogprobs compare token, logprob and top-5 exactly.
        for what, got, ref in zip(("solo", "batch", "solo logprobs", "batch logprobs"), run(fused), want):
            assert got == ref, f"{what} {kw}"
        return fused

    fused = plain_and_fused()
    plain_and_fused(max_context=256)
    plain_and_fused(kv_cache_dtype="fp8")
    _check_against_hf(fused, ckpt, _prompt(SHAPES[shape].vocab, 200), f"{shape} fused decode")


@pytest.mark.parametrize("shape", ["mha_hd128", "gqa5_hd64"])
def test_gpu_fp8_kv_matches_hf_with_rounded_kv(gpu_engines, shape):
    """kv_cache_dtype="fp8": the decode attention reads e4m3 pools, prefill reads them widened into
    16-bit staging; against HF whose k and v are rounded the same way. Prompts of 200 tokens in one
    step, and of 400 in chunks of 128 (max_batch_tokens), whose later chunks read earlier keys back
    from the e4m3 pool."""
    ckpt, out = gpu_engines(shape)
    vocab = SHAPES[shape].vocab
    _check_against_hf(_load(out, kv_cache_dtype="fp8"), ckpt, _prompt(vocab, 200), f"{shape} fp8 K/V", fp8_kv=True)
    chunked = _load(out, kv_cache_dtype="fp8", max_batch_tokens=128)
    _check_against_hf(chunked, ckpt, _prompt(vocab, 400, seed=2), f"{shape} fp8 K/V, 128-token chunks",
                      greedy_prompt=300, fp8_kv=True)


def test_gpu_fp8_kv_prefix_cache_and_batching(gpu_engines):
    """fp8 K/V: prefix-cache hits (the rest of the prompt reads the cached e4m3 keys through the
    staging) and continuous batching give the solo outputs (vLLM top-5 rule at a divergence), and
    the pool is whole again at the end."""
    shape = "gqa2_hd64"
    _, out = gpu_engines(shape)
    vocab = SHAPES[shape].vocab
    e = _load(out, kv_blocks=256, kv_block_size=16, max_batch_tokens=192, kv_cache_dtype="fp8")
    base = _prompts(vocab, 1, 70, 71, seed=3)[0]
    prompts = [base + [i + 1] for i in range(6)] + _prompts(vocab, 10, 1, 300, seed=8)
    solo = [e.generate(p, max_tokens=16, ignore_eos=True) for p in prompts]
    before = e.stats()
    batched = e.generate(prompts, max_tokens=16, ignore_eos=True)
    assert e.stats()["prefix_cache_hits"] > before["prefix_cache_hits"]
    exact = _assert_close_to_solo(e, prompts, batched, solo)
    print(f"fp8 K/V: {exact} of {len(prompts)} batched outputs token-identical to solo")
    assert e.stats()["kv_blocks_free"] == 256


def test_gpu_prefix_cache_and_oversubscribed_pool(gpu_engines):
    import afs

    shape = "gqa2_hd64"
    _, out = gpu_engines(shape)
    vocab = SHAPES[shape].vocab
    e = _load(out, kv_blocks=128, kv_block_size=16)
    base = _prompts(vocab, 1, 70, 71, seed=3)[0]
    prompts = [base + [i + 1] for i in range(6)]
    solo = [e.generate(p, max_tokens=12, ignore_eos=True) for p in prompts]
    e.generate(prompts, max_tokens=12, ignore_eos=True)
    before = e.stats()
    again = e.generate(prompts, max_tokens=12, ignore_eos=True)
    after = e.stats()
    assert after["prefix_cache_hits"] > before["prefix_cache_hits"]
    assert after["cached_prompt_tokens"] - before["cached_prompt_tokens"] >= 6 * 64
    _assert_close_to_solo(e, prompts, again, solo)

    # 4x more concurrent demand than the pool holds: preemption by recompute, nothing lost.
    small = _load(out, kv_blocks=24, kv_block_size=16, max_batch_tokens=128)
    prompts = _prompts(vocab, 16, 40, 60, seed=4)
    solo = [small.generate(p, max_tokens=40, ignore_eos=True) for p in prompts]
    res = small.generate_batch(prompts, afs.SamplingParams(max_tokens=40, ignore_eos=True))
    assert all(r["finish_reason"] == "length" for r in res)
    _assert_close_to_solo(small, prompts, [r["tokens"] for r in res], solo)
    assert small.stats()["preemptions"] > 0
    assert small.stats()["kv_blocks_free"] == 24


def test_gpu_cancellation_frees_blocks(gpu_engines):
    _, out = gpu_engines("gqa2_hd64")
    e = _load(out, kv_blocks=64)
    check_cancellation_frees_blocks(e, _prompts(SHAPES["gqa2_hd64"].vocab, 1, 30, 31, seed=5)[0], blocks=64)


@pytest.mark.skipif(os.environ.get("AFS_GPU_LARGE") != "1", reason="large shapes: set AFS_GPU_LARGE=1 (minutes)")
@pytest.mark.parametrize("case", ["olmo2_32b_4layers", "olmo2_7b"])
def test_large_shapes(case, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from gpu_check import run_case

    rows: list[dict] = []
    run_case(case, tmp_path, rows)
    r = rows[-1]
    assert r["rel_err_vs_hf_bf16"] <= GPU_TOLERANCE.vs_hf_bf16
    assert r["rel_err_vs_hf_fp32"] <= GPU_TOLERANCE.vs_hf_fp32_factor * r["hf_bf16_vs_fp32"]
    assert r["top5_rule"] and r["graph_eq_eager"]
