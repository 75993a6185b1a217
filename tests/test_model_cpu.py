"""End-to-end CPU engines against HF transformers: logits, greedy decoding, sampling, the binary and the API.

Every engine variant is built once per session (conftest.EngineCache); every comparison uses the
rules and tolerances of reference.py. Shapes cover MHA, GQA 2/4/5, head_dim 64 and 128, and
intermediate sizes that are not multiples of 64.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DEFAULT_SHAPE, SHAPES, run_engine
from reference import (
    GREEDY_TOKENS,
    TOLERANCES,
    assert_greedy_matches,
    assert_logits_close,
    hf_greedy,
    hf_logits,
)

FP32_SHAPES = list(SHAPES)
BF16_SHAPES = ["gqa2_hd64", "gqa5_hd64"]
FP16_SHAPES = ["mha_hd128"]
SCORE_LENGTHS = [1, 7, 64, 256]
GREEDY_PROMPT_LENGTHS = [5, 256]


def prompt(shape: str, length: int, salt: int = 0) -> list[int]:
    """A deterministic prompt of random token ids of `shape`'s vocabulary."""
    rng = np.random.default_rng(1000 * length + 17 * salt + SHAPES[shape].vocab)
    return rng.integers(0, SHAPES[shape].vocab, size=length).tolist()


# ---------------------------------------------------------------------------------------------
# Against the HF oracle


@pytest.mark.parametrize("length", SCORE_LENGTHS)
@pytest.mark.parametrize("shape", FP32_SHAPES)
def test_fp32_logits_match_hf(engines, shape, length):
    e = engines.get(shape, "fp32").engine
    hf = engines.hf_model(shape, TOLERANCES["fp32"].oracle_dtype)
    ids = prompt(shape, length)
    got = e.score(ids)
    assert got.dtype == np.float32 and got.shape == (length, SHAPES[shape].vocab)
    assert_logits_close(got, hf_logits(hf, ids), "fp32", f"{shape}, {length}-token prompt")


@pytest.mark.parametrize("length", GREEDY_PROMPT_LENGTHS)
@pytest.mark.parametrize("shape", FP32_SHAPES)
def test_fp32_greedy_matches_hf(engines, shape, length):
    e = engines.get(shape, "fp32").engine
    hf = engines.hf_model(shape, TOLERANCES["fp32"].oracle_dtype)
    ids = prompt(shape, length, salt=1)
    hf_tokens, hf_steps = hf_greedy(hf, ids, GREEDY_TOKENS)
    got = e.generate(ids, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    assert_greedy_matches("fp32", got, e.score, ids, hf_tokens, hf_steps)


@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_bf16_greedy_matches_hf_bf16(engines, shape):
    e = engines.get(shape, "bf16").engine
    hf = engines.hf_model(shape, TOLERANCES["bf16"].oracle_dtype)
    for length in GREEDY_PROMPT_LENGTHS:
        ids = prompt(shape, length, salt=2)
        hf_tokens, hf_steps = hf_greedy(hf, ids, GREEDY_TOKENS)
        got = e.generate(ids, max_tokens=GREEDY_TOKENS, ignore_eos=True)
        assert_greedy_matches("bf16", got, e.score, ids, hf_tokens, hf_steps)


@pytest.mark.parametrize("shape", FP16_SHAPES)
def test_fp16_engine_sanity(engines, shape):
    e = engines.get(shape, "fp16").engine
    hf = engines.hf_model(shape, TOLERANCES["fp16"].oracle_dtype)
    ids = prompt(shape, 64, salt=3)
    assert_logits_close(e.score(ids), hf_logits(hf, ids), "fp16", f"{shape} fp16 engine vs HF fp32")
    hf_tokens, hf_steps = hf_greedy(hf, ids, GREEDY_TOKENS)
    got = e.generate(ids, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    assert_greedy_matches("fp16", got, e.score, ids, hf_tokens, hf_steps)


@pytest.mark.parametrize("variant", ["sharded", "dialect4"])
def test_checkpoint_variants_match_hf(engines, variant):
    """A sharded checkpoint (with its index) and a 4.x-dialect config.json build the same engine."""
    built = engines.get(DEFAULT_SHAPE, "fp32", variant)
    plain = engines.get(DEFAULT_SHAPE, "fp32")
    ckpt = built.checkpoint
    cfg = json.loads((ckpt / "config.json").read_text())
    if variant == "sharded":
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1
        assert sorted(built.manifest()["source"]["shards"]) == shards
    else:
        assert "rope_parameters" not in cfg and "dtype" not in cfg
        assert cfg["rope_theta"] == SHAPES[DEFAULT_SHAPE].rope_theta and cfg["rope_scaling"] is None
        assert cfg["torch_dtype"] == "float32"
    # Same model, so the same spec: the engine differs from the plain build only in its source.
    assert built.manifest()["spec_hash"] == plain.manifest()["spec_hash"]

    e = built.engine
    hf = engines.hf_model(DEFAULT_SHAPE, "float32", variant)
    ids = prompt(DEFAULT_SHAPE, 256, salt=4)
    assert_logits_close(e.score(ids), hf_logits(hf, ids), "fp32", f"{variant} checkpoint")
    short = ids[:9]
    hf_tokens, hf_steps = hf_greedy(hf, short, GREEDY_TOKENS)
    got = e.generate(short, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    assert_greedy_matches("fp32", got, e.score, short, hf_tokens, hf_steps)


# ---------------------------------------------------------------------------------------------
# The engine against itself: KV cache, sampling, stops


@pytest.mark.parametrize("shape", FP32_SHAPES)
def test_kv_cache_decode_equals_recompute(engines, shape):
    """Greedy tokens from incremental decode equal the argmax chain of a full recompute."""
    e = engines.get(shape, "fp32").engine
    ids = prompt(shape, 33, salt=5)
    gen = e.generate(ids, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    assert len(gen) == GREEDY_TOKENS
    full = e.score(ids + gen)
    chain = full[len(ids) - 1 : -1].argmax(axis=-1).tolist()
    assert chain == gen


def test_score_prefix_is_causal(default_engine):
    """Scoring a prefix gives the prefix of the full scores (chunking never leaks future tokens)."""
    e = default_engine.engine
    ids = prompt(DEFAULT_SHAPE, 100, salt=6)
    full = e.score(ids)
    for n in (1, 5, 64, 99):
        assert_logits_close(e.score(ids[:n]), full[:n], "fp32", f"prefix of {n}")


def test_seeded_sampling_is_reproducible(default_engine):
    e = default_engine.engine
    ids = prompt(DEFAULT_SHAPE, 8, salt=7)
    kw = dict(max_tokens=GREEDY_TOKENS, temperature=1.0, ignore_eos=True)
    a = e.generate(ids, seed=1234, **kw)
    assert e.generate(ids, seed=1234, **kw) == a
    others = [e.generate(ids, seed=s, **kw) for s in (1, 2, 3)]
    assert any(o != a for o in others), "different seeds gave the same samples"
    assert len({tuple(o) for o in others}) > 1
    greedy = e.generate(ids, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    assert a != greedy, "temperature 1.0 sampled exactly the greedy sequence"
    # The full sampler stack is seeded too.
    kw2 = dict(kw, temperature=0.8, top_k=50, top_p=0.9, min_p=0.02)
    assert e.generate(ids, seed=99, **kw2) == e.generate(ids, seed=99, **kw2)


def test_truncating_samplers_equal_greedy(default_engine):
    """top_k=1, a tiny top_p and min_p=1 leave only the most likely token: greedy, whatever the seed."""
    e = default_engine.engine
    ids = prompt(DEFAULT_SHAPE, 8, salt=8)
    greedy = e.generate(ids, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    for seed in (0, 1, 77):
        base = dict(max_tokens=GREEDY_TOKENS, temperature=1.0, seed=seed, ignore_eos=True)
        assert e.generate(ids, top_k=1, **base) == greedy
        assert e.generate(ids, top_p=1e-6, **base) == greedy
        assert e.generate(ids, min_p=1.0, **base) == greedy


def test_stop_tokens_and_eos(default_engine):
    e = default_engine.engine
    ids = prompt(DEFAULT_SHAPE, 10, salt=9)
    greedy = e.generate(ids, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    stop = greedy[5]
    r = e.generate_full(ids, max_tokens=GREEDY_TOKENS, stop_token_ids=[stop], ignore_eos=True)
    k = greedy.index(stop)
    assert r["tokens"] == greedy[: k + 1] and r["finish_reason"] == "stop"
    # Without ignore_eos the model's EOS id (config.json eos_token_id) ends generation, and is returned.
    eos = SHAPES[DEFAULT_SHAPE].eos_token_id
    assert e.eos_token_ids == [eos]
    r = e.generate_full(ids, max_tokens=GREEDY_TOKENS)
    expected = greedy[: greedy.index(eos) + 1] if eos in greedy else greedy
    assert r["tokens"] == expected
    assert r["finish_reason"] == ("stop" if eos in greedy else "length")
    r = e.generate_full(ids, max_tokens=3, ignore_eos=True)
    assert r["tokens"] == greedy[:3] and r["finish_reason"] == "length"
    assert r["prefill_seconds"] >= 0 and r["decode_seconds"] >= 0


# ---------------------------------------------------------------------------------------------
# The binary


def _engine_json(built, *args):
    r = run_engine(built.binary, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize(
    "sampling",
    [
        {},
        {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.01, "seed": 4242},
        {"temperature": 1.3, "seed": 7},
    ],
    ids=["greedy", "top-k-p-min-p", "temperature"],
)
def test_binary_generate_equals_python(default_engine, sampling):
    built = default_engine
    ids = prompt(DEFAULT_SHAPE, 12, salt=10)
    args = ["generate", "--token-ids", ",".join(map(str, ids)), "--max-tokens", "20", "--ignore-eos"]
    for k, v in sampling.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    out = _engine_json(built, *args)
    py = built.engine.generate_full(ids, max_tokens=20, ignore_eos=True, **sampling)
    assert out["tokens"] == py["tokens"]
    assert out["finish_reason"] == py["finish_reason"] == "length"
    assert out["prompt_tokens"] == len(ids)
    assert out["random_weights"] is False
    assert out["prefill_seconds"] >= 0 and out["decode_seconds"] >= 0 and out["decode_tok_s"] >= 0
    # Without --json the binary streams the same ids, space-separated, on stdout.
    plain = run_engine(built.binary, *args)
    assert plain.returncode == 0, plain.stderr
    assert [int(t) for t in plain.stdout.split()] == py["tokens"]
    assert "finish: length" in plain.stderr


def test_binary_info(default_engine):
    built = default_engine
    s = SHAPES[DEFAULT_SHAPE]
    info = _engine_json(built, "info")
    manifest = built.manifest()
    assert info["spec_hash"] == manifest["spec_hash"]
    assert info["spec_name"] == f"olmo2_l{s.layers}_h{s.hidden}_hd{s.head_dim}_gqa{s.gqa}_fp32_cpu"
    assert info["backend"] == "cpu"
    assert info["vocab_size"] == s.vocab
    assert info["max_context"] == s.max_positions
    assert info["eos_token_ids"] == [s.eos_token_id]
    assert info["file_bytes"] == built.model_file.stat().st_size
    names = [t["name"] for t in info["tensors"]]
    assert len(names) == 3 + 8 * s.layers
    assert names[0] == "embed" and names[-2:] == ["final_norm", "lm_head"]
    by_name = {t["name"]: t for t in info["tensors"]}
    assert by_name["layers.0.qkv"]["shape"] == [s.hidden + 2 * s.kv_heads * s.head_dim, s.hidden]
    assert by_name["layers.1.gate_up"]["shape"] == [2 * s.intermediate, s.hidden]
    assert by_name["layers.0.k_norm"] == {"name": "layers.0.k_norm", "dtype": "f32", "shape": [s.kv_heads * s.head_dim],
                                          "bytes": 4 * s.kv_heads * s.head_dim}
    assert info["weight_bytes"] == sum(t["bytes"] for t in info["tensors"])
    assert info["weight_bytes"] < info["file_bytes"]
    text = run_engine(built.binary, "info")
    assert text.returncode == 0 and info["spec_name"] in text.stdout and "backend     : cpu" in text.stdout
    # The Python side sees the same engine.
    e = built.engine
    assert (e.vocab_size, e.max_context, e.backend) == (s.vocab, s.max_positions, "cpu")
    assert e.manifest["spec_hash"] == info["spec_hash"]


def test_binary_bench(default_engine):
    out = _engine_json(default_engine, "bench", "--prompt-tokens", "16", "--gen-tokens", "8", "--warmup", "0")
    assert set(out) == {"backend", "prompt_tokens", "gen_tokens", "prefill_seconds", "decode_seconds",
                        "prefill_tok_s", "decode_tok_s", "ms_per_token"}
    assert out["backend"] == "cpu" and out["prompt_tokens"] == 16
    # gen_tokens counts decode steps: the first of the 8 tokens comes from the prefill.
    assert out["gen_tokens"] == 7
    for k in ("prefill_seconds", "decode_seconds", "prefill_tok_s", "decode_tok_s", "ms_per_token"):
        assert out[k] > 0, k
    assert out["ms_per_token"] == pytest.approx(1e3 / out["decode_tok_s"], rel=1e-3)


def test_binary_verify(default_engine):
    assert _engine_json(default_engine, "verify") == {"ok": True, "tensors": 3 + 8 * SHAPES[DEFAULT_SHAPE].layers,
                                                      "bad": []}
    r = run_engine(default_engine.binary, "verify")
    assert r.returncode == 0 and r.stdout.startswith("ok: ") and "all checksums match" in r.stdout
