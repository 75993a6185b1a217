"""Text in and out through an engine: the demo engine's packed tokenizer and chat template, used by
the binary (generate --prompt / chat) and by Python (generate(str), stream, chat, tokenizer).

Oracles: HF `tokenizers` / transformers' AutoTokenizer for every tokenization, and the engine's own
token-id path (already checked against HF transformers in test_model_cpu.py) for generation.
"""

from __future__ import annotations

import json
import subprocess

import pytest

pytest.importorskip("afs._native", reason="afs is not installed with its native module (pip install .)")

import afs  # noqa: E402

PROMPTS = ["The quick brown fox", "Hello, world!\n\nWhat's up?", "naïve café 日本語 😀", "  leading spaces", "x"]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one, please."},
]


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    from afs_build.cli import build_engine
    from afs_build.demo import demo_checkpoint

    out = tmp_path_factory.mktemp("demo-engine")
    build_engine(model="demo", arch="cpu", dtype="fp32", output=out, quiet=True)
    return demo_checkpoint(), out, afs.load(out)


def test_tokenizer_matches_hf(demo_engine):
    from transformers import AutoTokenizer

    ckpt, _, engine = demo_engine
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    for text in PROMPTS:
        ids = hf(text)["input_ids"]
        assert engine.tokenizer.encode(text) == ids
        assert engine.tokenizer.decode(ids) == hf.decode(ids)
    hf_chat = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    hf_chat = hf_chat["input_ids"] if isinstance(hf_chat, dict) or hasattr(hf_chat, "keys") else hf_chat
    assert engine.tokenizer.apply_chat_template(MESSAGES) == list(hf_chat)
    assert list(engine._engine.encode_chat([(m["role"], m["content"]) for m in MESSAGES], True)) == list(hf_chat)


def test_text_generation_equals_token_path(demo_engine):
    _, _, engine = demo_engine
    tok = engine.tokenizer
    for text in PROMPTS:
        ids = tok.encode(text)
        out_ids = engine.generate(ids, max_tokens=24)
        eos = set(engine.eos_token_ids)
        expected = tok.decode([t for t in out_ids if t not in eos], skip_special_tokens=True)
        assert engine.generate(text, max_tokens=24) == expected


def test_stream_concatenates_to_generate(demo_engine):
    _, _, engine = demo_engine
    for text in PROMPTS:
        pieces = list(engine.stream(text, max_tokens=32, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True))
        assert "".join(pieces) == engine.generate(text, max_tokens=32, temperature=0.9, top_p=0.95, seed=5,
                                                  ignore_eos=True)
        assert all(p for p in pieces)
    # Closing a stream early cancels its generation; the engine goes on as before.
    full = engine.generate(PROMPTS[0], max_tokens=32, ignore_eos=True)
    it = engine.stream(PROMPTS[0], max_tokens=32, ignore_eos=True)
    assert full.startswith(next(it))
    it.close()
    assert engine.generate(PROMPTS[0], max_tokens=32, ignore_eos=True) == full


def test_stop_strings_are_not_returned(demo_engine):
    _, _, engine = demo_engine
    full = engine.generate("The quick brown fox", max_tokens=40, ignore_eos=True)
    assert len(full) > 12
    stop = full[6:10]
    cut = full.index(stop)
    r = engine.generate_full("The quick brown fox", max_tokens=40, ignore_eos=True, stop=[stop, "\x00never"])
    assert r["text"] == full[:cut]
    assert r["finish_reason"] == "stop"
    streamed = "".join(engine.stream("The quick brown fox", max_tokens=40, ignore_eos=True, stop=stop))
    assert streamed == full[:cut]


def test_chat_python_and_binary_agree(demo_engine, tmp_path):
    _, out, engine = demo_engine
    reply = engine.chat(MESSAGES, max_tokens=20, ignore_eos=True)
    assert "".join(engine.chat(MESSAGES, max_tokens=20, ignore_eos=True, stream=True)) == reply
    f = tmp_path / "conv.json"
    f.write_text(json.dumps(MESSAGES), encoding="utf-8")
    r = subprocess.run([str(out / "bin" / "afs-engine"), "chat", "--messages", str(f), "--max-tokens", "20",
                        "--ignore-eos", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == reply
    r = subprocess.run([str(out / "bin" / "afs-engine"), "chat", "--messages", "-", "--max-tokens", "20", "--ignore-eos",
                        "--json"], input=json.dumps(MESSAGES), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == reply


def test_interactive_chat_keeps_and_resets_history(demo_engine):
    """afs-engine chat reading lines from stdin: each reply sees the conversation so far, /reset
    forgets it, /exit ends the session (the lines after it are never read)."""
    _, out, engine = demo_engine
    first = [{"role": "user", "content": "Name a colour."}]
    reply1 = engine.chat(first, max_tokens=12, ignore_eos=True)
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "Another one."}]
    reply2 = engine.chat(second, max_tokens=12, ignore_eos=True)
    stdin = "Name a colour.\nAnother one.\n\n/reset\nName a colour.\n/exit\nNever read.\n"
    r = subprocess.run([str(out / "bin" / "afs-engine"), "chat", "--max-tokens", "12", "--ignore-eos"], input=stdin,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{reply1}\n{reply2}\n{reply1}\n"
    assert reply1 != reply2


def test_binary_generate_prompt_matches_python(demo_engine):
    _, out, engine = demo_engine
    for text in PROMPTS[:3]:
        r = subprocess.run([str(out / "bin" / "afs-engine"), "generate", "--prompt", text, "--max-tokens", "16",
                            "--json"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        full = engine.generate_full(text, max_tokens=16)
        assert got["text"] == full["text"]
        assert got["tokens"] == list(full["tokens"])
        assert got["prompt_tokens"] == len(engine.tokenizer.encode(text))
    # Streaming mode prints the same text.
    r = subprocess.run([str(out / "bin" / "afs-engine"), "generate", "--prompt", PROMPTS[0], "--max-tokens", "16"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.rstrip("\n") == engine.generate(PROMPTS[0], max_tokens=16)
    assert "random weights" in r.stderr


def test_text_errors(demo_engine, tmp_path):
    _, out, engine = demo_engine
    with pytest.raises(afs.EngineError, match="stop must be a non-empty string"):
        engine.generate("hi", stop="")
    with pytest.raises(afs.EngineError, match="stop strings need a text prompt"):
        engine.generate([1, 2], stop="x")
    with pytest.raises(afs.EngineError, match="messages\\[0\\] must be a dict"):
        engine.chat([{"role": "user"}])
    with pytest.raises(afs.EngineError, match="leaves no room to generate within the context limit of 4096"):
        engine.generate("word " * 5000, max_tokens=4)
    binary = str(out / "bin" / "afs-engine")
    r = subprocess.run([binary, "generate", "--prompt", "a", "--token-ids", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "exactly one of --prompt TEXT or --token-ids LIST" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user"}]')
    r = subprocess.run([binary, "chat", "--messages", str(bad), "--json"], capture_output=True, text=True)
    assert r.returncode == 1 and "messages[0].content must be a string" in r.stderr
    bad.write_bytes(b'[{"role": "user", "content": "\xff"}]')
    r = subprocess.run([binary, "chat", "--messages", str(bad), "--json"], capture_output=True, text=True)
    assert r.returncode == 1 and "invalid UTF-8" in r.stderr
