"""Hostile input, end to end: every case of the malformed corpus (tests/malformed/cases.py) and every
bad run-time input gives its exact error and exit status 1 (2 for usage errors), never a signal or a
traceback, from the binary, the Python API and afs-build alike.

Engine-file cases corrupt the session's default engine; checkpoint cases break a copy of the
default checkpoint, to which a small OLMo-2-format tokenizer (the demo tokenizer cut down to 309
ids) has been added. The same checkpoint is built into `text_engine` (same spec as the default
engine, so no compile) for the text-input checks.

Decision on NUL bytes: a prompt is text, and NUL is a character like any other. HF tokenizers
encodes it as the byte-level token of 0x00, and so do we (checked below); the binary takes NUL
through chat --messages (JSON "\\u0000"), since argv cannot hold it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import afs
from afs_build.errors import AfsBuildError
from conftest import DEFAULT_SHAPE, SHAPES, run_afs_build, run_engine, subprocess_env
from malformed.cases import CHECKPOINT_CASES, ENGINE_CASES, ENGINE_COMMANDS, EngineImage, run_stage, write_small_tokenizer

CONTEXT = SHAPES[DEFAULT_SHAPE].max_positions
VOCAB = SHAPES[DEFAULT_SHAPE].vocab


def assert_error(r, message: str, code: int = 1) -> None:
    assert r.returncode == code, f"exit {r.returncode} (negative: killed by a signal)\n{r.stderr}"
    assert r.stdout == ""
    suffix = "\n(run afs-engine --help for usage)\n" if code == 2 else "\n"
    assert r.stderr == f"afs-engine: error: {message}{suffix}"


# ---------------------------------------------------------------------------------------------
# Malformed engine files


@pytest.fixture(scope="module")
def image(default_engine) -> EngineImage:
    return EngineImage.read(default_engine.model_file)


def engine_dir_with(default_engine, tmp_path: Path, data: bytes) -> Path:
    """An engine directory sharing the default engine's module, with `data` as its model.afs."""
    d = tmp_path / "engine"
    d.mkdir()
    shutil.copy(default_engine.dir / "manifest.json", d / "manifest.json")
    os.symlink(default_engine.dir / "python", d / "python")
    (d / "model.afs").write_bytes(data)
    return d


@pytest.mark.parametrize("name", list(ENGINE_CASES))
def test_malformed_engine_file(default_engine, image, tmp_path, name):
    data, message = ENGINE_CASES[name](image)
    d = engine_dir_with(default_engine, tmp_path, data)
    model = d / "model.afs"
    for cmd in ENGINE_COMMANDS:
        extra = ["--token-ids", "1,2"] if cmd == "generate" else []
        assert_error(run_engine(default_engine.binary, cmd, "--model", str(model), *extra), f"{model}: {message}")
    with pytest.raises(afs.EngineError) as exc:
        afs.load(d)
    assert str(exc.value) == f"{model}: {message}"


@pytest.mark.parametrize("text", ["[1]", "[" * 100000, '{"spec_hash": 5}', '{"spec_hash": "../x"}', None])
def test_unreadable_manifest_json(default_engine, tmp_path, text):
    """afs.load reads manifest.json (to find the module) before model.afs: bad ones are EngineErrors."""
    d = engine_dir_with(default_engine, tmp_path, default_engine.model_file.read_bytes())
    (d / "manifest.json").unlink()
    if text is None:
        (d / "manifest.json").mkdir()
    else:
        (d / "manifest.json").write_text(text)
    with pytest.raises(afs.EngineError) as exc:
        afs.load(d)
    assert str(exc.value).startswith(f"{d / 'manifest.json'}: ")


def test_engine_cases_leave_valid_files_valid(default_engine, image, tmp_path):
    """The corpus helpers themselves: rebuilding the manifest without a change gives a working file."""
    from malformed.cases import with_table

    model = tmp_path / "model.afs"
    model.write_bytes(with_table(image, lambda m: None))
    r = run_engine(default_engine.binary, "verify", "--model", str(model))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("source", ["x", [1], None, {"model": 5, "random_weights": "yes"}])
def test_informational_fields_of_any_type(default_engine, image, tmp_path, source):
    """Manifest fields the engine only displays (source, afs_version) never stop it, whatever their type."""
    from malformed.cases import with_table

    model = tmp_path / "model.afs"
    model.write_bytes(with_table(image, lambda m: m.update(source=source, afs_version=7)))
    for args in (["info"], ["info", "--json"], ["generate", "--token-ids", "1", "--max-tokens", "1"]):
        r = run_engine(default_engine.binary, *args, "--model", str(model))
        assert r.returncode == 0, r.stderr
    model.write_bytes(with_table(image, lambda m: m.update(source=source, spec_hash="0123456789abcdef")))
    r = run_engine(default_engine.binary, "info", "--model", str(model))
    assert r.returncode == 1 and "rebuild the engine so both match: afs-build --model " in r.stderr


# ---------------------------------------------------------------------------------------------
# Malformed checkpoints


@pytest.fixture(scope="module")
def text_checkpoint(engines, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("text-ckpt") / "ckpt"
    shutil.copytree(engines.checkpoint(DEFAULT_SHAPE), d)
    write_small_tokenizer(d)
    return d


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_malformed_checkpoint(text_checkpoint, tmp_path, name):
    stage, make = CHECKPOINT_CASES[name]
    d = tmp_path / "ckpt"
    shutil.copytree(text_checkpoint, d)
    message = make(d)
    with pytest.raises(AfsBuildError) as exc:
        run_stage(stage, d)
    assert str(exc.value) == message


# One case per stage through the afs-build command (exit 1, one line, no traceback). The tokenizer
# case fails in the pack stage, after a compile that the session's build cache already holds.
@pytest.mark.parametrize("name", ["st-duplicate-tensor", "st-header-nested", "config-nested", "config-is-directory",
                                  "tokenizer-added-token-without-id"])
def test_malformed_checkpoint_through_afs_build(text_checkpoint, tmp_path, name):
    _, make = CHECKPOINT_CASES[name]
    d = tmp_path / "ckpt"
    shutil.copytree(text_checkpoint, d)
    message = make(d)
    r = run_afs_build("--model", str(d), "--arch", "cpu", "--dtype", "fp32", "--output", str(tmp_path / "out"), "-q")
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"afs-build: error: {message}\n"


# ---------------------------------------------------------------------------------------------
# Run-time input: text, chat files, sampling parameters


@pytest.fixture(scope="module")
def text_engine(text_checkpoint, tmp_path_factory):
    from afs_build.cli import build_engine

    out = tmp_path_factory.mktemp("text-engine")
    build_engine(model=str(text_checkpoint), arch="cpu", dtype="fp32", output=out, quiet=True)
    return out, afs.load(out)


def test_nul_is_text_like_hf(text_checkpoint, text_engine, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    out, engine = text_engine
    hf = HFTokenizer.from_file(str(text_checkpoint / "tokenizer.json"))
    for text in ["a\x00b", "\x00", "x \x00\x00 y\n\x00"]:
        ids = engine.tokenizer.encode(text)
        assert ids == hf.encode(text).ids
        assert engine.tokenizer.decode(ids) == text
        assert isinstance(engine.generate(text, max_tokens=2, ignore_eos=True), str)
    msgs = tmp_path / "nul.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "a\x00b"}]))
    r = run_engine(out / "bin" / "afs-engine", "chat", "--messages", str(msgs), "--max-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] == len(engine.tokenizer.apply_chat_template([{"role": "user", "content": "a\x00b"}]))


def test_invalid_utf8_prompt(text_engine):
    out, engine = text_engine
    r = run_engine_bytes(out / "bin" / "afs-engine", b"generate", b"--prompt", b"ok \xff\xfe")
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr == b"afs-engine: error: input is not valid UTF-8 at byte 3\n"
    with pytest.raises(afs.EngineError) as exc:
        engine.generate(b"ok \xff")
    assert str(exc.value) == "prompt must be str (text) or a sequence of token ids, not bytes"
    for call, what in [(lambda: engine.generate("a\ud800"), "prompt"), (lambda: list(engine.stream("\udc00x")), "prompt"),
                       (lambda: engine.chat([{"role": "user", "content": "\ud800"}]), "messages[0].content"),
                       (lambda: engine.generate("a", stop=["\ud800"]), "stop")]:
        with pytest.raises(afs.EngineError) as exc:
            call()
        assert str(exc.value).startswith(f"{what} is not valid Unicode text: lone surrogate")


def run_engine_bytes(binary: Path, *args: bytes):
    import subprocess

    return subprocess.run([bytes(binary), *args], capture_output=True, timeout=120)


def test_text_prompt_over_context(text_engine):
    out, engine = text_engine
    text = "word " * (CONTEXT + 10)
    n = len(engine.tokenizer.encode(text))
    assert n >= CONTEXT
    msg = f"prompt of {n} tokens leaves no room to generate within the context limit of {CONTEXT}"
    assert_error(run_engine(out / "bin" / "afs-engine", "generate", "--prompt", text), msg)
    for call in (lambda: engine.generate(text), lambda: list(engine.stream(text)),
                 lambda: engine.chat([{"role": "user", "content": text}])):
        with pytest.raises(afs.EngineError) as exc:
            call()
        assert str(exc.value).endswith(f"tokens leaves no room to generate within the context limit of {CONTEXT}")
    with pytest.raises(afs.EngineError) as exc:
        engine.score(list(range(5)) * CONTEXT)
    assert str(exc.value) == f"prompt of {5 * CONTEXT} tokens exceeds the context limit of {CONTEXT}"


# ---------------------------------------------------------------------------------------------
# The engine file changing under a loaded engine

# Loads the engine, answers a few requests, damages model.afs (truncated to argv[2] bytes, or its
# data overwritten with zeros for "zeros"), answers the same requests again and prints both sets.
# In a child process, so that a SIGBUS from a truncated file mapping shows as a signal exit.
DAMAGE_AFTER_LOAD = """
import json, os, sys
import afs

engine_dir, damage = sys.argv[1], sys.argv[2]
model = os.path.join(engine_dir, "model.afs")
e = afs.load(engine_dir)

def answers():
    sp = afs.SamplingParams(max_tokens=8, ignore_eos=True)
    return {
        "generate": e.generate("The quick brown fox", max_tokens=8, ignore_eos=True),
        "sampled": e.generate([5, 6, 7], max_tokens=8, temperature=0.8, seed=3, ignore_eos=True),
        "batch": [(r["tokens"], r.get("text")) for r in e.generate_batch([[1, 2, 3], "hello there"], sp)],
        "score": e.score([5, 6, 7, 8]).tolist(),
        "encode": e.tokenizer.encode("naive cafe 123"),
    }

before = answers()
if damage == "zeros":
    size = os.path.getsize(model)
    with open(model, "r+b") as f:
        f.seek(4096)
        f.write(bytes(size - 4096))
else:
    os.truncate(model, int(damage))
print(json.dumps({"before": before, "after": answers()}))
"""


@pytest.mark.parametrize("damage", ["0", "8192", "zeros"])
def test_engine_file_damaged_after_load(text_engine, tmp_path, damage):
    """The CPU engine holds its weights and tokenizer in private memory: truncating or overwriting
    model.afs while it runs changes nothing (a file mapping would raise SIGBUS or change the
    answers); only the next load sees the damage."""
    import subprocess
    import sys

    out, _ = text_engine
    d = tmp_path / "engine"
    shutil.copytree(out, d)
    r = subprocess.run([sys.executable, "-c", DAMAGE_AFTER_LOAD, str(d), damage], capture_output=True, text=True,
                       env=subprocess_env(), timeout=300)
    assert r.returncode == 0, f"exit {r.returncode} (negative: killed by a signal)\n{r.stderr[-3000:]}"
    result = json.loads(r.stdout)
    assert result["after"] == result["before"]
    with pytest.raises(afs.EngineError) as exc:
        afs.load(d)
    assert str(exc.value).startswith(f"{d / 'model.afs'}: ")


# (binary options, python kwargs, message) for a text prompt "hello"
TEXT_BAD = [
    ("max-tokens-0", ["--max-tokens", "0"], dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
    ("max-tokens-negative", ["--max-tokens", "-5"], dict(max_tokens=-5), "max_tokens must be >= 1, got -5"),
    ("top-p-0", ["--top-p", "0"], dict(top_p=0.0), "top_p must be in (0, 1], got 0"),
    ("top-p-negative", ["--top-p", "-0.5"], dict(top_p=-0.5), "top_p must be in (0, 1], got -0.5"),
    ("top-p-above-1", ["--top-p", "1.01"], dict(top_p=1.01), "top_p must be in (0, 1], got 1.01"),
    ("top-p-nan", ["--top-p", "nan"], dict(top_p=float("nan")), "top_p must be in (0, 1], got nan"),
    ("temperature-negative", ["--temperature", "-0.1"], dict(temperature=-0.1),
     "temperature must be a finite number >= 0, got -0.1"),
    ("temperature-inf", ["--temperature", "inf"], dict(temperature=float("inf")),
     "temperature must be a finite number >= 0, got inf"),
    ("top-k-negative", ["--top-k", "-3"], dict(top_k=-3), "top_k must be >= 0 (0 disables it), got -3"),
    ("min-p-negative", ["--min-p", "-1"], dict(min_p=-1.0), "min_p must be in [0, 1], got -1"),
]


@pytest.mark.parametrize("args,kwargs,message", [pytest.param(a, k, m, id=i) for i, a, k, m in TEXT_BAD])
def test_bad_sampling_on_every_path(text_engine, tmp_path, args, kwargs, message):
    out, engine = text_engine
    binary = out / "bin" / "afs-engine"
    assert_error(run_engine(binary, "generate", "--prompt", "hello", *args), message)
    assert_error(run_engine(binary, "generate", "--token-ids", "1,2", *args), message)
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "hello"}]))
    assert_error(run_engine(binary, "chat", "--messages", str(msgs), "--json", *args), message)
    for call in (lambda: engine.generate("hello", **kwargs), lambda: engine.generate([1, 2], **kwargs),
                 lambda: list(engine.stream("hello", **kwargs)),
                 lambda: engine.chat([{"role": "user", "content": "hello"}], **kwargs)):
        with pytest.raises(afs.EngineError) as exc:
            call()
        assert str(exc.value) == message


def test_absurd_max_tokens(text_engine):
    out, engine = text_engine
    binary = out / "bin" / "afs-engine"
    n = len(engine.tokenizer.encode("hello"))
    assert_error(run_engine(binary, "generate", "--prompt", "hello", "--max-tokens", "2147483647"),
                 f"max_tokens = 2147483647 with a prompt of {n} tokens exceeds the context limit of {CONTEXT} tokens")
    assert_error(run_engine(binary, "generate", "--prompt", "hello", "--max-tokens", "99999999999"),
                 "option --max-tokens must be in [-2147483648, 2147483647], got 99999999999", code=2)
    for call in (lambda: engine.generate("hello", max_tokens=10**12), lambda: engine.generate([1], max_tokens=2**31)):
        with pytest.raises(afs.EngineError) as exc:
            call()
        assert str(exc.value).startswith("max_tokens = ") and str(exc.value).endswith(
            f"exceeds the context limit of {CONTEXT} tokens")
    # A top_k past the vocabulary keeps every token, as top_k = 0 does.
    assert engine.generate([1, 2], max_tokens=3, temperature=0.7, top_k=2**40, seed=5, ignore_eos=True) == \
        engine.generate([1, 2], max_tokens=3, temperature=0.7, top_k=0, seed=5, ignore_eos=True)


def test_tiny_temperature_is_greedy(text_engine):
    """(logit - max) / T: a temperature near zero cannot overflow into NaN and sample garbage."""
    _, engine = text_engine
    greedy = engine.generate([1, 2, 3], max_tokens=8, ignore_eos=True)
    for t in (1e-30, 1e-44):
        assert engine.generate([1, 2, 3], max_tokens=8, temperature=t, seed=3, ignore_eos=True) == greedy


CHAT_FILES = [
    # (id, file bytes, message; {f} is the file path)
    ("not-utf8", b'[{"role": "user", "content": "\xff"}]', "{f}: invalid JSON at byte 30: invalid UTF-8 in string"),
    ("not-json", b"[{", "{f}: invalid JSON at byte 2: expected a string key"),
    ("nested", b"[" * 10000, "{f}: invalid JSON at byte 129: nesting too deep"),
    ("not-a-list", b'{"messages": 5}', "{f}: messages must be an array"),
    ("not-objects", b"[1]", "{f}: messages[0] must be an object with 'role' and 'content'"),
    ("no-content", b'[{"role": "user"}]', "{f}: messages[0].content must be a string"),
    ("role-number", b'[{"role": 1, "content": "x"}]', "{f}: messages[0].role must be a string"),
    ("unknown-role", b'[{"role": "robot", "content": "x"}]',
     "the chat template has no role 'robot' (it supports system, user, assistant)"),
    ("empty", b"[]", "a chat needs at least one message"),
    ("two-users", b'[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', None),
]


@pytest.mark.parametrize("data,message", [pytest.param(d, m, id=i) for i, d, m in CHAT_FILES])
def test_chat_messages_file(text_engine, tmp_path, data, message):
    out, engine = text_engine
    f = tmp_path / "messages.json"
    f.write_bytes(data)
    r = run_engine(out / "bin" / "afs-engine", "chat", "--messages", str(f), "--json", "--max-tokens", "2")
    if message is None:  # a conversation the template accepts (the demo template allows two user turns)
        assert r.returncode == 0, r.stderr
        return
    assert_error(r, message.format(f=f))


def test_chat_messages_file_missing(text_engine, tmp_path):
    out, _ = text_engine
    missing = tmp_path / "none.json"
    assert_error(run_engine(out / "bin" / "afs-engine", "chat", "--messages", str(missing), "--json"),
                 f"cannot read messages file '{missing}'")


def test_empty_stop_string(text_engine):
    out, engine = text_engine
    assert_error(run_engine(out / "bin" / "afs-engine", "generate", "--prompt", "hi", "--stop", ""),
                 "stop strings must not be empty")


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_context=-1), "max_context must be in [0, 2147483647], got -1"),
    (dict(max_context=2**40), f"max_context must be in [0, 2147483647], got {2**40}"),
    (dict(threads=-2), "threads must be in [0, 4096], got -2"),
    (dict(threads="4"), "threads must be an integer, got '4'"),
    (dict(kv_blocks=-1), "kv_blocks must be in [0, 2147483647], got -1"),
    (dict(kv_block_size=0), "kv_block_size must be in [1, 2147483647], got 0"),
    (dict(kv_block_size=2**40), f"kv_block_size must be in [1, 2147483647], got {2**40}"),
    (dict(max_batch_tokens=-1), "max_batch_tokens must be in [0, 2147483647], got -1"),
    (dict(gpu_memory_fraction=0.0), "gpu_memory_fraction must be a number in (0, 1], got 0.0"),
    (dict(gpu_memory_fraction=1.5), "gpu_memory_fraction must be a number in (0, 1], got 1.5"),
    (dict(gpu_memory_fraction="0.5"), "gpu_memory_fraction must be a number in (0, 1], got '0.5'"),
])
def test_bad_load_options(default_engine, kwargs, message):
    with pytest.raises(afs.EngineError) as exc:
        afs.load(default_engine.dir, **kwargs)
    assert str(exc.value) == message


@pytest.mark.parametrize("args,message", [
    ((0, 4), "prompt_tokens must be in [1, 2147483647], got 0"),
    ((4, "x"), "gen_tokens must be an integer, got 'x'"),
    ((4, 4, 10**6), "warmup must be in [0, 1000], got 1000000"),
    ((CONTEXT, 4), f"bench: {CONTEXT} + 4 tokens exceed the context limit of {CONTEXT}"),
])
def test_bad_bench(default_engine, args, message):
    with pytest.raises(afs.EngineError) as exc:
        default_engine.engine.bench(*args)
    assert str(exc.value) == message


def test_bad_bench_binary(default_engine):
    assert_error(run_engine(default_engine.binary, "bench", "--warmup", "5000"),
                 "option --warmup must be in [0, 1000], got 5000", code=2)


def test_unwritable_output_directory(engines, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_afs_build("--model", str(engines.checkpoint(DEFAULT_SHAPE)), "--arch", "cpu", "--dtype", "fp32",
                      "--output", str(blocker / "out"), "-q")
    assert r.returncode == 1
    assert r.stderr == f"afs-build: error: [Errno 20] Not a directory: '{blocker / 'out'}'\n"
