"""The decode-step bookkeeping of benchmarks/kernel_profile.py on synthetic kernel traces: a batch
whose requests are admitted over several steps mixes prefill, mixed and decode steps of different
sizes, and the table must describe the dominant decode step alone."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import kernel_profile as kp  # noqa: E402

SHAPE = dict(hidden=64, intermediate=128, vocab=100, heads=4, kv_heads=4, layers=2)
LAYER_DECODE = ["gemv<a>", "attention_decode", "gemv<b>", "rms", "gemv<c>", "gemv<b>", "rms"]
LAYER_PREFILL = ["gemm<x>", "attention_prefill_wgmma", "gemm<x>", "rms", "gemm<y>", "gemm<x>", "rms"]
TAIL = ["gemv<a>", "argmax", "sample_token"]


def trace(steps: list[list[str]], dur: float = 1.0) -> list[dict]:
    out, t = [], 0.0
    for names in steps:
        for n in names:
            out.append({"name": n, "ts": t, "dur": dur})
            t += 2 * dur
        out.append({"name": "Memcpy DtoH", "ts": t, "dur": 0.5})
        t += 10
    return out


def step(layer: list[str], extra: list[str] = ()) -> list[str]:
    return ["embed"] + layer * SHAPE["layers"] + list(extra) + TAIL


def test_uniform_steps_skip_prefill_mixed_and_odd_sized_steps():
    decode = step(LAYER_DECODE)
    tail_step = step(LAYER_DECODE, ["odd_kernel"])  # e.g. the last request alone, another graph bucket
    ev = trace([step(LAYER_PREFILL), step(LAYER_PREFILL)] + [decode] * 5 + [tail_step])
    steps = kp.uniform_decode_steps(ev)
    assert len(steps) == 5
    assert all("prefill" not in e["name"] and e["name"] != "odd_kernel" for p in steps for e in p)


def test_decode_breakdown_averages_the_decode_steps_with_roles():
    ev = trace([step(LAYER_PREFILL)] + [step(LAYER_DECODE)] * 4 + [step(LAYER_DECODE, ["odd_kernel"])])
    bd = kp.decode_breakdown([], ev, 16, SHAPE, None)
    assert bd["steps"] == 4
    assert bd["layout"] == "qkv fused, gate_up fused, lm_head"
    calls = {(r["kernel"], r["role"]): r["calls_per_step"] for r in bd["rows"]}
    assert calls[("attention_decode", "")] == SHAPE["layers"]
    assert calls[("gemv<b>", "o 64->64")] == SHAPE["layers"]
    assert ("attention_prefill_wgmma", "") not in calls and ("odd_kernel", "") not in calls


def test_without_step_markers_the_two_trace_difference_is_used():
    prefill = [{"name": "k_pre", "ts": 0.0, "dur": 5.0}, {"name": "gemm", "ts": 10.0, "dur": 5.0}]
    more = prefill + [{"name": "k_dec", "ts": 20.0 + i, "dur": 2.0} for i in range(4)]
    assert kp.uniform_decode_steps(more) == []
    bd = kp.decode_breakdown(prefill, more, 4, SHAPE, None)
    assert [(r["kernel"], r["calls_per_step"]) for r in bd["rows"]] == [("k_dec", 1.0)]


def test_exposed_time_charges_only_what_extends_the_step():
    # Per step: a (0-10), b starts early under PDL and waits (2-14), c (14-15), then idle until the
    # sampler (17-18). Exposed: a 10, b 4, c 1, idle 2, sample_token 1 = the 18 us span.
    def one(t0: float) -> list[dict]:
        spans = [("a", 0, 10), ("b", 2, 14), ("c", 14, 15), ("sample_token", 17, 18)]
        return [{"name": n, "ts": t0 + s, "dur": float(e - s)} for n, s, e in spans]

    ev = one(0.0) + one(100.0) + one(200.0)
    bd = kp.exposed_breakdown(ev, None)
    assert bd["steps"] == 3
    got = {r["kernel"]: r["us_per_step"] for r in bd["rows"]}
    assert got == {"a": 10.0, "b": 4.0, "c": 1.0, "sample_token": 1.0, "(idle: no kernel running)": 2.0}
    assert bd["kernel_us_per_step"] == 18.0


def test_exposed_time_needs_decode_steps():
    import pytest

    with pytest.raises(ValueError, match="decode steps"):
        kp.exposed_breakdown([{"name": "k", "ts": 0.0, "dur": 1.0}], None)
