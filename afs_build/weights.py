"""The complete OLMo 2 weight map: checkpoint tensors -> engine tensors.

Every checkpoint tensor is either consumed by exactly one engine tensor or listed as ignored; a
leftover, a missing tensor or a wrong shape is an error naming the tensor and both shapes. Fusions
are spelled out here: q/k/v -> qkv and gate/up -> gate_up (concatenated along the output dimension,
so one GEMM produces [q | k | v] and [gate | up]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .checkpoint import TensorInfo
from .config import ModelSpec
from .errors import CheckpointError

# Checkpoint tensors we know about and deliberately do not pack.
IGNORED_PATTERNS = (
    re.compile(r"model\.rotary_emb\.inv_freq"),
    re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
)


@dataclass(frozen=True)
class EngineTensor:
    """One tensor of model.afs, built by concatenating `sources` along dimension 0."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "matrix" (stored in the engine dtype) or "vector" (always float32)
    sources: tuple[str, ...]


def engine_tensors(spec: ModelSpec) -> list[EngineTensor]:
    """The engine's tensor table, in file order, with where each part comes from."""
    h, q, kv, i, v = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size, spec.vocab_size
    out = [EngineTensor("embed", (v, h), "matrix", ("model.embed_tokens.weight",))]
    for l in range(spec.num_layers):
        p = f"model.layers.{l}."
        e = f"layers.{l}."
        out += [
            EngineTensor(
                e + "qkv",
                (q + 2 * kv, h),
                "matrix",
                (p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
            ),
            EngineTensor(e + "q_norm", (q,), "vector", (p + "self_attn.q_norm.weight",)),
            EngineTensor(e + "k_norm", (kv,), "vector", (p + "self_attn.k_norm.weight",)),
            EngineTensor(e + "o_proj", (h, q), "matrix", (p + "self_attn.o_proj.weight",)),
            EngineTensor(e + "post_attention_norm", (h,), "vector", (p + "post_attention_layernorm.weight",)),
            EngineTensor(
                e + "gate_up", (2 * i, h), "matrix", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            ),
            EngineTensor(e + "down_proj", (h, i), "matrix", (p + "mlp.down_proj.weight",)),
            EngineTensor(e + "post_feedforward_norm", (h,), "vector", (p + "post_feedforward_layernorm.weight",)),
        ]
    out.append(EngineTensor("final_norm", (h,), "vector", ("model.norm.weight",)))
    head_src = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
    out.append(EngineTensor("lm_head", (v, h), "matrix", (head_src,)))
    return out


def expected_source_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> the shape config.json implies for it."""
    h, q, kv, i = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for l in range(spec.num_layers):
        p = f"model.layers.{l}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "self_attn.q_norm.weight": (q,),
                p + "self_attn.k_norm.weight": (kv,),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "post_feedforward_layernorm.weight": (h,),
            }
        )
    return shapes


def check_weight_map(spec: ModelSpec, tensors: dict[str, TensorInfo]) -> list[str]:
    """Validate the checkpoint against the spec. Returns the names that are ignored."""
    expected = expected_source_shapes(spec)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"checkpoint is missing tensor {missing[0]!r}, expected shape {list(expected[missing[0]])}{more}"
        )
    ignored, extra = [], []
    for name in tensors:
        if name in expected:
            continue
        if any(p.fullmatch(name) for p in IGNORED_PATTERNS):
            ignored.append(name)
        elif spec.tie_word_embeddings and name == "lm_head.weight":
            # Tied checkpoints sometimes store the shared matrix twice; we read the embedding.
            ignored.append(name)
        else:
            extra.append(name)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"checkpoint has unexpected tensor {extra[0]!r} with shape {list(tensors[extra[0]].shape)}{more}: "
            "it is not part of the OLMo 2 architecture described by config.json"
        )
    for name, shape in expected.items():
        got = tensors[name].shape
        if tuple(got) != shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(got)} but config.json implies {list(shape)}"
            )
    return ignored
