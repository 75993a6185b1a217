"""The fp8 (e4m3) K/V cache (load(kv_cache_dtype="fp8")) on the CPU.

Oracles: torch.float8_e4m3fn for the rounding itself, and HF transformers in float32 with its keys
(after RoPE) and values rounded through torch.float8_e4m3fn before the attention: an fp32 engine with
an fp8 cache computes that model, so its logits match it (reference.TOLERANCES["fp8kv"] says how
closely and why) and stay measurably away from the unrounded model."""

from __future__ import annotations

import numpy as np
import pytest

import afs
from afs import _native
from conftest import SHAPES, run_engine
from reference import (
    GREEDY_TOKENS,
    TOLERANCES,
    assert_greedy_matches,
    assert_logits_close,
    hf_greedy,
    hf_logits,
    hf_with_fp8_kv,
    max_rel_error,
)

SHAPES_FP8 = ["mha_hd128", "gqa4_hd64"]


def _prompt(shape: str, n: int, salt: int = 0) -> list[int]:
    rng = np.random.default_rng(77 + n + salt + SHAPES[shape].vocab)
    return rng.integers(0, SHAPES[shape].vocab, size=n).tolist()


def test_rounding_matches_torch():
    import torch

    rng = np.random.default_rng(5)
    x = (rng.standard_normal(100_000) * np.exp2(rng.integers(-14, 10, 100_000))).astype(np.float32)
    table = np.array(_native.fp8_e4m3_values(bytes(range(256))), dtype=np.float32)
    finite = table[np.isfinite(table)]
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # ties: round to even
    edges = np.concatenate([finite, np.nextafter(finite, np.float32(np.inf)), np.nextafter(finite, np.float32(-np.inf))])
    x = np.concatenate([x, finite, mids, edges]).astype(np.float32)
    x = x[np.abs(x) <= 448]
    got = np.frombuffer(_native.fp8_e4m3_bytes(x.tolist()), dtype=np.uint8)
    ref = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    bad = np.flatnonzero(got != ref)
    assert bad.size == 0, f"{bad.size} values round differently from torch, e.g. {x[bad[:5]]}: {got[bad[:5]]} vs {ref[bad[:5]]}"
    # Every byte's value, as torch reads it.
    ref_table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(np.isnan(table), np.isnan(ref_table))
    assert np.array_equal(table[~np.isnan(table)], ref_table[~np.isnan(ref_table)])
    # Saturation (the GPU's satfinite) and NaN.
    sat = np.frombuffer(_native.fp8_e4m3_bytes([448.0, 460.0, 1e6, float("inf"), -500.0, float("-inf")]), np.uint8)
    assert sat.tolist() == [0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE]
    assert np.isnan(_native.fp8_e4m3_values(_native.fp8_e4m3_bytes([float("nan")]))[0])


@pytest.fixture(scope="module")
def fp8_engines(engines):
    return {s: afs.load(engines.get(s, "fp32").dir, kv_cache_dtype="fp8") for s in SHAPES_FP8}


@pytest.mark.parametrize("length", [7, 64])
@pytest.mark.parametrize("shape", SHAPES_FP8)
def test_logits_match_hf_with_rounded_kv(engines, fp8_engines, shape, length):
    ids = _prompt(shape, length)
    got = fp8_engines[shape].score(ids)
    hf = engines.hf_model(shape, "float32")
    plain = hf_logits(hf, ids)
    with hf_with_fp8_kv(hf):
        rounded = hf_logits(hf, ids)
    err = assert_logits_close(got, rounded, "fp8kv", f"{shape} fp8 K/V vs HF with rounded K/V")
    # The rounding is really there: the unrounded model is much further away than the bound.
    far = max_rel_error(got, plain)
    assert far > 20 * TOLERANCES["fp8kv"].logits_rel, f"fp8 K/V engine only {far:.3g} from unrounded HF ({err:.3g})"


@pytest.mark.parametrize("shape", SHAPES_FP8)
def test_greedy_matches_hf_with_rounded_kv(engines, fp8_engines, shape):
    ids = _prompt(shape, 24, salt=1)
    hf = engines.hf_model(shape, "float32")
    with hf_with_fp8_kv(hf):
        hf_tokens, hf_steps = hf_greedy(hf, ids, GREEDY_TOKENS)
    e = fp8_engines[shape]
    tokens = e.generate(ids, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    assert_greedy_matches("fp8kv", tokens, e.score, ids, hf_tokens, hf_steps)


def test_batching_is_exact_with_fp8_kv(fp8_engines):
    e = fp8_engines["gqa4_hd64"]
    prompts = [_prompt("gqa4_hd64", n, salt=n) for n in (3, 17, 40, 9)]
    solo = [e.generate(p, max_tokens=12, ignore_eos=True) for p in prompts]
    assert e.generate(prompts, max_tokens=12, ignore_eos=True) == solo


def test_kv_cache_dtype_is_reported(fp8_engines, engines):
    e = fp8_engines["gqa4_hd64"]
    assert e.kv_cache_dtype == "fp8" and "kv_cache_dtype=fp8" in repr(e)
    assert engines.get("gqa4_hd64", "fp32").engine.kv_cache_dtype == "auto"


def test_bad_kv_cache_dtype(engines):
    d = engines.get("gqa4_hd64", "fp32").dir
    for bad in ("fp4", "FP8", "", "bf16 "):
        with pytest.raises(afs.EngineError, match="kv_cache_dtype must be one of auto, fp8"):
            afs.load(d, kv_cache_dtype=bad)


def test_binary_kv_cache_dtype(engines, fp8_engines):
    import json

    built = engines.get("gqa4_hd64", "fp32")
    ids = _prompt("gqa4_hd64", 12, salt=3)
    args = ["generate", "--token-ids", ",".join(map(str, ids)), "--max-tokens", "16", "--ignore-eos", "--json"]
    r = run_engine(built.binary, *args, "--kv-cache-dtype", "fp8")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == fp8_engines["gqa4_hd64"].generate(ids, max_tokens=16, ignore_eos=True)
    r = run_engine(built.binary, *args, "--kv-cache-dtype", "e5m2")
    assert r.returncode != 0
    assert "kv_cache_dtype must be 'auto' or 'fp8', got 'e5m2'" in r.stderr
