"""model.afs validation and bad input: the binary and the Python API refuse corrupt files and bad
requests with a clear message and a non-zero exit (1 for errors, 2 for usage), never a crash.

Corrupt files are made from a copy of the session's default engine; corruptions that must get
past the checksums rewrite the manifest and recompute them (rewrite_manifest).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import afs
from afs_build.engine_format import HEADER_BYTES, manifest_bytes, pack_header
from conftest import DEFAULT_SHAPE, SHAPES, run_engine

VOCAB = SHAPES[DEFAULT_SHAPE].vocab
CONTEXT = SHAPES[DEFAULT_SHAPE].max_positions


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def engine_copy(default_engine, tmp_path) -> Path:
    """A private copy of the default engine directory, free to corrupt."""
    d = tmp_path / "engine"
    shutil.copytree(default_engine.dir, d)
    return d


def _fields(raw: bytes) -> tuple[int, int]:
    """(manifest length, data offset) from a model.afs header."""
    m_len, d_off = struct.unpack_from("<QQ", raw, 24)
    return m_len, d_off


def rewrite_manifest(path: Path, mutate: Callable[[dict], None] | None = None, raw_manifest: bytes | None = None) -> None:
    """Change the manifest of model.afs in place, keeping the tensor data, with valid checksums."""
    raw = path.read_bytes()
    m_len, d_off = _fields(raw)
    if raw_manifest is None:
        manifest = json.loads(raw[HEADER_BYTES : HEADER_BYTES + m_len])
        mutate(manifest)
        raw_manifest = manifest_bytes(manifest)
    assert HEADER_BYTES + len(raw_manifest) <= d_off, "the new manifest does not fit before the data"
    pad = b"\0" * (d_off - HEADER_BYTES - len(raw_manifest))
    path.write_bytes(pack_header(raw_manifest, d_off, len(raw)) + raw_manifest + pad + raw[d_off:])


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x5A
    path.write_bytes(bytes(raw))


def tensor_entry(path: Path, name: str) -> dict:
    raw = path.read_bytes()
    m_len, _ = _fields(raw)
    return next(t for t in json.loads(raw[HEADER_BYTES : HEADER_BYTES + m_len])["tensors"] if t["name"] == name)


def assert_refused(binary: Path, model: Path, message: str, *commands: str) -> None:
    """Every command exits 1 (not a signal) with exactly `afs-engine: error: <model>: <message>`."""
    for cmd in commands or ("info", "generate"):
        args = [cmd, "--model", str(model)] + (["--token-ids", "1,2,3"] if cmd == "generate" else [])
        r = run_engine(binary, *args)
        assert r.returncode == 1, f"{cmd}: exit {r.returncode} (negative: killed by a signal)\n{r.stderr}"
        assert r.stdout == ""
        assert r.stderr == f"afs-engine: error: {model}: {message}\n"


def python_error(engine_dir: Path) -> str:
    with pytest.raises(afs.EngineError) as exc:
        afs.load(engine_dir)
    return str(exc.value)


# ---------------------------------------------------------------------------------------------
# Corrupt engine files


CORRUPTIONS = {
    # name: (corrupt(model_afs_path), expected message (may use {size}, {real_size}))
    "truncated-data": (lambda p: p.write_bytes(p.read_bytes()[:-5000]),
                       "file is {size} bytes but its header says {real_size} (truncated or corrupt)"),
    "truncated-header": (lambda p: p.write_bytes(p.read_bytes()[:40]),
                         "truncated engine file (40 bytes; the header alone is 64)"),
    "empty": (lambda p: p.write_bytes(b""), "truncated engine file (0 bytes; the header alone is 64)"),
    "appended": (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 10),
                 "file is {size} bytes but its header says {real_size} (truncated or corrupt)"),
    "bad-magic": (lambda p: patch_bytes(p, 0, b"GGUF\0\0\0\0"), "not an afs engine file (bad magic)"),
    "wrong-version": (lambda p: patch_bytes(p, 8, struct.pack("<I", 2)),
                      "engine file format version 2, this runtime reads version 1; rebuild the engine with afs-build"),
    "header-byte": (lambda p: flip_byte(p, 20), "header checksum mismatch (corrupt file)"),
    "manifest-byte": (lambda p: flip_byte(p, HEADER_BYTES + 100), "manifest checksum mismatch (corrupt file)"),
    "manifest-not-json": (lambda p: rewrite_manifest(p, raw_manifest=b'{"spec_hash": "x", '),
                          "manifest: invalid JSON at byte 19: expected a string key"),
    "manifest-not-object": (lambda p: rewrite_manifest(p, raw_manifest=b"[1, 2, 3]"), "manifest is not a JSON object"),
    "tensor-past-end": (lambda p: rewrite_manifest(p, lambda m: m["tensors"][-1].update(offset=m["tensors"][-1]["offset"] + (1 << 20))),
                        None),
    "tensor-unaligned": (lambda p: rewrite_manifest(p, lambda m: m["tensors"][1].update(offset=m["tensors"][1]["offset"] + 8)),
                         None),
    "tensor-bytes": (lambda p: rewrite_manifest(p, lambda m: m["tensors"][0].update(bytes=m["tensors"][0]["bytes"] - 4)),
                     None),
    "tensor-dtype": (lambda p: rewrite_manifest(p, lambda m: m["tensors"][0].update(dtype="f64")),
                     "tensor 'embed' has unknown dtype 'f64'"),
    "tensor-overlap": (lambda p: rewrite_manifest(p, lambda m: m["tensors"][2].update(offset=m["tensors"][1]["offset"])),
                       None),
    "tensor-duplicate": (lambda p: rewrite_manifest(p, lambda m: m["tensors"].append(dict(m["tensors"][0]))),
                         "tensor 'embed' appears twice in the manifest"),
    "negative-dimension": (lambda p: rewrite_manifest(p, lambda m: m["tensors"][0].update(shape=[-1, 256])),
                           "tensor 'embed' has invalid dimension -1"),
    "no-tensor-table": (lambda p: rewrite_manifest(p, lambda m: m.pop("tensors")), "missing field 'tensors'"),
    "spec-hash-not-string": (lambda p: rewrite_manifest(p, lambda m: m.update(spec_hash=5)),
                             "manifest field 'spec_hash' must be a string"),
    "tensor-crc-field": (lambda p: rewrite_manifest(p, lambda m: m["tensors"][3].update(crc32="xyz")),
                         "tensor 'layers.0.k_norm' has an invalid crc32 field"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_engine_file_is_refused(default_engine, engine_copy, name):
    model = engine_copy / "model.afs"
    real_size = model.stat().st_size
    corrupt, message = CORRUPTIONS[name]
    corrupt(model)
    size = model.stat().st_size
    binary = engine_copy / "bin" / "afs-engine"
    if message is None:  # the message names offsets and sizes read back from the corrupted table
        message = _expected_table_message(name, model)
    message = message.format(size=size, real_size=real_size)
    assert_refused(binary, model, message, "info", "generate", "bench", "verify")
    assert python_error(engine_copy) == f"{model}: {message}"


def _expected_table_message(name: str, model: Path) -> str:
    raw = model.read_bytes()
    m_len, d_off = _fields(raw)
    tensors = json.loads(raw[HEADER_BYTES : HEADER_BYTES + m_len])["tensors"]
    if name == "tensor-past-end":
        t = tensors[-1]
        return f"tensor '{t['name']}' (offset {t['offset']}, {t['bytes']} bytes) runs past the end of the file"
    if name == "tensor-unaligned":
        t = tensors[1]
        return f"tensor '{t['name']}' offset {t['offset']} is not 4096-aligned"
    if name == "tensor-bytes":
        t = tensors[0]
        return f"tensor 'embed' is f32 {_shape(t['shape'])} but claims {t['bytes']} bytes"
    if name == "tensor-overlap":
        return f"tensors '{tensors[1]['name']}' and '{tensors[2]['name']}' overlap"
    raise AssertionError(name)


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def test_tensor_of_another_shape_is_refused(engine_copy):
    """A self-consistent file whose tensor shape differs from the compiled model's (same byte count)."""
    model = engine_copy / "model.afs"
    s = SHAPES[DEFAULT_SHAPE]
    rewrite_manifest(model, lambda m: m["tensors"][0].update(shape=[s.hidden, s.vocab]))
    msg = f"{model}: tensor 'embed' is f32 [{s.hidden}, {s.vocab}] but this engine was compiled for f32 [{s.vocab}, {s.hidden}]"
    r = run_engine(engine_copy / "bin" / "afs-engine", "info", "--model", str(model))
    assert r.returncode == 1 and r.stderr == f"afs-engine: error: {msg}\n"
    assert python_error(engine_copy) == msg


def test_missing_tensor_is_refused(engine_copy):
    model = engine_copy / "model.afs"
    rewrite_manifest(model, lambda m: m.update(tensors=[t for t in m["tensors"] if t["name"] != "lm_head"]))
    msg = f"{model}: engine file has no tensor 'lm_head'"
    r = run_engine(engine_copy / "bin" / "afs-engine", "generate", "--token-ids", "1", "--model", str(model))
    assert r.returncode == 1 and r.stderr == f"afs-engine: error: {msg}\n"
    assert python_error(engine_copy) == msg


def test_other_spec_is_refused_with_rebuild_command(default_engine, engine_copy):
    """model.afs built for another spec: the binary says how to rebuild, naming the afs-build command."""
    model = engine_copy / "model.afs"
    real = default_engine.manifest()["spec_hash"]
    fake = "0123456789abcdef"
    assert fake != real
    rewrite_manifest(model, lambda m: m.update(spec_hash=fake))
    info = json.loads(run_engine(default_engine.binary, "info", "--json").stdout)
    msg = (f"{model} was built for engine spec {fake} but this engine binary was compiled for {real} "
           f"({info['spec_name']}); rebuild the engine so both match: afs-build --model {default_engine.checkpoint} "
           "--output <engine dir> --force")
    for cmd in (["info"], ["verify"], ["generate", "--token-ids", "1,2"]):
        r = run_engine(engine_copy / "bin" / "afs-engine", *cmd, "--model", str(model))
        assert r.returncode == 1, r.stderr
        assert r.stderr == f"afs-engine: error: {msg}\n"
        assert "rebuild" in r.stderr and "afs-build --model" in r.stderr
    # Python: manifest.json still names the real spec, so the module loads and the engine refuses the file.
    assert python_error(engine_copy) == msg


def test_flipped_tensor_byte_is_found_by_verify(engine_copy):
    model = engine_copy / "model.afs"
    t = tensor_entry(model, "layers.0.qkv")
    _, d_off = _fields(model.read_bytes())
    flip_byte(model, d_off + t["offset"] + 1234)
    binary = engine_copy / "bin" / "afs-engine"
    r = run_engine(binary, "verify", "--model", str(model))
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("checksum mismatch: layers.0.qkv (crc32 ")
    assert lines[0].endswith(f", expected {t['crc32']})")
    r = run_engine(binary, "verify", "--json", "--model", str(model))
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["ok"] is False and len(out["bad"]) == 1 and out["bad"][0].startswith("layers.0.qkv")
    # Loading does not read every byte: the engine still starts, and verify is how to find the damage.
    assert run_engine(binary, "info", "--model", str(model)).returncode == 0


def test_missing_and_non_regular_files(default_engine, tmp_path):
    missing = tmp_path / "nope.afs"
    r = run_engine(default_engine.binary, "info", "--model", str(missing))
    assert r.returncode == 1
    assert r.stderr == f"afs-engine: error: {missing}: cannot open engine file: No such file or directory\n"
    r = run_engine(default_engine.binary, "info", "--model", str(tmp_path))
    assert r.returncode == 1 and r.stderr == f"afs-engine: error: {tmp_path}: not a regular file\n"


def test_python_load_of_a_non_engine_directory(tmp_path):
    assert python_error(tmp_path) == f"{tmp_path}: not an engine directory (no manifest.json); build one with afs-build"
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(afs.EngineError) as exc:
        afs.load(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path / 'manifest.json'}: unreadable manifest (")


def test_python_load_without_the_module(engine_copy):
    shutil.rmtree(engine_copy / "python")
    (engine_copy / "python").mkdir()
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    # Another spec hash, so the module cache of this process cannot answer for it.
    manifest["spec_hash"] = "fedcba9876543210"
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    msg = python_error(engine_copy)
    assert msg.startswith(f"{engine_copy}: no engine module _afs_engine_fedcba9876543210 for this Python (")
    assert msg.endswith("); rebuild with afs-build using this interpreter")


# ---------------------------------------------------------------------------------------------
# Bad requests: the binary and the Python API give the same message

PROMPT = "1,2,3"

# (id, binary args after `generate --token-ids PROMPT`, python generate kwargs (None: binary only), message)
BAD_REQUESTS = [
    ("token-out-of-range", ["--token-ids", f"1,{VOCAB}"], dict(token_ids=[1, VOCAB]),
     f"prompt[1] = {VOCAB} is not a token id of this model (vocabulary size {VOCAB})"),
    ("negative-token", ["--token-ids", "-7,1"], dict(token_ids=[-7, 1]),
     f"prompt[0] = -7 is not a token id of this model (vocabulary size {VOCAB})"),
    ("top-p-0", ["--top-p", "0"], dict(top_p=0.0), "top_p must be in (0, 1], got 0"),
    ("top-p-above-1", ["--top-p", "1.5"], dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    ("temperature-negative", ["--temperature", "-1"], dict(temperature=-1.0),
     "temperature must be a finite number >= 0, got -1"),
    ("temperature-nan", ["--temperature", "nan"], dict(temperature=float("nan")),
     "temperature must be a finite number >= 0, got nan"),
    ("top-k-negative", ["--top-k", "-1"], None, "top_k must be >= 0 (0 disables it), got -1"),
    ("min-p-above-1", ["--min-p", "2"], dict(min_p=2.0), "min_p must be in [0, 1], got 2"),
    ("max-tokens-0", ["--max-tokens", "0"], None, "max_tokens must be >= 1, got 0"),
    ("max-tokens-over-context", ["--max-tokens", str(CONTEXT)], dict(max_tokens=CONTEXT),
     f"max_tokens = {CONTEXT} with a prompt of 3 tokens exceeds the context limit of {CONTEXT} tokens"),
    ("prompt-fills-context", ["--token-ids", ",".join(["5"] * CONTEXT)], dict(token_ids=[5] * CONTEXT),
     f"prompt of {CONTEXT} tokens leaves no room to generate within the context limit of {CONTEXT}"),
]


@pytest.mark.parametrize("args,kwargs,message", [pytest.param(a, k, m, id=i) for i, a, k, m in BAD_REQUESTS])
def test_bad_request(default_engine, args, kwargs, message):
    r = run_engine(default_engine.binary, "generate", "--token-ids", PROMPT, *args)
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""
    assert r.stderr == f"afs-engine: error: {message}\n"
    if kwargs is not None:
        kwargs = dict(kwargs)
        ids = kwargs.pop("token_ids", [1, 2, 3])
        with pytest.raises(afs.EngineError) as exc:
            default_engine.engine.generate(ids, **kwargs)
        assert str(exc.value) == message


USAGE_ERRORS = [
    ("unknown-option", ["generate", "--token-ids", PROMPT, "--bogus", "1"], "unknown option '--bogus'"),
    ("unknown-command", ["chatter"], "unknown command 'chatter' (generate, chat, info, bench, verify)"),
    ("max-tokens-not-integer", ["generate", "--token-ids", PROMPT, "--max-tokens", "ten"],
     "option --max-tokens expects an integer, got 'ten'"),
    ("max-tokens-float", ["generate", "--token-ids", PROMPT, "--max-tokens", "2.5"],
     "option --max-tokens expects an integer, got '2.5'"),
    ("token-id-not-integer", ["generate", "--token-ids", "1,x,3"], "option --token-ids expects an integer, got 'x'"),
    ("token-id-empty", ["generate", "--token-ids", "1,,3"], "option --token-ids expects an integer, got ''"),
    ("token-id-overflow", ["generate", "--token-ids", "99999999999"],
     "option --token-ids must be in [-2147483648, 2147483647], got 99999999999"),
    ("no-token-ids", ["generate"], "generate needs exactly one of --prompt TEXT or --token-ids LIST"),
    ("missing-value", ["generate", "--token-ids"], "option --token-ids needs a value"),
    ("flag-with-value", ["info", "--json=yes"], "option --json takes no value"),
    ("temperature-not-number", ["generate", "--token-ids", PROMPT, "--temperature", "hot"],
     "option --temperature expects a number, got 'hot'"),
    ("seed-negative", ["generate", "--token-ids", PROMPT, "--seed", "-3"],
     "option --seed must be in [0, 9223372036854775807], got -3"),
    ("threads-0", ["info", "--threads", "0"], "option --threads must be in [1, 4096], got 0"),
    ("extra-argument", ["info", "extra"], "unexpected argument 'extra'"),
]


@pytest.mark.parametrize("args,message", [pytest.param(a, m, id=i) for i, a, m in USAGE_ERRORS])
def test_usage_error(default_engine, args, message):
    r = run_engine(default_engine.binary, *args)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert r.stderr == f"afs-engine: error: {message}\n(run afs-engine --help for usage)\n"


def test_help_and_no_command(default_engine):
    r = run_engine(default_engine.binary, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: afs-engine <command> [options]") and r.stderr == ""
    r = run_engine(default_engine.binary)
    assert r.returncode == 2 and r.stderr.startswith("usage: afs-engine <command> [options]") and r.stdout == ""


def test_bench_over_context(default_engine):
    r = run_engine(default_engine.binary, "bench", "--prompt-tokens", str(CONTEXT), "--gen-tokens", "10")
    assert r.returncode == 1
    assert r.stderr == f"afs-engine: error: bench: {CONTEXT} + 10 tokens exceed the context limit of {CONTEXT}\n"


def test_max_context_option(default_engine):
    """--max-context (and afs.load(max_context=)) lowers the limit the requests are checked against."""
    r = run_engine(default_engine.binary, "generate", "--token-ids", PROMPT, "--max-tokens", "6", "--max-context", "8")
    assert r.returncode == 1
    assert r.stderr == "afs-engine: error: max_tokens = 6 with a prompt of 3 tokens exceeds the context limit of 8 tokens\n"
    e = afs.load(default_engine.dir, max_context=8)
    assert e.max_context == 8
    assert len(e.generate([1, 2, 3], max_tokens=5, ignore_eos=True)) == 5
    with pytest.raises(afs.EngineError) as exc:
        e.score(list(range(9)))
    assert str(exc.value) == "prompt of 9 tokens exceeds the context limit of 8"


PY_ONLY = [
    ("empty-prompt", lambda e: e.generate([]), "the prompt must hold at least one token"),
    ("empty-score", lambda e: e.score([]), "score needs at least one token"),
    ("score-out-of-range", lambda e: e.score([0, VOCAB + 3]),
     f"token_ids[1] = {VOCAB + 3} is not a token id of this model (vocabulary size {VOCAB})"),
    ("stop-id-out-of-range", lambda e: e.generate([1], stop_token_ids=[VOCAB]),
     f"stop_token_ids[0] = {VOCAB} is not a token id of this model (vocabulary size {VOCAB})"),
    ("text-without-tokenizer", lambda e: e.generate("hello"),
     "this engine has no tokenizer (the checkpoint had no tokenizer.json); pass token ids instead"),
    ("float-token", lambda e: e.generate([1, 2.5]), "prompt[1] = 2.5 is not an integer token id"),
    ("bool-token", lambda e: e.generate([1, True]), "prompt[1] = True is not an integer token id"),
    ("negative-token", lambda e: e.score([3, -1]),
     f"token_ids[1] = -1 is not a token id of this model (vocabulary size {VOCAB})"),
    ("huge-token", lambda e: e.score([2**40]), f"token_ids[0] = {2**40} is not a token id of this model"),
    ("max-tokens-string", lambda e: e.generate([1], max_tokens="5"), "max_tokens must be an integer, got '5'"),
    ("max-tokens-0", lambda e: e.generate([1], max_tokens=0), "max_tokens must be >= 1, got 0"),
    ("top-k-negative", lambda e: e.generate([1], top_k=-1), "top_k must be >= 0 (0 disables it), got -1"),
    ("seed-negative", lambda e: e.generate([1], seed=-1), "seed must be in [0, 2**64), got -1"),
    ("temperature-string", lambda e: e.generate([1], temperature="hot"), "temperature must be a number, got 'hot'"),
]


def test_prompt_id_containers(default_engine):
    """A list of Python ints (checked in bulk), a tuple, numpy integers and a numpy array are the
    same prompt."""
    e = default_engine.engine
    ids = [1, 5, 9, 2]
    want = e.generate(ids, max_tokens=4, ignore_eos=True)
    for same in (tuple(ids), [np.int64(i) for i in ids], np.array(ids, dtype=np.int32)):
        assert e.generate(same, max_tokens=4, ignore_eos=True) == want


@pytest.mark.parametrize("call,message", [pytest.param(c, m, id=i) for i, c, m in PY_ONLY])
def test_python_bad_input(default_engine, call, message):
    with pytest.raises(afs.EngineError) as exc:
        call(default_engine.engine)
    assert str(exc.value) == message
    assert isinstance(exc.value, ValueError)
    # The engine is still usable afterwards.
    assert len(default_engine.engine.generate([1, 2], max_tokens=2, ignore_eos=True)) == 2
