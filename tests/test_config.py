"""config stage: every OLMo 2 release config is accepted with the right derived values, in both
config.json dialects; malformed or unsupported configs fail with a message naming the field and value.

The release configs below are written as the hub files are (transformers 4.x dialect); to_5x()
produces what transformers 5.x writes for the same model.
"""

from __future__ import annotations

import copy
import json
import math

import pytest

from afs_build.config import ModelSpec, load_config, parse_config
from afs_build.errors import AfsBuildError, ConfigError
from afs_build.weights import engine_tensors, expected_source_shapes


def _hub_config(hidden, layers, heads, kv_heads, intermediate, *, torch_dtype="float32", bos=None,
                version="4.47.0.dev0") -> dict:
    return {
        "architectures": ["Olmo2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": 100257,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 4096,
        "model_type": "olmo2",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pad_token_id": 100277,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 500000,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "transformers_version": version,
        "use_cache": True,
        "vocab_size": 100352,
    }


# name -> (config.json, generation_config.json, expected derived values)
RELEASES = {
    "OLMo-2-0425-1B": (
        _hub_config(2048, 16, 16, 16, 8192, version="4.48.3"),
        {"_from_model_config": True, "eos_token_id": 100257, "pad_token_id": 100277},
        dict(head_dim=128, gqa=1, q_dim=2048, kv_dim=2048, params=1_484_916_736, source_dtype="float32", bos=None),
    ),
    "OLMo-2-1124-7B": (
        _hub_config(4096, 32, 32, 32, 11008),
        {"_from_model_config": True, "eos_token_id": 100257, "pad_token_id": 100277},
        dict(head_dim=128, gqa=1, q_dim=4096, kv_dim=4096, params=7_298_617_344, source_dtype="float32", bos=None),
    ),
    "OLMo-2-1124-13B": (
        _hub_config(5120, 40, 40, 40, 13824),
        {"_from_model_config": True, "eos_token_id": 100257, "pad_token_id": 100277},
        dict(head_dim=128, gqa=1, q_dim=5120, kv_dim=5120, params=13_716_198_400, source_dtype="float32", bos=None),
    ),
    "OLMo-2-0325-32B": (
        _hub_config(5120, 64, 40, 8, 27648, torch_dtype="bfloat16", version="4.50.0.dev0"),
        {"_from_model_config": True, "eos_token_id": 100257, "pad_token_id": 100277},
        dict(head_dim=128, gqa=5, q_dim=5120, kv_dim=1024, params=32_234_279_936, source_dtype="bfloat16", bos=None),
    ),
    "OLMo-2-1124-7B-Instruct": (
        _hub_config(4096, 32, 32, 32, 11008, torch_dtype="bfloat16", bos=100257),
        {"bos_token_id": 100257, "eos_token_id": 100257, "pad_token_id": 100277},
        dict(head_dim=128, gqa=1, q_dim=4096, kv_dim=4096, params=7_298_617_344, source_dtype="bfloat16", bos=100257),
    ),
}
RELEASE_DIMS = {  # hidden, layers, heads, kv heads, intermediate
    "OLMo-2-0425-1B": (2048, 16, 16, 16, 8192),
    "OLMo-2-1124-7B": (4096, 32, 32, 32, 11008),
    "OLMo-2-1124-13B": (5120, 40, 40, 40, 13824),
    "OLMo-2-0325-32B": (5120, 64, 40, 8, 27648),
    "OLMo-2-1124-7B-Instruct": (4096, 32, 32, 32, 11008),
}
# Published sizes (billions of parameters), a check on the count independent of our formula.
PUBLISHED_BILLIONS = {"OLMo-2-0425-1B": 1.48, "OLMo-2-1124-7B": 7.30, "OLMo-2-1124-13B": 13.7, "OLMo-2-0325-32B": 32.2,
                      "OLMo-2-1124-7B-Instruct": 7.30}


def to_5x(config: dict) -> dict:
    """The transformers 5.x dialect of a hub config: rope_parameters and dtype."""
    out = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    params = {"rope_theta": float(config["rope_theta"]), "rope_type": "default"}
    if config.get("rope_scaling"):
        params.update(config["rope_scaling"])
        params["rope_type"] = params.pop("type", params.get("rope_type"))
    out["rope_parameters"] = params
    out["dtype"] = config["torch_dtype"]
    out["transformers_version"] = "5.24.0"
    return out


DIALECTS = {"4.x": lambda c: copy.deepcopy(c), "5.x": to_5x}


# ---------------------------------------------------------------------------------------------
# Release configs


@pytest.mark.parametrize("dialect", list(DIALECTS))
@pytest.mark.parametrize("name", list(RELEASES))
def test_release_config_accepted(name, dialect):
    cfg, gen, want = RELEASES[name]
    spec = parse_config(DIALECTS[dialect](cfg), f"{name}/config.json", gen)
    hidden, layers, heads, kv, inter = RELEASE_DIMS[name]
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.intermediate_size) == (
        hidden, layers, heads, kv, inter)
    assert spec.model_type == "olmo2"
    assert spec.vocab_size == 100352
    assert spec.head_dim == want["head_dim"] and spec.gqa_ratio == want["gqa"]
    assert spec.q_dim == want["q_dim"] and spec.kv_dim == want["kv_dim"]
    assert spec.rope_theta == 500000.0 and spec.rope_type == "default" and spec.rope_factor == 1.0
    assert spec.rms_norm_eps == 1e-6
    assert spec.max_position_embeddings == 4096
    assert spec.tie_word_embeddings is False
    assert spec.source_dtype == want["source_dtype"]
    assert spec.eos_token_ids == (100257,)
    assert spec.pad_token_id == 100277
    assert spec.bos_token_id == want["bos"]
    assert spec.parameter_count() == want["params"]
    assert round(spec.parameter_count() / 1e9, 2 if want["params"] < 1e10 else 1) == PUBLISHED_BILLIONS[name]
    # The weight map implied by the config holds exactly that many parameters.
    assert sum(math.prod(s) for s in expected_source_shapes(spec).values()) == want["params"]
    table = {t.name: t for t in engine_tensors(spec)}
    assert table["layers.0.qkv"].shape == (want["q_dim"] + 2 * want["kv_dim"], hidden)
    assert table["layers.0.k_norm"].shape == (want["kv_dim"],)
    assert table["layers.0.q_norm"].shape == (want["q_dim"],)
    assert table["layers.0.gate_up"].shape == (2 * inter, hidden)
    assert len(table) == 3 + 8 * layers


@pytest.mark.parametrize("name", list(RELEASES))
def test_both_dialects_give_the_same_spec(name, tmp_path):
    cfg, gen, _ = RELEASES[name]
    specs = []
    for dialect, convert in DIALECTS.items():
        d = tmp_path / dialect
        d.mkdir()
        (d / "config.json").write_text(json.dumps(convert(cfg), indent=2))
        (d / "generation_config.json").write_text(json.dumps(gen))
        specs.append(load_config(d))
    assert specs[0] == specs[1]
    assert isinstance(specs[0], ModelSpec)
    with pytest.raises(Exception):
        specs[0].hidden_size = 1  # frozen


def test_generation_config_overrides_and_eos_lists():
    cfg, _, _ = RELEASES["OLMo-2-1124-7B"]
    spec = parse_config(cfg, "config.json", {"eos_token_id": [100257, 100265, 100257], "bos_token_id": 100257})
    assert spec.eos_token_ids == (100257, 100265)  # de-duplicated, order kept
    assert spec.bos_token_id == 100257
    spec = parse_config(cfg, "config.json", None)
    assert spec.eos_token_ids == (100257,) and spec.bos_token_id is None and spec.pad_token_id == 100277


def test_optional_fields_take_defaults():
    cfg = RELEASES["OLMo-2-0425-1B"][0]
    minimal = {k: cfg[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads")}
    spec = parse_config(minimal, "config.json")
    assert spec.num_kv_heads == spec.num_heads == 16
    assert spec.rms_norm_eps == 1e-5 and spec.rope_theta == 10000.0 and spec.max_position_embeddings == 4096
    assert spec.source_dtype == "float32" and spec.eos_token_ids == () and spec.bos_token_id is None


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_linear_rope_scaling_accepted(dialect):
    cfg = copy.deepcopy(RELEASES["OLMo-2-0425-1B"][0])
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    spec = parse_config(DIALECTS[dialect](cfg), "config.json")
    assert (spec.rope_type, spec.rope_factor, spec.rope_theta) == ("linear", 2.0, 500000.0)


def test_explicit_head_dim_that_agrees_is_accepted():
    cfg = dict(RELEASES["OLMo-2-0325-32B"][0], head_dim=128)
    assert parse_config(cfg, "config.json").head_dim == 128


# ---------------------------------------------------------------------------------------------
# Rejected configs: the exact message


def _base(**changes) -> dict:
    cfg = copy.deepcopy(RELEASES["OLMo-2-0425-1B"][0])
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k)
        else:
            cfg[k] = v
    return cfg


_DROP = object()
W = "OLMo-2-0425-1B/config.json"

REJECTED = [
    ("llama", _base(model_type="llama"), f"{W}: field 'model_type' = 'llama' is not supported (afs builds 'olmo2')"),
    ("no-model-type", _base(model_type=_DROP), f"{W}: missing required field 'model_type' (expected 'olmo2')"),
    ("architectures", _base(architectures=["LlamaForCausalLM"]),
     f"{W}: field 'architectures' = ['LlamaForCausalLM'] does not include 'Olmo2ForCausalLM'"),
    ("heads-not-dividing-hidden", _base(num_attention_heads=12),
     f"{W}: field 'num_attention_heads' = 12 does not divide 'hidden_size' = 2048"),
    ("kv-not-dividing-heads", _base(num_key_value_heads=3),
     f"{W}: field 'num_key_value_heads' = 3 does not divide 'num_attention_heads' = 16"),
    ("attention-bias", _base(attention_bias=True),
     f"{W}: field 'attention_bias' = True is not supported (supported: False)"),
    ("hidden-act", _base(hidden_act="gelu"), f"{W}: field 'hidden_act' = 'gelu' is not supported (supported: 'silu')"),
    ("missing-hidden", _base(hidden_size=_DROP), f"{W}: missing required field 'hidden_size'"),
    ("missing-layers", _base(num_hidden_layers=_DROP), f"{W}: missing required field 'num_hidden_layers'"),
    ("missing-vocab", _base(vocab_size=_DROP), f"{W}: missing required field 'vocab_size'"),
    ("null-intermediate", _base(intermediate_size=None), f"{W}: missing required field 'intermediate_size'"),
    ("string-hidden", _base(hidden_size="2048"), f"{W}: field 'hidden_size' must be an integer, got '2048'"),
    ("float-layers", _base(num_hidden_layers=16.0), f"{W}: field 'num_hidden_layers' must be an integer, got 16.0"),
    ("bool-heads", _base(num_attention_heads=True), f"{W}: field 'num_attention_heads' must be an integer, got True"),
    ("zero-layers", _base(num_hidden_layers=0), f"{W}: field 'num_hidden_layers' must be >= 1, got 0"),
    ("negative-vocab", _base(vocab_size=-5), f"{W}: field 'vocab_size' must be >= 1, got -5"),
    ("string-eps", _base(rms_norm_eps="1e-6"), f"{W}: field 'rms_norm_eps' must be a finite number, got '1e-6'"),
    ("zero-eps", _base(rms_norm_eps=0), f"{W}: field 'rms_norm_eps' must be > 0, got 0"),
    ("nan-theta", _base(rope_theta=float("nan")), f"{W}: field 'rope_theta' must be a finite number, got nan"),
    ("string-tie", _base(tie_word_embeddings="false"),
     f"{W}: field 'tie_word_embeddings' must be true or false, got 'false'"),
    ("dtype", _base(torch_dtype="int8"),
     f"{W}: field 'dtype' = 'int8' is not supported (float32, bfloat16, float16)"),
    ("head-dim-disagrees", _base(head_dim=64),
     f"{W}: field 'head_dim' = 64 disagrees with hidden_size / num_attention_heads = 128"),
    ("odd-head-dim", _base(hidden_size=2040, num_attention_heads=8, num_key_value_heads=8),
     f"{W}: head_dim = 255 (hidden_size / num_attention_heads) must be even for RoPE"),
    ("head-dim-512", _base(num_attention_heads=4, num_key_value_heads=4),
     f"{W}: head_dim = 512 is not supported (at most 256)"),
    ("rope-scaling-yarn-4x", _base(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
     f"{W}: field 'rope_scaling.rope_type' = 'yarn' is not supported (supported: default, linear)"),
    ("rope-scaling-llama3-4x", _base(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     f"{W}: field 'rope_scaling.rope_type' = 'llama3' is not supported (supported: default, linear)"),
    ("rope-scaling-not-object", _base(rope_scaling="linear"),
     f"{W}: field 'rope_scaling' must be an object or null, got 'linear'"),
    ("linear-without-factor", _base(rope_scaling={"type": "linear"}), f"{W}: rope_scaling: missing required field 'factor'"),
    ("eos-out-of-vocab", _base(eos_token_id=100352),
     f"{W}: field 'eos_token_id' holds 100352, not a token id in [0, 100352)"),
    ("pad-string", _base(pad_token_id="100277"),
     f"{W}: field 'pad_token_id' holds '100277', not a token id in [0, 100352)"),
]


@pytest.mark.parametrize("cfg,message", [pytest.param(c, m, id=i) for i, c, m in REJECTED])
def test_rejected_config_4x(cfg, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(cfg, W)
    assert str(exc.value) == message


def _5x(rope_parameters=None, **changes) -> dict:
    cfg = to_5x(_base(**changes))
    if rope_parameters is not None:
        cfg["rope_parameters"] = rope_parameters
    return cfg


REJECTED_5X = [
    ("rope-parameters-yarn", _5x({"rope_theta": 500000.0, "rope_type": "yarn", "factor": 4.0}),
     f"{W}: field 'rope_parameters.rope_type' = 'yarn' is not supported (supported: default, linear)"),
    ("rope-parameters-dynamic", _5x({"rope_theta": 500000.0, "rope_type": "dynamic", "factor": 2.0}),
     f"{W}: field 'rope_parameters.rope_type' = 'dynamic' is not supported (supported: default, linear)"),
    ("rope-parameters-list", _5x([500000.0]), f"{W}: field 'rope_parameters' must be an object, got [500000.0]"),
    ("rope-parameters-no-theta", _5x({"rope_type": "default"}),
     f"{W}: rope_parameters: missing required field 'rope_theta'"),
    ("rope-parameters-string-theta", _5x({"rope_theta": "5e5", "rope_type": "default"}),
     f"{W}: rope_parameters: field 'rope_theta' must be a finite number, got '5e5'"),
    ("dtype-5x", dict(_5x(), dtype="float8_e4m3fn"),
     f"{W}: field 'dtype' = 'float8_e4m3fn' is not supported (float32, bfloat16, float16)"),
    ("attention-bias-5x", _5x(attention_bias=True), f"{W}: field 'attention_bias' = True is not supported (supported: False)"),
]


@pytest.mark.parametrize("cfg,message", [pytest.param(c, m, id=i) for i, c, m in REJECTED_5X])
def test_rejected_config_5x(cfg, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(cfg, W)
    assert str(exc.value) == message


def test_generation_config_bad_eos():
    cfg = RELEASES["OLMo-2-0425-1B"][0]
    with pytest.raises(ConfigError) as exc:
        parse_config(cfg, W, {"eos_token_id": [100257, -1]})
    assert str(exc.value) == f"{W}: field 'eos_token_id' holds -1, not a token id in [0, 100352)"


# ---------------------------------------------------------------------------------------------
# The files themselves


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "olmo2",\n  "hidden_size": 2048,,\n}')
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path)
    assert str(exc.value) == f"{tmp_path / 'config.json'}: invalid JSON at line 2 column 23: Expecting property name enclosed in double quotes"


@pytest.mark.parametrize("text,kind", [("[1, 2]", "list"), ('"olmo2"', "str"), ("42", "int"), ("null", "NoneType")])
def test_non_object_json(tmp_path, text, kind):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path)
    assert str(exc.value) == f"{tmp_path / 'config.json'}: expected a JSON object at the top level, got {kind}"


def test_not_utf8(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path)
    assert str(exc.value) == f"{tmp_path / 'config.json'}: not valid UTF-8 (invalid start byte at byte 16)"


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path)
    assert str(exc.value) == f"{tmp_path / 'config.json'}: file not found (config.json is required)"


def test_invalid_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASES["OLMo-2-0425-1B"][0]))
    (tmp_path / "generation_config.json").write_text("{eos: 1}")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path)
    assert str(exc.value) == (f"{tmp_path / 'generation_config.json'}: invalid JSON at line 1 column 2: "
                              "Expecting property name enclosed in double quotes")


def test_load_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_base(model_type="olmo")))
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path)
    assert str(exc.value) == f"{tmp_path / 'config.json'}: field 'model_type' = 'olmo' is not supported (afs builds 'olmo2')"
    assert isinstance(exc.value, AfsBuildError)


def test_cli_reports_config_error(tmp_path):
    """afs-build prints the config error as one line and exits 1, before compiling anything."""
    from conftest import run_afs_build

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(_base(num_key_value_heads=5)))
    r = run_afs_build("--model", str(tmp_path / "ckpt"), "--arch", "cpu", "--output", str(tmp_path / "out"))
    assert r.returncode == 1
    msg = f"field 'num_key_value_heads' = 5 does not divide 'num_attention_heads' = 16"
    assert r.stderr.strip().splitlines()[-1] == f"afs-build: error: {tmp_path / 'ckpt' / 'config.json'}: {msg}"
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
