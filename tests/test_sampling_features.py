"""Presence / frequency penalties and logprobs on every generation path (single request, batch,
submit), against numpy computations over the engine's score() logits (tests/reference.py), which
test_model_cpu.py checks against HF transformers."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

import afs
from conftest import run_engine
from reference import LOGPROB_ATOL, log_softmax, penalized_logits, top_logprobs

PENALTIES = [(0.8, 0.0), (0.0, 0.6), (0.5, 0.5), (-0.4, -0.3)]


@pytest.fixture(scope="module")
def built(engines):
    return engines.get("gqa2_hd64", "fp32")


@pytest.fixture(scope="module")
def engine(built):
    return afs.load(built.dir, threads=1, kv_blocks=128)


def _prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab - 4, int(k)).tolist() for k in rng.integers(3, 50, n)]


def _check_logprobs(engine, prompt, tokens, logprobs, k):
    """Each reported logprob (chosen token and top k) against log_softmax of score() at that step."""
    assert [lp.token for lp in logprobs] == tokens
    ref = log_softmax(engine.score(prompt + tokens[:-1])[len(prompt) - 1:])
    for i, lp in enumerate(logprobs):
        assert abs(lp.logprob - ref[i, lp.token]) <= LOGPROB_ATOL, (i, lp.logprob, ref[i, lp.token])
        want = top_logprobs(ref[i], k)
        assert [t for t, _ in lp.top] == [t for t, _ in want], (i, lp.top, want)
        assert np.allclose([v for _, v in lp.top], [v for _, v in want], rtol=0, atol=LOGPROB_ATOL)


def _assert_same_logprobs(got, want):
    """Two runs of the same request: the same ids; values equal up to the rounding of logits computed
    in differently sized prefill chunks."""
    assert [(lp.token, [t for t, _ in lp.top]) for lp in got] == [(lp.token, [t for t, _ in lp.top]) for lp in want]
    flat = lambda lps: [v for lp in lps for v in [lp.logprob] + [x for _, x in lp.top]]  # noqa: E731
    assert np.allclose(flat(got), flat(want), rtol=0, atol=LOGPROB_ATOL)


def _greedy_with_penalties(engine, prompt, n, presence, frequency) -> list[int]:
    """The oracle: greedy decoding over score() logits with the penalties applied in numpy."""
    out: list[int] = []
    for _ in range(n):
        logits = engine.score(prompt + out)[-1]
        out.append(int(np.argmax(penalized_logits(logits, out, presence, frequency))))
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("k", [0, 5])
def test_logprobs_match_log_softmax_of_score(engine, built, temperature, k):
    for i, p in enumerate(_prompts(built.shape.vocab, 3, seed=10 + k)):
        r = engine.generate_full(p, max_tokens=16, temperature=temperature, seed=i, ignore_eos=True, logprobs=k)
        _check_logprobs(engine, p, r["tokens"], r["logprobs"], k)
        # Logprobs are reported, not applied: the tokens are those of the same request without them.
        assert r["tokens"] == engine.generate(p, max_tokens=16, temperature=temperature, seed=i, ignore_eos=True)


@pytest.mark.parametrize("presence,frequency", PENALTIES)
def test_greedy_penalties_match_numpy(engine, built, presence, frequency):
    changed = False
    for p in _prompts(built.shape.vocab, 2, seed=20):
        got = engine.generate(p, max_tokens=24, ignore_eos=True, presence_penalty=presence,
                              frequency_penalty=frequency)
        assert got == _greedy_with_penalties(engine, p, 24, presence, frequency)
        changed |= got != engine.generate(p, max_tokens=24, ignore_eos=True)
    assert changed, "the penalties never changed the greedy output: the check cannot tell them apart"


def test_batched_and_submitted_equal_single(engine, built):
    """The scheduler path (generate_batch, submit) gives the single-request path's tokens and logprobs."""
    prompts = _prompts(built.shape.vocab, 6, seed=30)
    params = [afs.SamplingParams(max_tokens=14, temperature=(0.0, 0.8)[i % 2], seed=i, ignore_eos=True,
                                 presence_penalty=PENALTIES[i % 4][0], frequency_penalty=PENALTIES[i % 4][1],
                                 logprobs=(None, 0, 3)[i % 3]) for i in range(6)]
    solo = [engine.generate_full(p, **asdict(sp)) for p, sp in zip(prompts, params)]
    batch = engine.generate_batch(prompts, params)
    for s, b, sp in zip(solo, batch, params):
        assert b["tokens"] == s["tokens"]
        assert ("logprobs" in b) == (sp.logprobs is not None) == ("logprobs" in s)
        if sp.logprobs is not None:
            _assert_same_logprobs(b["logprobs"], s["logprobs"])
    req = engine.submit(prompts[2], params[2])
    outs = list(req.outputs())
    assert [o.token for o in outs] == solo[2]["tokens"]
    _assert_same_logprobs([o.logprobs for o in outs], solo[2]["logprobs"])
    assert all(a.time <= b.time for a, b in zip(outs, outs[1:]))


@pytest.mark.parametrize("kwargs,message", [
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5"),
    (dict(presence_penalty=float("nan")), "presence_penalty must be in [-2, 2], got nan"),
    (dict(frequency_penalty=-3.0), "frequency_penalty must be in [-2, 2], got -3"),
    (dict(frequency_penalty="0.5"), "frequency_penalty must be a number, got '0.5'"),
    (dict(logprobs=21), "logprobs must be in [0, 20], got 21"),
    (dict(logprobs=-1), "logprobs must be in [0, 20], got -1"),
    (dict(logprobs=1.5), "logprobs must be an integer, got 1.5"),
])
def test_nonsense_values_are_refused(engine, kwargs, message):
    sp = afs.SamplingParams(max_tokens=2, **kwargs)
    for call in (lambda: engine.generate_batch([[1, 2]], sp), lambda: engine.submit([1, 2], sp),
                 lambda: engine.generate_full([1, 2], **asdict(sp))):
        with pytest.raises(afs.EngineError) as exc:
            call()
        assert str(exc.value) == message


def test_binary_penalties(built, engine):
    r = run_engine(built.binary, "generate", "--token-ids", "5,6,7", "--max-tokens", "12", "--ignore-eos",
                   "--presence-penalty", "0.8", "--frequency-penalty", "0.3", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == engine.generate([5, 6, 7], max_tokens=12, ignore_eos=True,
                                                              presence_penalty=0.8, frequency_penalty=0.3)
    r = run_engine(built.binary, "generate", "--token-ids", "5,6,7", "--presence-penalty", "9")
    assert r.returncode != 0 and "presence_penalty must be in [-2, 2], got 9" in r.stderr
