"""Continuous batching on the CPU (paged KV cache, scheduler, prefix cache) against the oracle of
running each request alone, which test_model_cpu.py checks against HF transformers.

On the CPU every row of a batch is computed exactly as it is alone, so batched greedy outputs must
be token-identical to solo runs (and seeded sampling too)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import afs
from reference import check_cancellation_frees_blocks

SHAPE = "gqa2_hd64"


@pytest.fixture(scope="module")
def built(engines):
    return engines.get(SHAPE, "fp32")


def _prompts(vocab: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab - 4, int(k)).tolist() for k in rng.integers(lo, hi, n)]


def test_batched_greedy_equals_solo(built):
    e = afs.load(built.dir, threads=1, kv_blocks=256, max_batch_tokens=96)
    prompts = _prompts(built.shape.vocab, 20, 2, 150, seed=1)
    solo = [e.generate(p, max_tokens=24, ignore_eos=True) for p in prompts]
    assert e.generate(prompts, max_tokens=24, ignore_eos=True) == solo


def test_batched_sampling_per_request_params_equal_solo(built):
    e = afs.load(built.dir, threads=1, kv_blocks=256)
    prompts = _prompts(built.shape.vocab, 8, 3, 60, seed=2)
    params = [afs.SamplingParams(max_tokens=16, temperature=0.5 + 0.1 * i, top_k=(0, 5, 40)[i % 3],
                                 top_p=(1.0, 0.9, 0.7)[i % 3], seed=100 + i, ignore_eos=True) for i in range(8)]
    solo = [e.generate(p, sampling_params=sp) for p, sp in zip(prompts, params)]
    assert e.generate(prompts, sampling_params=params) == solo


def test_prefix_cache_hits_give_the_same_output(built):
    e = afs.load(built.dir, threads=1, kv_blocks=128, kv_block_size=16)
    base = _prompts(built.shape.vocab, 1, 70, 71, seed=3)[0]
    prompts = [base + [i + 1] for i in range(6)]
    solo = [e.generate(p, max_tokens=12, ignore_eos=True) for p in prompts]
    # The first batch computes the shared prefix and publishes its full blocks; the second reuses them.
    assert e.generate(prompts, max_tokens=12, ignore_eos=True) == solo
    before = e.stats()
    assert e.generate(prompts, max_tokens=12, ignore_eos=True) == solo
    after = e.stats()
    assert after["prefix_cache_hits"] > before["prefix_cache_hits"]
    assert after["cached_prompt_tokens"] - before["cached_prompt_tokens"] >= 6 * 64


@pytest.mark.parametrize("blocks,n,lo,hi,seed", [
    (24, 16, 40, 60, 4),   # 4x more concurrent demand than the pool holds: preemption by recompute
    (12, 24, 90, 110, 8),  # a pool barely larger than one sequence: requests wait and return many times
])
def test_more_requests_than_blocks_all_finish(built, blocks, n, lo, hi, seed):
    e = afs.load(built.dir, threads=1, kv_blocks=blocks, kv_block_size=16, max_batch_tokens=128)
    prompts = _prompts(built.shape.vocab, n, lo, hi, seed=seed)
    solo = [e.generate(p, max_tokens=40, ignore_eos=True) for p in prompts]
    out = e.generate_batch(prompts, afs.SamplingParams(max_tokens=40, ignore_eos=True))
    assert [r["tokens"] for r in out] == solo  # nothing lost, nothing ended early
    assert all(r["finish_reason"] == "length" for r in out)
    assert e.stats()["preemptions"] > 0
    assert e.stats()["kv_blocks_free"] == blocks


def test_cancellation_frees_blocks(built):
    e = afs.load(built.dir, threads=1, kv_blocks=64)
    check_cancellation_frees_blocks(e, _prompts(built.shape.vocab, 1, 30, 31, seed=5)[0], blocks=64)


def test_concurrent_submits_from_threads_and_asyncio(built):
    e = afs.load(built.dir, threads=1, kv_blocks=128)
    prompts = _prompts(built.shape.vocab, 6, 5, 40, seed=6)
    solo = [e.generate(p, max_tokens=10, ignore_eos=True) for p in prompts]
    results: dict[int, list[int]] = {}

    def worker(i):
        results[i] = list(e.submit(prompts[i], afs.SamplingParams(max_tokens=10, ignore_eos=True)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()

    async def collect(i):
        return [t async for t in e.submit(prompts[i], afs.SamplingParams(max_tokens=10, ignore_eos=True))]

    async def main():
        return await asyncio.gather(*(collect(i) for i in range(3, 6)))

    for i, toks in zip(range(3, 6), asyncio.run(main())):
        results[i] = toks
    for t in threads:
        t.join()
    assert [results[i] for i in range(6)] == solo


def test_soak_1000_random_requests(built):
    """1,000 requests with random lengths and parameters through a small pool: zero failures,
    every request ends for a reason that fits it, and the pool is whole again at the end."""
    e = afs.load(built.dir, threads=1, kv_blocks=48, kv_block_size=8, max_batch_tokens=64)
    rng = np.random.default_rng(7)
    vocab = built.shape.vocab
    prompts, params = [], []
    for i in range(1000):
        prompts.append(rng.integers(0, vocab, int(rng.integers(1, 48))).tolist())
        params.append(afs.SamplingParams(
            max_tokens=int(rng.integers(1, 12)), temperature=float(rng.choice([0.0, 0.7, 1.3])),
            top_k=int(rng.choice([0, 1, 20])), top_p=float(rng.choice([1.0, 0.8])), seed=int(rng.integers(0, 2**32)),
            stop_token_ids=[int(rng.integers(0, vocab))] if rng.random() < 0.3 else [],
            ignore_eos=bool(rng.random() < 0.5)))
    out = e.generate_batch(prompts, params)
    assert len(out) == 1000
    for r, sp in zip(out, params):
        assert r["finish_reason"] in ("length", "stop"), r
        assert 1 <= len(r["tokens"]) <= sp.max_tokens
        if r["finish_reason"] == "length":
            assert len(r["tokens"]) == sp.max_tokens
        else:
            stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(e.eos_token_ids))
            assert r["tokens"][-1] in stops
    stats = e.stats()
    assert stats["kv_blocks_free"] == 48 and stats["running"] == 0 and stats["waiting"] == 0
