"""Where a decode step spends its time, kernel by kernel (used by bench_gpu.py).

torch.profiler with CUDA activity records every kernel of the process through CUPTI: those torch
launches, those an engine's own native module launches, and the nodes of replayed CUDA graphs.
Two traces are taken: one of a request that only prefills (max_tokens = 1) and one of the same
request shape with `steps` decode steps after it. Per kernel name, (calls, time) of the second minus
those of the first, divided by `steps`, is what one decode step costs.

Bytes per second are given for weight-streaming kernels (names with gemv / linear / gemm): when the
decode steps' linear kernels, in launch order, line up with the model's projections (q/k/v or qkv,
o, gate/up or gate_up, down per layer, then lm_head), each call gets the bytes of its weight matrix;
otherwise the linear kernels are reported together as reading every projection weight once.

On the CPU (no kernels) the outermost profiler ops (aten::linear, ...) stand in for kernels, so the
bookkeeping can be tried without a GPU (with an eager model: compiled CPU code records no ops).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

LINEAR_MARKERS = ("gemv", "linear", "gemm", "xmma", "triton_tem_", "aten::mm", "aten::addmm")
DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def is_linear(name: str) -> bool:
    n = name.lower()
    return any(m in n for m in LINEAR_MARKERS)


def trace_events(fn: Callable[[], object], device: str, save_to: Path | None = None) -> list[dict]:
    """Run fn under the profiler; return its kernels (on the CPU: outermost ops) as
    [{"name", "ts", "dur"}] in launch order, times in microseconds."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
        if save_to is not None:
            save_to.parent.mkdir(parents=True, exist_ok=True)
            save_to.write_text(path.read_text())
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if device == "cuda":
        out = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    else:
        out = _outermost([e for e in events if e.get("cat") == "cpu_op"])
    out = [{"name": e["name"], "ts": float(e["ts"]), "dur": float(e["dur"])} for e in out]
    out.sort(key=lambda e: e["ts"])
    return out


def _outermost(events: list[dict]) -> list[dict]:
    """The ops that no other op of their thread contains (what Python called)."""
    by_thread: dict = defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    top = []
    for evs in by_thread.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        end = float("-inf")
        for e in evs:
            if float(e["ts"]) >= end:
                top.append(e)
                end = float(e["ts"]) + float(e["dur"])
    return top


def linear_layouts(shape: dict) -> list[tuple[str, list[tuple[str, int]], list[tuple[str, int]]]]:
    """Possible launch orders of the projections in one decode step: (label, per-layer [(role, bytes)],
    after the layers [(role, bytes)]), bytes of bf16 weights."""
    H, I, V = shape["hidden"], shape["intermediate"], shape["vocab"]
    hd = H // shape["heads"]
    QD, KVD = shape["heads"] * hd, shape["kv_heads"] * hd
    b = 2  # bf16

    def w(name: str, n: int, k: int) -> tuple[str, int]:
        return (f"{name} {k}->{n}", n * k * b)

    qkv_fused = [w("qkv", QD + 2 * KVD, H)]
    qkv_split = [w("q", QD, H), w("k", KVD, H), w("v", KVD, H)]
    mlp_fused = [w("gate_up", 2 * I, H)]
    mlp_split = [w("gate", I, H), w("up", I, H)]
    layouts = []
    for qkv_label, qkv in (("qkv fused", qkv_fused), ("q/k/v", qkv_split)):
        for mlp_label, mlp in (("gate_up fused", mlp_fused), ("gate/up", mlp_split)):
            per_layer = qkv + [w("o", H, QD)] + mlp + [w("down", H, I)]
            for tail_label, tail in (("lm_head", [w("lm_head", V, H)]), ("no lm_head", [])):
                layouts.append((f"{qkv_label}, {mlp_label}, {tail_label}", per_layer, tail))
    return layouts


def projection_bytes(shape: dict) -> int:
    """Bytes of every projection weight a decode step reads (bf16): the layers' and lm_head."""
    _, per_layer, tail = linear_layouts(shape)[0]
    return shape["layers"] * sum(b for _, b in per_layer) + sum(b for _, b in tail)


def _match_roles(linear: list[str], shape: dict) -> tuple[str, list[tuple[str, int]]] | None:
    """Roles (name, bytes) of one step's linear kernels (names in launch order), when they line up with
    exactly one layout."""
    L = shape["layers"]
    found = []
    for label, per_layer, tail in linear_layouts(shape):
        if len(linear) != L * len(per_layer) + len(tail):
            continue
        # the same kernel names for the same projection in every layer
        p = len(per_layer)
        if any(linear[i] != linear[i % p] for i in range(L * p)):
            continue
        found.append((label, per_layer * L + tail))
    # NOTE: two layouts with as many calls (fused qkv + split gate/up, or the reverse) cannot be told apart
    return found[0] if len(found) == 1 else None


# The kernel that ends an afs step (its sampler): a trace of afs kernels splits into steps at it.
STEP_END_MARKER = "sample_token"
PREFILL_MARKERS = ("prefill",)


def uniform_decode_steps(events: list[dict], min_steps: int = 2) -> list[list[dict]]:
    """The decode steps of a trace that ends its steps with STEP_END_MARKER: the trace cut after
    each marker, the pieces without prefill kernels, and of those the ones whose kernel names
    (with counts) are the most common set, i.e. the steps of the dominant batch shape. With a
    batch of requests admitted over two steps, the trace mixes prefill steps, mixed steps and
    decode steps of several sizes; a difference of two traces then compares unlike steps. Empty
    when the trace has no such marker or fewer than min_steps steps agree."""
    pieces, cur = [], []
    for e in events:
        cur.append(e)
        if STEP_END_MARKER in e["name"]:
            pieces.append(cur)
            cur = []
    decode = [p for p in pieces if not any(m in e["name"].lower() for e in p for m in PREFILL_MARKERS)]
    if not decode:
        return []
    sigs = [tuple(sorted(Counter(e["name"] for e in p).items())) for p in decode]
    best, n = Counter(sigs).most_common(1)[0]
    return [p for p, g in zip(decode, sigs) if g == best] if n >= min_steps else []


def decode_breakdown(prefill_only: list[dict], with_decode: list[dict], steps: int, shape: dict,
                     step_seconds: float | None) -> dict:
    """Per-kernel cost of one decode step. step_seconds: the step's wall time measured without the
    profiler (the denominator of "% of step"); the kernel sum stands in when None. Where the
    trace splits into steps (uniform_decode_steps), the decode steps alone are averaged;
    otherwise the difference of the two traces is divided by `steps`."""
    uniform = uniform_decode_steps(with_decode)
    if uniform:
        steps = len(uniform)
        prefill_only, with_decode = [], [e for p in uniform for e in p]
    # NOTE: both traces start with the same prefill. Comparing only what follows the prefill's last
    # linear kernel (its lm_head) keeps the prefill's own run-to-run noise out of the difference.
    lin_a = [i for i, e in enumerate(prefill_only) if is_linear(e["name"])]
    lin_b = [i for i, e in enumerate(with_decode) if is_linear(e["name"])]
    if lin_a and len(lin_b) > len(lin_a):
        after_a = prefill_only[lin_a[-1] + 1 :]
        after_b = with_decode[lin_b[len(lin_a) - 1] + 1 :]
    else:
        after_a, after_b = prefill_only, with_decode
    count = defaultdict(float)
    time_us = defaultdict(float)
    for e in after_b:
        count[e["name"]] += 1
        time_us[e["name"]] += e["dur"]
    for e in after_a:
        count[e["name"]] -= 1
        time_us[e["name"]] -= e["dur"]

    # The decode steps' linear kernels in launch order, split into steps and matched to projections.
    layout, role_of = None, {}
    decode = [with_decode[i] for i in lin_b[len(lin_a) :]]
    if steps > 0 and decode and len(decode) % steps == 0:
        per = len(decode) // steps
        chunks = [decode[i * per : (i + 1) * per] for i in range(steps)]
        names = [e["name"] for e in chunks[0]]
        if all([e["name"] for e in c] == names for c in chunks):
            m = _match_roles(names, shape)
            if m is not None:
                layout, roles = m
                for c in chunks:
                    for e, role in zip(c, roles):
                        role_of[id(e)] = role

    rows: dict[tuple[str, str], dict] = {}
    if role_of:
        # linear kernels split by projection; the rest by name (difference of the two traces)
        for e in decode:
            if id(e) in role_of:
                role, nbytes = role_of[id(e)]
                r = rows.setdefault((e["name"], role), {"calls": 0.0, "us": 0.0, "bytes": 0.0})
                r["calls"] += 1
                r["us"] += e["dur"]
                r["bytes"] += nbytes
        for name in count:
            if not is_linear(name):
                rows[(name, "")] = {"calls": count[name], "us": time_us[name], "bytes": None}
    else:
        for name in count:
            rows[(name, "")] = {"calls": count[name], "us": time_us[name], "bytes": None}

    out_rows = []
    for (name, role), r in rows.items():
        calls, us = r["calls"] / steps, r["us"] / steps
        if abs(calls) < 1e-9:  # as many calls with and without decode steps: prefill only, the rest is noise
            continue
        nbytes = r["bytes"] / steps if r["bytes"] is not None else None
        out_rows.append({"kernel": name, "role": role, "calls_per_step": calls, "us_per_step": us,
                         "bytes_per_step": nbytes,
                         "bytes_per_s": nbytes / (us * 1e-6) if nbytes and us > 0 else None})
    totals = _totals(out_rows, step_seconds)
    lin_us, lin_bytes = totals["linear_us_per_step"], projection_bytes(shape)
    return {
        "steps": steps, "layout": layout, **totals,
        "linear_bytes_per_s": lin_bytes / (lin_us * 1e-6) if lin_us > 0 else None,
        "kernels_recorded": len(with_decode),
    }


def exposed_breakdown(events: list[dict], step_seconds: float | None) -> dict:
    """Where a decode step's time goes with the kernels overlapping (programmatic dependent launch):
    each kernel is charged only for the time its end lies past the end of every kernel before it
    (the time it alone keeps the step going), and time with nothing running is its own row. The
    charges and the idle time add up to the step's device span, so this is the table to read for
    what shortens a step, where the serialised table (AFS_CUDA_PDL=0) gives each kernel's own
    duration. Averaged over the trace's decode steps of the dominant shape (uniform_decode_steps);
    step_seconds as in decode_breakdown."""
    steps = uniform_decode_steps(events)
    if not steps:
        raise ValueError("the trace does not split into decode steps (no step-end marker, or no two alike)")
    exposed: dict[str, float] = defaultdict(float)
    calls: dict[str, float] = defaultdict(float)
    idle = 0.0
    for piece in steps:
        evs = sorted(piece, key=lambda e: e["ts"])
        frontier = evs[0]["ts"]
        for e in evs:
            start, end = e["ts"], e["ts"] + e["dur"]
            calls[e["name"]] += 1
            if start > frontier:
                idle += start - frontier
                frontier = start
            if end > frontier:
                exposed[e["name"]] += end - frontier
                frontier = end
    n = len(steps)
    rows = [{"kernel": k, "role": "", "calls_per_step": calls[k] / n, "us_per_step": exposed[k] / n,
             "bytes_per_step": None, "bytes_per_s": None} for k in calls]
    rows.append({"kernel": "(idle: no kernel running)", "role": "", "calls_per_step": 0.0, "us_per_step": idle / n,
                 "bytes_per_step": None, "bytes_per_s": None})
    return {"steps": n, "layout": "exposed time: each kernel's end past every earlier kernel's end",
            **_totals(rows, step_seconds), "linear_bytes_per_s": None, "kernels_recorded": len(events)}


def prefill_breakdown(events: list[dict], tokens: int, seconds: float | None) -> dict:
    """Per-kernel cost of one prefill of `tokens` tokens (one trace of a request for one token),
    in the same row format as decode_breakdown (the "step" is the whole prefill). seconds: its wall
    time measured without the profiler; the kernel sum stands in when None."""
    count: dict[str, float] = defaultdict(float)
    time_us: dict[str, float] = defaultdict(float)
    for e in events:
        count[e["name"]] += 1
        time_us[e["name"]] += e["dur"]
    rows = [{"kernel": n, "role": "", "calls_per_step": count[n], "us_per_step": time_us[n], "bytes_per_step": None,
             "bytes_per_s": None} for n in count]
    return {"tokens": tokens, "layout": "not split by projection", **_totals(rows, seconds),
            "linear_bytes_per_s": None, "kernels_recorded": len(events), "idle": idle_time(events)}


def idle_time(events: list[dict], top: int = 4) -> dict:
    """Where the device sat idle in a trace of one request: its span (first kernel start to last
    end), the idle time between kernels, and the kernels with the most idle time before them (time
    when no earlier kernel was still running: launch latency or the host running behind)."""
    if not events:
        return {"span_us": 0.0, "between_us": 0.0, "before": []}
    evs = sorted(events, key=lambda e: e["ts"])
    end = evs[0]["ts"] + evs[0]["dur"]
    before: dict[str, float] = defaultdict(float)
    for e in evs[1:]:
        gap = e["ts"] - end
        if gap > 0:
            before[e["name"]] += gap
        end = max(end, e["ts"] + e["dur"])
    worst = sorted(before.items(), key=lambda kv: -kv[1])[:top]
    return {"span_us": end - evs[0]["ts"], "between_us": sum(before.values()),
            "before": [{"kernel": k, "us": v} for k, v in worst]}


def _totals(rows: list[dict], step_seconds: float | None) -> dict:
    """Rows sorted by time, each with its share of the step; the kernel and linear-kernel sums.
    step_seconds: the step's wall time without the profiler; the kernel sum stands in when None."""
    rows.sort(key=lambda r: -r["us_per_step"])
    kernel_us = sum(r["us_per_step"] for r in rows)
    step_us = step_seconds * 1e6 if step_seconds else kernel_us
    for r in rows:
        r["pct_of_step"] = 100.0 * r["us_per_step"] / step_us if step_us > 0 else None
    return {"rows": rows, "kernel_us_per_step": kernel_us, "step_us": step_us,
            "step_from": "wall time without the profiler" if step_seconds else "kernel sum",
            "linear_us_per_step": sum(r["us_per_step"] for r in rows if is_linear(r["kernel"]))}


def short_name(name: str, width: int = 58) -> str:
    """A kernel's name without its return type, namespaces and long template arguments."""
    n = name
    if n.startswith("void "):
        n = n[5:]
    depth, cut = 0, []
    for ch in n:  # drop template arguments nested deeper than one level
        if ch == "<":
            depth += 1
            if depth == 1:
                cut.append(ch)
            continue
        if ch == ">":
            if depth == 1:
                cut.append(ch)
            depth -= 1
            continue
        if depth <= 1:
            cut.append(ch)
    n = "".join(cut)
    paren = n.find("(")
    if paren > 0:
        n = n[:paren]
    base, sep, rest = n.partition("<")
    n = (base.split("::")[-1] + sep + rest).strip()
    return n if len(n) <= width else n[: width - 3] + "..."


def format_breakdown(bd: dict, title: str, limit: int = 30) -> str:
    lines = [title]
    if bd.get("kernels_recorded", 0) == 0:
        lines.append("  no kernels were recorded (CUPTI unavailable, or nothing ran on a device)")
        return "\n".join(lines)
    lines.append(f"  layout of the linear kernels: {bd['layout'] or 'not matched (bytes per kernel unknown)'}")
    lines.append(f"  {'kernel':<58} {'role':<22} {'calls':>6} {'us/step':>9} {'% step':>7} {'GB/s':>7}")
    for r in bd["rows"][:limit]:
        gbs = f"{r['bytes_per_s'] / 1e9:7.0f}" if r.get("bytes_per_s") else f"{'':>7}"
        pct = f"{r['pct_of_step']:7.1f}" if r.get("pct_of_step") is not None else f"{'':>7}"
        lines.append(f"  {short_name(r['kernel']):<58} {r['role'][:22]:<22} {r['calls_per_step']:6.1f} "
                     f"{r['us_per_step']:9.1f} {pct} {gbs}")
    if len(bd["rows"]) > limit:
        rest = sum(r["us_per_step"] for r in bd["rows"][limit:])
        lines.append(f"  ... {len(bd['rows']) - limit} more kernels, {rest:.1f} us/step together")
    gaps = bd["step_us"] - bd["kernel_us_per_step"]
    lines.append(f"  kernels {bd['kernel_us_per_step']:.1f} us of a {bd['step_us']:.1f} us step "
                 f"({bd['step_from']}); idle / launch gaps {gaps:.1f} us")
    idle = bd.get("idle")
    if idle:
        lines.append(f"  device span {idle['span_us']:.1f} us (first kernel start to last end), idle between "
                     f"kernels {idle['between_us']:.1f} us; most idle before: "
                     + ", ".join(f"{short_name(b['kernel'], 40)} {b['us']:.1f} us" for b in idle["before"]))
    if bd.get("linear_bytes_per_s"):
        lines.append(f"  all linear kernels: {bd['linear_us_per_step']:.1f} us/step, "
                     f"{bd['linear_bytes_per_s'] / 1e9:.0f} GB/s over every projection weight")
    return "\n".join(lines)
