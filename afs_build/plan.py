"""plan stage: ModelSpec + target + dtype + tuning -> EngineSpec, whose hash names the build.

Unsupported combinations are rejected here with a sentence a user understands, before anything is
rendered or compiled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .config import ModelSpec
from .engine_format import FORMAT_VERSION
from .errors import PlanError

CUDA_ARCHS = ("sm80", "sm86", "sm89", "sm90", "sm90a", "sm100", "sm103", "sm110", "sm120", "sm121")
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class EngineSpec:
    model: ModelSpec
    backend: str  # "cpu" or "cuda"
    archs: tuple[str, ...]  # CUDA archs, () for cpu
    dtype: str  # weight dtype: bf16 | fp16 | fp32
    quantization: str = "none"
    tuning: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.to_json(),
            "backend": self.backend,
            "archs": list(self.archs),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "tuning": self.tuning,
        }

    @property
    def hash(self) -> str:
        canon = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """A readable build name: olmo2_l16_h2048_hd64_gqa1_bf16_cpu."""
        m = self.model
        target = "cpu" if self.backend == "cpu" else "_".join(self.archs)
        return f"olmo2_l{m.num_layers}_h{m.hidden_size}_hd{m.head_dim}_gqa{m.gqa_ratio}_{self.dtype}_{target}"

    @property
    def module_name(self) -> str:
        return f"_afs_engine_{self.hash}"


def detect_local_arch() -> str:
    """The local GPU's SM ('sm90', ...) or 'cpu' when there is none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "cpu"
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    if out.returncode != 0 or not out.stdout.strip():
        return "cpu"
    return arch_for_compute_cap(out.stdout.strip().splitlines()[0].strip())


def arch_for_compute_cap(cap: str) -> str:
    """nvidia-smi's compute capability ('9.0') -> the --arch target for it: 'sm90a' for Hopper,
    'cpu' for GPUs older than sm80 (no CUDA engine for them), and a PlanError for a GPU newer than
    every target this builder knows (its machine code would not run there)."""
    major, _, minor = cap.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        return "cpu"
    arch = f"sm{int(major)}{int(minor)}"
    if arch == "sm90":
        return "sm90a"
    if arch in CUDA_ARCHS:
        return arch
    if (int(major), int(minor)) < (8, 0):
        return "cpu"
    raise PlanError(f"--arch auto: the local GPU is {arch}, which this builder has no target for; pass --arch with "
                    f"one of {', '.join(CUDA_ARCHS)} of the GPU's major version and no higher minor version, or "
                    f"--arch cpu")


def parse_arch(arch: str) -> tuple[str, tuple[str, ...]]:
    """'auto' | 'cpu' | 'sm90' | 'sm80,sm90a' -> (backend, archs)."""
    items = [a.strip().lower() for a in arch.split(",") if a.strip()]
    if not items:
        raise PlanError("--arch is empty")
    if items == ["auto"]:
        items = [detect_local_arch()]
    if "cpu" in items:
        if len(items) > 1:
            raise PlanError(f"--arch {arch!r}: cpu cannot be combined with CUDA archs in one engine")
        return "cpu", ()
    for a in items:
        if a not in CUDA_ARCHS:
            raise PlanError(f"--arch: unknown target {a!r} (choose auto, cpu, {', '.join(CUDA_ARCHS)}, or a comma list)")
    return "cuda", tuple(dict.fromkeys(items))


def make_plan(model: ModelSpec, arch: str, dtype: str) -> EngineSpec:
    if dtype not in DTYPES:
        raise PlanError(f"--dtype {dtype!r} is not supported (choose {', '.join(DTYPES)})")
    backend, archs = parse_arch(arch)
    if backend == "cuda":
        cuda_support_check(model, archs, dtype)
    return EngineSpec(model=model, backend=backend, archs=archs, dtype=dtype, tuning=default_tuning(model, backend))


def default_tuning(model: ModelSpec, backend: str) -> dict[str, Any]:
    # NOTE: tuning choices change speed, never results.
    if backend == "cpu":
        return {"gemm_token_block": 4}
    return {}


CUDA_HEAD_DIMS = (64, 128)


def cuda_support_check(model: ModelSpec, archs: tuple[str, ...], dtype: str) -> None:
    """What the CUDA kernels are written for; everything else is refused here, not in a kernel."""
    target = ",".join(archs)
    if dtype == "fp32":
        raise PlanError(f"--arch {target}: CUDA engines store weights in bf16 or fp16; use --dtype bf16 (or --arch cpu for fp32)")
    if model.head_dim not in CUDA_HEAD_DIMS:
        raise PlanError(
            f"--arch {target}: head_dim {model.head_dim} is not supported by the CUDA kernels "
            f"(supported: {', '.join(map(str, CUDA_HEAD_DIMS))}); build with --arch cpu"
        )
    for name, value in (("hidden_size", model.hidden_size), ("intermediate_size", model.intermediate_size)):
        if value % 8:
            raise PlanError(f"--arch {target}: {name} = {value} must be a multiple of 8 for the CUDA GEMM kernels")


def describe(spec: EngineSpec) -> str:
    m = spec.model
    return (
        f"{spec.name} (hash {spec.hash}): {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_heads} heads / {m.num_kv_heads} kv heads (GQA {m.gqa_ratio}), head_dim {m.head_dim}, "
        f"intermediate {m.intermediate_size}, vocab {m.vocab_size}, {m.parameter_count() / 1e9:.3f} B params, "
        f"weights {spec.dtype}, target {'cpu' if spec.backend == 'cpu' else ','.join(spec.archs)}, afs {__version__}"
    )
