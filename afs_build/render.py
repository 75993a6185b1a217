"""render stage: Jinja2 templates -> the small generated sources of one engine.

Only what differs per model is generated: the constexpr config header, the layer schedule and the
explicit instantiation of the kernel templates. Kernel bodies are ordinary headers in include/.
Files are written only when their content changes, so an unchanged rebuild recompiles nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from .plan import EngineSpec
from .runtime_tree import runtime_root

WEIGHT_TYPES = {"bf16": "afs::bf16", "fp16": "afs::f16", "fp32": "float"}


@dataclass(frozen=True)
class Op:
    call: str
    note: str


def layer_schedule(spec: EngineSpec) -> list[Op]:
    """The op order of one OLMo 2 block, with the fusions this plan uses."""
    m = spec.model
    return [
        Op("qkv_projection", f"[T, {m.hidden_size}] -> [T, {m.q_dim} + 2x{m.kv_dim}]"),
        Op("qk_norm_rope_cache", f"q_norm over {m.q_dim}, k_norm over {m.kv_dim}, RoPE, K/V -> cache"),
        Op("attention", f"causal, GQA {m.gqa_ratio}"),
        Op("o_proj_norm_residual", "x += post_attention_norm(attn Wo^T)"),
        Op("gate_up_swiglu", f"[T, {m.hidden_size}] -> [T, 2x{m.intermediate_size}] -> silu(gate) * up"),
        Op("down_proj_norm_residual", "x += post_feedforward_norm(act Wdown^T)"),
    ]


def write_if_different(path: Path, text: str) -> bool:
    """Write `text` to `path` unless it already holds exactly that. Returns True if written."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return True


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(runtime_root() / "templates")),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_sources(spec: EngineSpec, gen_dir: Path) -> dict[str, bool]:
    """Render every generated file of `spec` into gen_dir. Returns {file name: was written}."""
    env = _env()
    ctx = {"spec": spec, "m": spec.model, "weight_type": WEIGHT_TYPES[spec.dtype], "schedule": layer_schedule(spec)}
    files = {"afs_config.h": "afs_config.h.j2"}
    if spec.backend == "cpu":
        files[f"backend_cpu_{spec.name}.cpp"] = "layer_schedule_cpu.cpp.j2"
    else:
        files.update(cuda_sources(spec))
    written = {}
    expected = set(files)
    for out_name, template in files.items():
        text = env.get_template(template).render(template_name=template, **ctx)
        written[out_name] = write_if_different(gen_dir / out_name, text)
    # Remove generated sources of an earlier plan that this one no longer has.
    for stale in gen_dir.glob("*"):
        if stale.is_file() and stale.name not in expected and stale.suffix in (".h", ".cpp", ".cu"):
            stale.unlink()
    return written


def cuda_sources(spec: EngineSpec) -> dict[str, str]:
    return {f"backend_cuda_{spec.name}.cu": "layer_schedule_cuda.cu.j2"}
