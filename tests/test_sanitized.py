"""The CPU runtime under AddressSanitizer + UBSan: the demo engine built with AFS_SANITIZE=1, its
binary run over normal requests, bad requests and the whole malformed engine-file corpus, and its
Python module driven through afs.load in a child process. Any sanitizer report fails the test.

Slow (a full sanitized compile, ~2 min on 2 cores), so it runs only when asked:

    AFS_TEST_SANITIZE=1 python -m pytest tests/test_sanitized.py -q      # .ci/run does this

The Python child preloads libasan and libstdc++ (the interpreter links neither; without libstdc++
first, ASan's __cxa_throw interceptor has nothing to forward to) and turns leak checking off
(CPython keeps its allocations at exit). The binary runs with leak checking on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from malformed.cases import ENGINE_CASES, ENGINE_COMMANDS, EngineImage

pytestmark = pytest.mark.skipif(os.environ.get("AFS_TEST_SANITIZE") != "1",
                                reason="sanitizer build: set AFS_TEST_SANITIZE=1 (slow compile)")

REPORT_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "SUMMARY: AddressSanitizer",
                  "SUMMARY: UndefinedBehaviorSanitizer", "AddressSanitizer: CHECK failed")
SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:exitcode=86:strict_string_checks=1:detect_invalid_pointer_pairs=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}


def _gcc_lib(name: str) -> str:
    cxx = os.environ.get("CXX") or "g++"
    return subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def san_engine(tmp_path_factory) -> Path:
    from afs_build.cli import build_engine
    from afs_build.demo import demo_checkpoint

    ckpt = demo_checkpoint(tmp_path_factory.mktemp("demo-ckpt"))
    out = tmp_path_factory.mktemp("demo-asan")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AFS_SANITIZE", "1")
        build_engine(model=str(ckpt), arch="cpu", dtype="fp32", output=out, quiet=True)
    # The binary really carries the ASan runtime (help=1 prints its flags and exits).
    r = subprocess.run([str(out / "bin" / "afs-engine"), "info"], capture_output=True, text=True,
                       env=dict(os.environ, ASAN_OPTIONS="help=1"), timeout=120)
    assert "Available flags for AddressSanitizer" in r.stdout + r.stderr
    return out


def run(binary: Path, *args: str | bytes, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(binary), *args], capture_output=True, input=stdin, timeout=300,
                       env=dict(os.environ, **SAN_ENV))
    err = r.stderr.decode("utf-8", "replace")
    for marker in REPORT_MARKERS:
        assert marker not in err, f"sanitizer report for {args}:\n{err[-6000:]}"
    assert r.returncode >= 0, f"killed by signal {-r.returncode} for {args}:\n{err[-3000:]}"
    return r


def test_requests(san_engine, tmp_path):
    b = san_engine / "bin" / "afs-engine"
    ok = [
        ["generate", "--token-ids", "1,2,3", "--max-tokens", "12", "--ignore-eos"],
        ["generate", "--token-ids", "1,2,3", "--max-tokens", "12", "--temperature", "0.9", "--top-k", "40",
         "--top-p", "0.9", "--min-p", "0.02", "--seed", "7", "--json"],
        ["generate", "--token-ids", "5", "--max-tokens", "4", "--temperature", "1e-30", "--seed", "1"],
        ["generate", "--prompt", "The quick brown fox", "--max-tokens", "10", "--stop", "e", "--stop", "the"],
        ["generate", "--prompt", "naïve café 日本語 😀", "--chat", "--max-tokens", "6", "--json"],
        ["generate", "--token-ids", "1,2", "--max-tokens", "30", "--max-context", "32", "--threads", "1"],
        ["bench", "--prompt-tokens", "40", "--gen-tokens", "8", "--warmup", "0", "--json"],
        ["verify"], ["verify", "--json"], ["info"], ["info", "--json"], ["--help"],
    ]
    for args in ok:
        r = run(b, *args)
        assert r.returncode == 0, (args, r.stderr.decode())
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\u0000b 😀"},
                                {"role": "assistant", "content": "ok"}, {"role": "user", "content": ""}]))
    assert run(b, "chat", "--messages", str(msgs), "--max-tokens", "6", "--json").returncode == 0
    assert run(b, "chat", "--messages", "-", "--max-tokens", "3", "--json",
               stdin=b'[{"role": "user", "content": "hi"}]').returncode == 0
    assert run(b, "chat", "--max-tokens", "3", stdin=b"hello\n/reset\nagain\n/exit\n").returncode == 0


BAD = [
    (["generate", "--token-ids", "1,99999"], 1), (["generate", "--token-ids", "-1"], 1),
    (["generate", "--token-ids", "1", "--top-p", "0"], 1), (["generate", "--token-ids", "1", "--temperature", "-1"], 1),
    (["generate", "--token-ids", "1", "--top-k", "-1"], 1), (["generate", "--token-ids", "1", "--max-tokens", "0"], 1),
    (["generate", "--token-ids", "1", "--max-tokens", "2147483647"], 1),
    (["generate", "--token-ids", ",".join(["7"] * 5000)], 1),
    (["generate", "--prompt", b"\xff\xfe bad"], 1), (["generate", "--prompt", "x", "--stop", ""], 1),
    (["generate", "--prompt", "word " * 5000], 1), (["chat", "--messages", "/nonexistent"], 1),
    (["generate", "--token-ids", "1,,2"], 2), (["generate", "--token-ids", "99999999999"], 2),
    (["bench", "--warmup", "5000"], 2), (["bench", "--prompt-tokens", "5000", "--gen-tokens", "5000"], 1),
    (["frobnicate"], 2), (["generate"], 2), (["info", "--max-context", "0"], 2),
]


@pytest.mark.parametrize("args,code", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests(san_engine, args, code):
    r = run(san_engine / "bin" / "afs-engine", *args)
    assert r.returncode == code, r.stderr.decode()
    assert r.stderr.startswith(b"afs-engine: error: ")


def test_bad_chat_files(san_engine, tmp_path):
    b = san_engine / "bin" / "afs-engine"
    for i, data in enumerate([b"", b"[", b"[" * 5000, b'[{"role": "user", "content": "\xff"}]', b"[1]", b'{"messages": 1}',
                              b'[{"role": "robot", "content": "x"}]', b"[]", b'[{"role": "user", "content": "\\ud800"}]']):
        f = tmp_path / f"{i}.json"
        f.write_bytes(data)
        r = run(b, "chat", "--messages", str(f), "--json")
        assert r.returncode == 1, (data, r.stderr.decode())


@pytest.mark.parametrize("name", list(ENGINE_CASES))
def test_malformed_engine_files(san_engine, tmp_path, name):
    image = EngineImage.read(san_engine / "model.afs")
    data, message = ENGINE_CASES[name](image)
    model = tmp_path / "model.afs"
    model.write_bytes(data)
    for cmd in ENGINE_COMMANDS:
        extra = ["--token-ids", "1,2"] if cmd == "generate" else []
        r = run(san_engine / "bin" / "afs-engine", cmd, "--model", str(model), *extra)
        assert r.returncode == 1
        assert r.stderr.decode() == f"afs-engine: error: {model}: {message}\n"


PYTHON_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import afs

    e = afs.load(sys.argv[1])
    assert e.score([1, 2, 3]).shape == (3, e.vocab_size)
    assert len(e.generate([1, 2, 3], max_tokens=6, ignore_eos=True)) == 6
    e.generate([4], max_tokens=5, temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, seed=3)
    e.generate("The quick brown fox", max_tokens=8, stop=["e"])
    e.generate(["a", "b\\x00c"], max_tokens=3)
    it = e.stream("hello", max_tokens=20)
    next(it)
    it.close()  # cancels mid-generation
    "".join(e.stream("naïve 😀", max_tokens=6))
    e.chat([{"role": "user", "content": "hi"}], max_tokens=4)
    "".join(e.chat([{"role": "user", "content": "hi"}], max_tokens=4, stream=True))
    e.bench(16, 4, 0)
    # The scheduler: several requests at once, one cancelled mid-way.
    sp = afs.SamplingParams(max_tokens=6, temperature=0.7, seed=2, ignore_eos=True)
    assert len(e.generate_batch(["hello", [1, 2, 3], "x" * 300], sp)) == 3
    reqs = [e.submit([1, 2, i + 3], sp) for i in range(4)]
    next(iter(reqs[1]))
    reqs[1].cancel()
    for r in reqs[::2]:
        assert len(list(r)) == 6
    tok = e.tokenizer
    ids = tok.encode("Hello \\x00 wörld")
    assert tok.decode(ids) == "Hello \\x00 wörld"
    dec = tok.stream()
    "".join(dec.step(i) for i in [-5, 2**31 - 1, 0xC3, 0xA9] + ids) + dec.flush()
    bad = [
        lambda: e.generate([1, e.vocab_size]), lambda: e.generate([]), lambda: e.score([]),
        lambda: e.generate([1], top_p=0.0), lambda: e.generate([1], temperature=-1.0),
        lambda: e.generate([1], max_tokens=0), lambda: e.generate([1], max_tokens=10**9),
        lambda: e.generate("x" * 50000), lambda: e.generate("a\\ud800"), lambda: list(e.stream([1], top_k=-1)),
        lambda: e.chat([{"role": "robot", "content": "x"}]), lambda: e.chat([]), lambda: e.score([7] * 5000),
        lambda: e.bench(0, 1), lambda: afs.load(sys.argv[1], max_context=-1),
    ]
    for f in bad:
        try:
            f()
        except afs.EngineError:
            continue
        raise AssertionError("no EngineError")
    assert len(e.generate([1, 2], max_tokens=3, ignore_eos=True)) == 3  # still usable
    print("python ok")
""")


def test_python_module(san_engine, tmp_path):
    script = tmp_path / "drive.py"
    script.write_text(PYTHON_SCRIPT)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:exitcode=86",
               UBSAN_OPTIONS=SAN_ENV["UBSAN_OPTIONS"],
               LD_PRELOAD=" ".join([_gcc_lib("libasan.so"), _gcc_lib("libstdc++.so")]))
    r = subprocess.run([sys.executable, str(script), str(san_engine)], capture_output=True, text=True, env=env,
                       timeout=600)
    for marker in REPORT_MARKERS:
        assert marker not in r.stderr, r.stderr[-6000:]
    assert r.returncode == 0, r.stderr[-6000:]
    assert r.stdout.strip().endswith("python ok")
