"""config stage: config.json (+ generation_config.json) -> a validated, frozen ModelSpec.

Both config.json dialects are read: the one on the hub today (transformers 4.x: top-level
`rope_theta`, `rope_scaling`, `torch_dtype`) and the one transformers 5.x writes (`rope_parameters`,
`dtype`). Every dimension comes from the file; nothing is looked up by model name. Anything we do
not support, or that does not add up, raises ConfigError naming the field and its value.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear")

# Fields whose value must be exactly this for the OLMo 2 forward we implement.
_FIXED_FIELDS = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
}


@dataclass(frozen=True)
class ModelSpec:
    """Every number the kernels are specialised on, and nothing else."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_factor: float = 1.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    source_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def parameter_count(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + 3 * h * i
        per_layer += self.q_dim + self.kv_dim + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found ({what} is required)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


# Upper bound of every dimension: the kernels hold sizes and products of a few of them in int.
MAX_DIMENSION = 2**24


def _get_int(cfg: dict, key: str, where: str, *, minimum: int = 1, maximum: int = MAX_DIMENSION,
             default: Any = ...) -> int:
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise ConfigError(f"{where}: missing required field '{key}'")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}: field '{key}' must be an integer, got {v!r}")
    if v < minimum:
        raise ConfigError(f"{where}: field '{key}' must be >= {minimum}, got {v}")
    if v > maximum:
        raise ConfigError(f"{where}: field '{key}' = {v} is too large (at most {maximum})")
    return v


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _get_float(cfg: dict, key: str, where: str, *, default: Any = ..., positive: bool = True) -> float:
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise ConfigError(f"{where}: missing required field '{key}'")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
        raise ConfigError(f"{where}: field '{key}' must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ConfigError(f"{where}: field '{key}' must be > 0, got {v}")
    return float(v)


def _rope(cfg: dict, where: str) -> tuple[float, str, float]:
    """(theta, type, factor) from either dialect."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: field 'rope_parameters' must be an object, got {params!r}")
        src, src_name = params, "rope_parameters"
        theta = _get_float(params, "rope_theta", f"{where}: rope_parameters", default=None)
        if theta is None:  # 5.x keeps it in rope_parameters; a top-level one is accepted too
            if cfg.get("rope_theta") is None:
                raise ConfigError(f"{where}: rope_parameters: missing required field 'rope_theta'")
            theta = _get_float(cfg, "rope_theta", where)
    else:
        theta = _get_float(cfg, "rope_theta", where, default=10000.0)
        src, src_name = scaling, "rope_scaling"
    rope_type, factor = "default", 1.0
    if src is not None:
        if not isinstance(src, dict):
            raise ConfigError(f"{where}: field '{src_name}' must be an object or null, got {src!r}")
        rope_type = src.get("rope_type", src.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{where}: field '{src_name}.rope_type' = {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if rope_type == "linear":
            factor = _get_float(src, "factor", f"{where}: {src_name}")
    return theta, rope_type, factor


def _token_ids(value: Any, where: str, key: str, vocab: int) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or not (0 <= v < vocab):
            raise ConfigError(f"{where}: field '{key}' holds {v!r}, not a token id in [0, {vocab})")
        out.append(v)
    return tuple(dict.fromkeys(out))


def parse_config(cfg: dict[str, Any], where: str = "config.json", generation: dict | None = None) -> ModelSpec:
    """Validate an OLMo 2 config dict (either dialect) into a ModelSpec."""
    if "model_type" not in cfg:
        raise ConfigError(f"{where}: missing required field 'model_type' (expected 'olmo2')")
    model_type = cfg.get("model_type")
    if model_type != "olmo2":
        raise ConfigError(f"{where}: field 'model_type' = {model_type!r} is not supported (afs builds 'olmo2')")
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or "Olmo2ForCausalLM" not in archs):
        raise ConfigError(f"{where}: field 'architectures' = {archs!r} does not include 'Olmo2ForCausalLM'")
    for key, allowed in _FIXED_FIELDS.items():
        if key in cfg and cfg[key] not in allowed:
            raise ConfigError(
                f"{where}: field '{key}' = {cfg[key]!r} is not supported (supported: {', '.join(map(repr, allowed))})"
            )

    vocab = _get_int(cfg, "vocab_size", where)
    hidden = _get_int(cfg, "hidden_size", where)
    inter = _get_int(cfg, "intermediate_size", where)
    layers = _get_int(cfg, "num_hidden_layers", where)
    heads = _get_int(cfg, "num_attention_heads", where)
    kv_heads = _get_int(cfg, "num_key_value_heads", where, default=heads)
    if hidden % heads:
        raise ConfigError(
            f"{where}: field 'num_attention_heads' = {heads} does not divide 'hidden_size' = {hidden}"
        )
    if heads % kv_heads:
        raise ConfigError(
            f"{where}: field 'num_key_value_heads' = {kv_heads} does not divide 'num_attention_heads' = {heads}"
        )
    head_dim = hidden // heads
    if "head_dim" in cfg and cfg["head_dim"] is not None and cfg["head_dim"] != head_dim:
        raise ConfigError(
            f"{where}: field 'head_dim' = {cfg['head_dim']!r} disagrees with hidden_size / num_attention_heads "
            f"= {head_dim}"
        )
    if head_dim % 2:
        raise ConfigError(f"{where}: head_dim = {head_dim} (hidden_size / num_attention_heads) must be even for RoPE")
    if head_dim > 256:
        raise ConfigError(f"{where}: head_dim = {head_dim} is not supported (at most 256)")

    eps = _get_float(cfg, "rms_norm_eps", where, default=1e-5)
    theta, rope_type, factor = _rope(cfg, where)
    max_pos = _get_int(cfg, "max_position_embeddings", where, maximum=2**31 - 1, default=4096)
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"{where}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
    dtype = cfg.get("dtype", cfg.get("torch_dtype", "float32")) or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}: field 'dtype' = {dtype!r} is not supported (float32, bfloat16, float16)")

    gen = generation or {}
    bos = cfg.get("bos_token_id") if gen.get("bos_token_id") is None else gen.get("bos_token_id")
    eos_src = gen.get("eos_token_id") if gen.get("eos_token_id") is not None else cfg.get("eos_token_id")
    pad = cfg.get("pad_token_id") if gen.get("pad_token_id") is None else gen.get("pad_token_id")
    bos_ids = _token_ids(bos, where, "bos_token_id", vocab)
    pad_ids = _token_ids(pad, where, "pad_token_id", vocab)

    return ModelSpec(
        model_type="olmo2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=eps,
        rope_theta=theta,
        rope_type=rope_type,
        rope_factor=factor,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
        source_dtype=dtype,
        bos_token_id=bos_ids[0] if bos_ids else None,
        eos_token_ids=_token_ids(eos_src, where, "eos_token_id", vocab),
        pad_token_id=pad_ids[0] if pad_ids else None,
    )


def load_config(checkpoint: Path) -> ModelSpec:
    """Read config.json and, when present, generation_config.json from a checkpoint directory."""
    cfg = _read_json(checkpoint / "config.json", "config.json")
    gen_path = checkpoint / "generation_config.json"
    generation = _read_json(gen_path, "generation_config.json") if gen_path.exists() else None
    return parse_config(cfg, str(checkpoint / "config.json"), generation)
