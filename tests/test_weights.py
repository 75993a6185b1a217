"""Checkpoint reading and the weight map: malformed safetensors, missing / extra / misshapen tensors,
tensors in two shards, NaN weights. Each error names the file or tensor, and both shapes.

Safetensors files are written by hand here (8-byte header length, JSON header, data), so every
malformation is exactly the one under test.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from afs_build.checkpoint import (
    MAX_HEADER_BYTES,
    find_shards,
    read_checkpoint_tensors,
    read_rows,
    read_safetensors_header,
)
from afs_build.config import parse_config
from afs_build.errors import CheckpointError
from afs_build.pack import pack_model
from afs_build.weights import check_weight_map, engine_tensors, expected_source_shapes

# vocab 16, hidden 8, 2 heads of 4, 1 kv head, intermediate 12, one layer
TINY = {
    "model_type": "olmo2", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "eos_token_id": 3,
}
SPEC = parse_config(TINY, "config.json")

ST_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64"}


# ---------------------------------------------------------------------------------------------
# Writing safetensors by hand


def st_bytes(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def write_st(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A well-formed safetensors file of `arrays` (F32/F16/F64, or ('BF16', uint16 bits))."""
    header, data = {}, b""
    for name, a in arrays.items():
        if isinstance(a, tuple):
            dtype, a = a
        else:
            dtype = ST_DTYPES[a.dtype]
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    header["__metadata__"] = {"format": "pt"}
    path.write_bytes(st_bytes(header, data))
    return path


def tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in expected_source_shapes(SPEC).items()}


def tiny_checkpoint(d: Path, tensors: dict[str, np.ndarray] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(TINY))
    write_st(d / "model.safetensors", tiny_tensors() if tensors is None else tensors)
    return d


def raises(fn, *args) -> str:
    with pytest.raises(CheckpointError) as exc:
        fn(*args)
    return str(exc.value)


# ---------------------------------------------------------------------------------------------
# The weight map


def test_complete_checkpoint_is_accepted(tmp_path):
    ck = tiny_checkpoint(tmp_path)
    tensors = read_checkpoint_tensors(ck)
    assert check_weight_map(SPEC, tensors) == []
    assert set(tensors) == set(expected_source_shapes(SPEC))
    assert len(tensors) == 3 + 11 * SPEC.num_layers
    info = tensors["model.layers.0.self_attn.k_proj.weight"]
    assert info.shape == (4, 8) and info.dtype == "F32" and info.nbytes == 128


def test_rotary_inv_freq_is_ignored(tmp_path):
    t = tiny_tensors() | {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(2, np.float32),
                          "model.rotary_emb.inv_freq": np.ones(2, np.float32)}
    ck = tiny_checkpoint(tmp_path, t)
    assert sorted(check_weight_map(SPEC, read_checkpoint_tensors(ck))) == [
        "model.layers.0.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq"]


def test_missing_tensor(tmp_path):
    t = tiny_tensors()
    del t["model.layers.0.mlp.up_proj.weight"]
    ck = tiny_checkpoint(tmp_path, t)
    assert raises(check_weight_map, SPEC, read_checkpoint_tensors(ck)) == (
        "checkpoint is missing tensor 'model.layers.0.mlp.up_proj.weight', expected shape [12, 8]")
    del t["lm_head.weight"], t["model.norm.weight"]
    write_st(ck / "model.safetensors", t)
    assert raises(check_weight_map, SPEC, read_checkpoint_tensors(ck)) == (
        "checkpoint is missing tensor 'model.norm.weight', expected shape [8] (and 2 more)")


def test_extra_tensor(tmp_path):
    t = tiny_tensors() | {"model.layers.0.self_attn.q_proj.bias": np.zeros(8, np.float32)}
    ck = tiny_checkpoint(tmp_path, t)
    assert raises(check_weight_map, SPEC, read_checkpoint_tensors(ck)) == (
        "checkpoint has unexpected tensor 'model.layers.0.self_attn.q_proj.bias' with shape [8]: "
        "it is not part of the OLMo 2 architecture described by config.json")
    # A layer the config does not have is a leftover too.
    t |= {"model.layers.1.mlp.down_proj.weight": np.zeros((8, 12), np.float32)}
    write_st(ck / "model.safetensors", t)
    msg = raises(check_weight_map, SPEC, read_checkpoint_tensors(ck))
    assert msg.startswith("checkpoint has unexpected tensor ") and "(and 1 more)" in msg


@pytest.mark.parametrize(
    "name,shape,implied",
    [
        ("model.layers.0.self_attn.k_proj.weight", (8, 8), [4, 8]),  # a config with kv heads = heads
        ("model.layers.0.self_attn.k_norm.weight", (8,), [4]),  # k_norm is over kv heads only
        ("model.layers.0.mlp.down_proj.weight", (12, 8), [8, 12]),  # transposed
        ("lm_head.weight", (15, 8), [16, 8]),
        ("model.embed_tokens.weight", (16, 8, 1), [16, 8]),
    ],
)
def test_misshapen_tensor(tmp_path, name, shape, implied):
    t = tiny_tensors()
    t[name] = np.zeros(shape, np.float32)
    ck = tiny_checkpoint(tmp_path, t)
    assert raises(check_weight_map, SPEC, read_checkpoint_tensors(ck)) == (
        f"tensor {name!r} has shape {list(shape)} but config.json implies {implied}")


def test_tied_embeddings(tmp_path):
    spec = parse_config(dict(TINY, tie_word_embeddings=True), "config.json")
    t = tiny_tensors()
    del t["lm_head.weight"]
    ck = tiny_checkpoint(tmp_path, t)
    assert check_weight_map(spec, read_checkpoint_tensors(ck)) == []
    assert [e.sources for e in engine_tensors(spec) if e.name == "lm_head"] == [("model.embed_tokens.weight",)]
    write_st(ck / "model.safetensors", tiny_tensors())  # the shared matrix stored twice
    assert check_weight_map(spec, read_checkpoint_tensors(ck)) == ["lm_head.weight"]


@pytest.mark.parametrize("with_index", [True, False], ids=["index", "glob"])
def test_tensor_in_two_shards(tmp_path, with_index):
    t = tiny_tensors()
    names = sorted(t)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    write_st(tmp_path / a, {n: t[n] for n in first + ["model.norm.weight"]})
    write_st(tmp_path / b, {n: t[n] for n in second})
    assert "model.norm.weight" in second
    if with_index:
        wm = {n: a for n in first} | {n: b for n in second}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    assert raises(read_checkpoint_tensors, tmp_path) == f"tensor 'model.norm.weight' appears in both {a} and {b}"


def test_sharded_checkpoint_reads_all_shards(tmp_path):
    t = tiny_tensors()
    names = sorted(t)
    files = {}
    for i, chunk in enumerate((names[:10], names[10:])):
        f = f"model-0000{i + 1}-of-00002.safetensors"
        write_st(tmp_path / f, {n: t[n] for n in chunk})
        files |= {n: f for n in chunk}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
    tensors = read_checkpoint_tensors(tmp_path)
    assert check_weight_map(SPEC, tensors) == []
    assert {n: i.file.name for n, i in tensors.items()} == files


# ---------------------------------------------------------------------------------------------
# Malformed safetensors


def test_header_too_large(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    assert raises(read_safetensors_header, p) == (
        f"{p}: safetensors header of {MAX_HEADER_BYTES + 1} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    p.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    assert raises(read_safetensors_header, p) == (
        f"{p}: safetensors header of {2**64 - 1} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")


def test_header_longer_than_file(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, header_len=1000))
    size = p.stat().st_size
    assert raises(read_safetensors_header, p) == (
        f"{p}: safetensors header claims 1000 bytes but the file has {size - 8} after the length")


def test_file_shorter_than_length_field(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x10\x00\x00")
    assert raises(read_safetensors_header, p) == f"{p}: truncated safetensors file (3 bytes, no header)"


def test_offsets_out_of_range(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(st_bytes({"model.norm.weight": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
                            "lm_head.weight": {"dtype": "F32", "shape": [4], "data_offsets": [32, 48]}}, b"\0" * 40))
    assert raises(read_safetensors_header, p) == (
        f"{p}: tensor 'lm_head.weight' data_offsets [32, 48] run past the end of the data (40 bytes): "
        "the file is truncated or corrupt")


def test_truncated_data(tmp_path):
    ck = tiny_checkpoint(tmp_path)
    p = ck / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw[:-100])
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    data_len = len(raw) - 100 - 8 - struct.unpack("<Q", raw[:8])[0]
    # The first tensor (in header order) that no longer fits is named.
    name, entry = next((k, v) for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > data_len)
    assert raises(read_checkpoint_tensors, ck) == (
        f"{p}: tensor {name!r} data_offsets {entry['data_offsets']} run past the end of the data ({data_len} bytes): "
        "the file is truncated or corrupt")


def test_overlapping_tensors(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(st_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24))
    assert raises(read_safetensors_header, p) == f"{p}: tensors 'a' and 'b' overlap in the data section"
    # The same range twice is an overlap too; adjacent ranges and empty tensors are not.
    p.write_bytes(st_bytes({"a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]},
                            "b": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8))
    assert raises(read_safetensors_header, p) == f"{p}: tensors 'a' and 'b' overlap in the data section"
    p.write_bytes(st_bytes({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
                            "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
                            "b": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]}}, b"\0" * 16))
    assert set(read_safetensors_header(p)) == {"a", "b", "e"}


@pytest.mark.parametrize("dtype", ["I8", "F8_E4M3", "f32", None])
def test_unknown_dtype(tmp_path, dtype):
    p = tmp_path / "model.safetensors"
    p.write_bytes(st_bytes({"model.norm.weight": {"dtype": dtype, "shape": [8], "data_offsets": [0, 8]}}, b"\0" * 8))
    assert raises(read_safetensors_header, p) == (
        f"{p}: tensor 'model.norm.weight' has unsupported dtype {dtype!r} (supported: F32, F16, BF16, F64)")


def test_byte_count_disagrees_with_shape(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(st_bytes({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 16]}}, b"\0" * 16))
    assert raises(read_safetensors_header, p) == f"{p}: tensor 'w' shape [2, 3] BF16 needs 12 bytes but data_offsets cover 16"


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "has an invalid shape [-1]"),
        ({"dtype": "F32", "shape": "4", "data_offsets": [0, 4]}, "has an invalid shape '4'"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "has invalid data_offsets [4, 0]"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "has invalid data_offsets [0]"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, "has invalid data_offsets [-4, 0]"),
    ],
)
def test_invalid_header_entries(tmp_path, entry, message):
    p = tmp_path / "model.safetensors"
    p.write_bytes(st_bytes({"w": entry}, b"\0" * 8))
    assert raises(read_safetensors_header, p) == f"{p}: tensor 'w' {message}"


def test_header_not_json(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\0" * 8)
    assert raises(read_safetensors_header, p).startswith(f"{p}: safetensors header is not valid JSON (")
    p.write_bytes(st_bytes([1, 2], b""))  # type: ignore[arg-type]
    assert raises(read_safetensors_header, p) == f"{p}: safetensors header is not a JSON object"
    p.write_bytes(st_bytes({"w": [1, 2]}, b""))
    assert raises(read_safetensors_header, p) == f"{p}: tensor 'w': header entry is not an object"


# ---------------------------------------------------------------------------------------------
# Finding the shards


def test_index_names_a_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    assert raises(find_shards, tmp_path) == (
        f"{tmp_path / 'model.safetensors.index.json'}: shard model-00002-of-00002.safetensors is listed but missing "
        f"from {tmp_path}")


@pytest.mark.parametrize("fname", ["../model.safetensors", "/etc/passwd", ".hidden.safetensors", 7])
def test_index_names_an_invalid_file(tmp_path, fname):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": fname}}))
    assert raises(find_shards, tmp_path) == (
        f"{tmp_path / 'model.safetensors.index.json'}: weight_map entry for 'lm_head.weight' names an invalid file {fname!r}")


@pytest.mark.parametrize("text", ["{", "[]", '{"weight_map": []}', '{"metadata": {}}'])
def test_malformed_index(tmp_path, text):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    assert raises(find_shards, tmp_path) == (
        f"{tmp_path / 'model.safetensors.index.json'}: expected a JSON object with a 'weight_map' object")


def test_no_safetensors(tmp_path):
    assert raises(find_shards, tmp_path) == f"{tmp_path}: no *.safetensors files found"
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    assert raises(find_shards, tmp_path) == (
        f"{tmp_path}: only PyTorch .bin weights found; afs reads safetensors "
        "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")


# ---------------------------------------------------------------------------------------------
# Reading tensor data


def test_read_rows_converts_every_dtype(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    bf16_bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exactly representable values
    p = write_st(tmp_path / "m.safetensors", {
        "f32": x, "f16": x.astype(np.float16), "f64": x.astype(np.float64), "bf16": ("BF16", bf16_bits)})
    t = read_safetensors_header(p)
    # read_rows returns the rows flattened: (row1 - row0) * columns float32 values.
    np.testing.assert_array_equal(read_rows(t["f32"], 0, 5), x.ravel())
    np.testing.assert_array_equal(read_rows(t["f16"], 1, 4), x.astype(np.float16)[1:4].astype(np.float32).ravel())
    np.testing.assert_array_equal(read_rows(t["f64"], 2, 5), x[2:5].ravel())
    np.testing.assert_array_equal(read_rows(t["bf16"], 0, 5), (bf16_bits.astype(np.uint32) << 16).view(np.float32).ravel())


# ---------------------------------------------------------------------------------------------
# Non-finite weights


def _pack(tmp_path: Path, tensors: dict[str, np.ndarray], allow_nonfinite: bool, warnings: list[str]):
    ck = tiny_checkpoint(tmp_path / "ck", tensors)
    src = read_checkpoint_tensors(ck)
    check_weight_map(SPEC, src)
    return pack_model(tmp_path / "model.afs", engine_tensors(SPEC), src, "fp32", {"spec_hash": "0" * 16},
                      allow_nonfinite=allow_nonfinite, warn=warnings.append)


def test_nan_weights_rejected_by_pack(tmp_path):
    t = tiny_tensors()
    t["model.layers.0.mlp.up_proj.weight"][7, 3] = np.nan
    t["model.layers.0.mlp.up_proj.weight"][9, 0] = np.inf
    warnings: list[str] = []
    msg = raises(_pack, tmp_path, t, False, warnings)
    assert msg == ("tensor 'model.layers.0.mlp.up_proj.weight' (model.safetensors) contains 2 NaN/Inf values in rows "
                   "0..11 (pass --allow-nonfinite to pack it anyway)")
    assert not (tmp_path / "model.afs").exists()
    manifest = _pack(tmp_path, t, True, warnings)
    assert warnings == ["tensor 'model.layers.0.mlp.up_proj.weight' (model.safetensors) contains 2 NaN/Inf values "
                        "in rows 0..11"]
    assert (tmp_path / "model.afs").exists() and len(manifest["tensors"]) == 3 + 8 * SPEC.num_layers


def test_nan_weights_through_afs_build(engines, tmp_path):
    """End to end: afs-build refuses a NaN weight, naming it; --allow-nonfinite builds with a warning."""
    from safetensors.numpy import load_file, save_file

    from conftest import DEFAULT_SHAPE, run_afs_build, run_engine

    ck = tmp_path / "ck"
    shutil.copytree(engines.checkpoint(DEFAULT_SHAPE), ck)
    t = load_file(str(ck / "model.safetensors"))
    t["model.layers.1.self_attn.o_proj.weight"][0, 5] = np.nan
    save_file(t, str(ck / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "engine"
    rows = t["model.layers.1.self_attn.o_proj.weight"].shape[0]
    what = f"tensor 'model.layers.1.self_attn.o_proj.weight' (model.safetensors) contains 1 NaN/Inf values in rows 0..{rows - 1}"

    r = run_afs_build("--model", str(ck), "--arch", "cpu", "--dtype", "fp32", "--output", str(out), "-q")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == f"afs-build: error: {what} (pass --allow-nonfinite to pack it anyway)"
    assert all(l.startswith("warning: ") for l in lines[:-1]) and "Traceback" not in r.stderr
    assert not (out / "model.afs").exists()

    r = run_afs_build("--model", str(ck), "--arch", "cpu", "--dtype", "fp32", "--output", str(out), "-q",
                      "--allow-nonfinite")
    assert r.returncode == 0, r.stderr
    assert f"warning: {what}" in r.stderr.splitlines()
    v = run_engine(out / "bin" / "afs-engine", "verify")
    assert v.returncode == 0, v.stderr


def test_weight_map_checked_before_compile(tmp_path):
    """A checkpoint missing a tensor fails in seconds, before anything is compiled."""
    from conftest import run_afs_build

    t = tiny_tensors()
    del t["model.layers.0.self_attn.o_proj.weight"]
    ck = tiny_checkpoint(tmp_path / "ck", t)
    out = tmp_path / "engine"
    r = run_afs_build("--model", str(ck), "--arch", "cpu", "--dtype", "fp32", "--output", str(out))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "afs-build: error: checkpoint is missing tensor 'model.layers.0.self_attn.o_proj.weight', expected shape [8, 8]")
    assert "compile" not in r.stderr
    assert not (out / "bin").exists()
