"""Differential tests of the native tokenizer (afs._native) against HF tokenizers, the oracle.

Tokenizers: two OLMo-2-style BPEs trained here with HF tokenizers at different vocabulary sizes
(one with ignore_merges and a TemplateProcessing post-processor), one with GPT-2's ByteLevel regex,
and the pure-Python demo tokenizer. Inputs: seeded generators (tests/tokenizer_cases.py), over
100,000 strings per run, plus a 1 MB text, every Unicode code point, random id sequences and invalid
UTF-8. Every comparison must be exact.

    PYTHONPATH=python:. python -m pytest tests/test_tokenizer.py -q
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

_native = pytest.importorskip("afs._native", reason="afs is not installed with its native module (pip install .)")
hf_tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers (the oracle) is not installed")

import tokenizer_cases as cases  # noqa: E402

STRINGS_PER_TOKENIZER = 26_000
# Added tokens that make decode(encode(s)) != s: lstrip/rstrip swallow whitespace, "Ġthe" decodes to " the".
LOSSY = ("[MASK]", "<tab>", "Ġthe")
TOKENIZERS = ["cl100k_v600", "cl100k_v6000_ignore_merges_template", "gpt2_regex_v1500", "demo"]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from afs_build.demo_tokenizer import write_demo_tokenizer

    d = tmp_path_factory.mktemp("demo-tokenizer")
    write_demo_tokenizer(d)
    return d


_JSON_CACHE: dict[str, str] = {}


def tokenizer_json(name: str, demo_dir) -> str:
    if name not in _JSON_CACHE:
        if name == "cl100k_v600":
            _JSON_CACHE[name] = cases.train_hf_tokenizer(600)
        elif name == "cl100k_v6000_ignore_merges_template":
            _JSON_CACHE[name] = cases.train_hf_tokenizer(6000, ignore_merges=True, post_processor="template")
        elif name == "gpt2_regex_v1500":
            _JSON_CACHE[name] = cases.train_hf_tokenizer(1500, pattern="gpt2", merges_as_strings=True)
        elif name == "demo":
            _JSON_CACHE[name] = (demo_dir / "tokenizer.json").read_text(encoding="utf-8")
    return _JSON_CACHE[name]


@pytest.fixture(scope="session", params=TOKENIZERS)
def pair(request, demo_dir):
    """(name, HF tokenizer, native tokenizer) built from the same tokenizer.json."""
    text = tokenizer_json(request.param, demo_dir)
    return request.param, hf_tokenizers.Tokenizer.from_str(text), _native.Tokenizer(text)


def added_contents(hf) -> list[str]:
    return [t.content for t in hf.get_added_tokens_decoder().values()]


def assert_same(inputs, expected, got, what):
    bad = [(s, e, g) for s, e, g in zip(inputs, expected, got) if e != g]
    if bad:
        lines = [f"{len(bad)} of {len(inputs)} {what} differ; first ones:"]
        for s, e, g in bad[:5]:
            lines.append(f"  input {s!r}\n    HF     {e}\n    native {g}")
        pytest.fail("\n".join(lines))


def test_unicode_version():
    assert _native.unicode_version == "16.0.0"


def test_encode_generated_inputs(pair):
    name, hf, nt = pair
    inputs = cases.generated_inputs(STRINGS_PER_TOKENIZER, seed=hash(name) % 1000 + 7, added_contents=added_contents(hf))
    expected = [e.ids for e in hf.encode_batch(inputs, add_special_tokens=True)]
    assert_same(inputs, expected, nt.encode_batch(inputs, True), "encodings")
    few = inputs[::10]
    expected = [e.ids for e in hf.encode_batch(few, add_special_tokens=False)]
    assert_same(few, expected, [nt.encode(s, add_special_tokens=False) for s in few], "encodings without specials")


def test_decode_roundtrip_and_stream(pair):
    name, hf, nt = pair
    inputs = cases.generated_inputs(4000, seed=99, added_contents=added_contents(hf))
    for s in inputs:
        ids = nt.encode(s, False)
        for skip in (False, True):
            text = nt.decode(ids, skip)
            assert text == hf.decode(ids, skip_special_tokens=skip), (s, ids, skip)
            dec = _native.StreamDecoder(nt, skip)
            assert "".join(dec.step(i) for i in ids) + dec.flush() == text, (s, ids)
        if not any(t in s for t in LOSSY):
            assert nt.decode(ids, False) == s


def test_decode_random_ids(pair):
    """Arbitrary id sequences: partial UTF-8, specials, unknown ids; decode and streaming agree with HF."""
    name, hf, nt = pair
    rng = random.Random(5)
    space = nt.id_space
    for _ in range(3000):
        ids = [rng.randrange(0, space) for _ in range(rng.randrange(0, 12))]
        if rng.random() < 0.2:
            ids.insert(rng.randrange(0, len(ids) + 1), space + rng.randrange(0, 5))  # unknown id: skipped
        for skip in (False, True):
            text = nt.decode(ids, skip)
            assert text == hf.decode(ids, skip_special_tokens=skip), (ids, skip)
            dec = _native.StreamDecoder(nt, skip)
            parts = [dec.step(i) for i in ids]
            assert "".join(parts) + dec.flush() == text, ids
            assert "\ufffd" not in "".join(parts) or "\ufffd" in text


def test_ids_outside_the_id_space_decode_to_nothing(pair):
    """Negative ids and ids up to INT32_MAX (HF cannot even take them) are skipped like unknown ids,
    by decode and by the streaming decoder, between any two tokens."""
    name, hf, nt = pair
    ids = nt.encode("Hello wörld 😀", False)
    noisy = [-5, 2**31 - 1] + [x for i in ids for x in (i, -1, nt.id_space, 2**31 - 1)]
    for skip in (False, True):
        text = nt.decode(ids, skip)
        assert nt.decode(noisy, skip) == text
        dec = _native.StreamDecoder(nt, skip)
        assert "".join(dec.step(i) for i in noisy) + dec.flush() == text


def test_vocabulary_lookups(pair):
    name, hf, nt = pair
    assert nt.vocab_size == hf.get_vocab_size()
    for token, i in hf.get_vocab().items():
        assert nt.token_to_id(token) == hf.token_to_id(token) == i
    for i in range(nt.id_space + 3):
        assert nt.id_to_token(i) == hf.id_to_token(i), i
    assert nt.token_to_id("definitely not a token ✗") is None


def test_every_code_point_classified_as_hf(pair):
    """Each code point in letter, digit, punctuation and space contexts splits as HF's regex splits it."""
    name, hf, nt = pair
    if name not in ("demo", "gpt2_regex_v1500"):
        pytest.skip("one tokenizer per regex is enough")
    if name == "demo":
        oracle = hf_tokenizers.pre_tokenizers.Split(hf_tokenizers.Regex(cases.OLMO2_SPLIT_REGEX), "removed", invert=True)
    else:
        oracle = hf_tokenizers.pre_tokenizers.Split(hf_tokenizers.Regex(cases.GPT2_REGEX), "isolated")
    for block in range(0, 0x110000, 128):
        chars = [chr(c) for c in range(block, block + 128) if not 0xD800 <= c <= 0xDFFF]
        if not chars:
            continue
        text = "".join(f"a{c}a1{c}1.{c}.{c}{c} {c}'{c}\n" for c in chars)
        expected = [p for p, _ in oracle.pre_tokenize_str(text)]
        got = nt.pre_tokenize(text)
        if got != expected:
            for c in chars:  # name the first code point that differs
                t = f"a{c}a1{c}1.{c}.{c}{c} {c}'{c}\n"
                if nt.pre_tokenize(t) != [p for p, _ in oracle.pre_tokenize_str(t)]:
                    pytest.fail(f"U+{ord(c):04X} splits differently: {nt.pre_tokenize(t)} vs HF "
                                f"{[p for p, _ in oracle.pre_tokenize_str(t)]}")
            pytest.fail(f"block U+{block:04X} splits differently")


def test_word_characters_for_single_word_tokens(pair):
    """single_word added tokens ("hello") next to each BMP code point and a sample of the astral ones."""
    name, hf, nt = pair
    if name != "cl100k_v600":
        pytest.skip("one tokenizer is enough")
    cps = [c for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF] + list(range(0x10000, 0x110000, 7))
    inputs = [f"{chr(c)}hello {chr(c)}" if c % 2 else f"x hello{chr(c)}" for c in cps]
    assert_same(inputs, [e.ids for e in hf.encode_batch(inputs)], nt.encode_batch(inputs), "encodings")


def test_one_megabyte_input(pair):
    name, hf, nt = pair
    rng = random.Random(11)
    parts = []
    while sum(len(p) for p in parts) < 1_000_000:
        r = rng.random()
        if r < 0.05:
            parts.append("x" * rng.randrange(1000, 60000))  # one long word: the heap merge path
        elif r < 0.08:
            parts.append("7" * rng.randrange(100, 5000) + " " * rng.randrange(1, 300) + "\n" * rng.randrange(1, 50))
        else:
            parts.append(cases.GENERATORS[rng.randrange(len(cases.GENERATORS))](rng))
    text = "".join(parts)
    t0 = time.perf_counter()
    got = nt.encode(text)
    elapsed = time.perf_counter() - t0
    expected = hf.encode(text).ids
    assert got == expected
    if not any(t in text for t in LOSSY):
        assert nt.decode(nt.encode(text, False), False) == text
    assert elapsed < 5.0, f"1 MB took {elapsed:.2f} s"


def test_long_single_words(pair):
    name, hf, nt = pair
    for text in ["ab" * 20000, "a" * 50001, "héllo" * 3000, "🙂" * 2000, " " * 5000 + "x", "1" * 9999]:
        assert nt.encode(text) == hf.encode(text).ids


def test_invalid_utf8_bytes(pair):
    name, hf, nt = pair
    for raw in cases.invalid_utf8_inputs(3000, seed=3):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            with pytest.raises(_native.Error, match=f"input is not valid UTF-8 at byte {e.start}$"):
                nt.encode(raw)
            with pytest.raises(_native.Error, match="not valid UTF-8"):
                nt.encode_batch([b"ok", raw])
        else:
            assert nt.encode(raw) == hf.encode(text).ids
    assert nt.encode(bytearray(b"hello")) == hf.encode("hello").ids


def test_lone_surrogates_are_rejected_like_hf(pair):
    name, hf, nt = pair
    for s in ["\ud800", "a\udfffb"]:
        with pytest.raises(Exception):
            hf.encode(s)
        with pytest.raises(UnicodeEncodeError):
            nt.encode(s)


def test_encode_batch_threads(pair):
    name, hf, nt = pair
    inputs = cases.generated_inputs(2000, seed=17, added_contents=added_contents(hf))
    single = [nt.encode(s) for s in inputs]
    for threads in (1, 2, 5):
        assert nt.encode_batch(inputs, True, threads) == single


# ------------------------------------------------------------------------- unsupported settings


def _mutated(base: str, edit) -> str:
    data = json.loads(base)
    edit(data)
    return json.dumps(data)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.__setitem__("normalizer", {"type": "NFC"}), "normalizer"),
    (lambda d: d["model"].__setitem__("type", "WordPiece"), "model.type"),
    (lambda d: d["model"].__setitem__("byte_fallback", True), "model.byte_fallback"),
    (lambda d: d["model"].__setitem__("dropout", 0.1), "model.dropout"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].__setitem__("Regex", r"\w+"), "pattern.Regex"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][1].__setitem__("add_prefix_space", True), "add_prefix_space"),
    (lambda d: d.__setitem__("decoder", {"type": "WordPiece"}), "decoder"),
    (lambda d: d.__setitem__("post_processor", {"type": "BertProcessing"}), "post_processor.type"),
    (lambda d: d["model"]["merges"].append("zzzq qqqz"), "missing from the vocab"),
])
def test_unsupported_tokenizer_json_is_rejected(demo_dir, edit, message):
    text = _mutated((demo_dir / "tokenizer.json").read_text(encoding="utf-8"), edit)
    with pytest.raises(_native.Error, match=message):
        _native.Tokenizer(text)


def test_malformed_json_is_rejected():
    with pytest.raises(_native.Error, match="tokenizer.json: invalid JSON"):
        _native.Tokenizer("{not json")


# ------------------------------------------------------------------------- transformers parity


def test_demo_tokenizer_loads_in_hf_and_transformers(demo_dir):
    from afs_build.demo_tokenizer import DEMO_VOCAB_SIZE, write_demo_tokenizer

    info = write_demo_tokenizer(demo_dir)
    assert info["vocab_size"] == DEMO_VOCAB_SIZE
    hf = hf_tokenizers.Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    assert hf.get_vocab_size() == info["vocab_size"]
    assert hf.token_to_id("<|endoftext|>") == info["bos_token_id"] == info["eos_token_id"]
    assert hf.token_to_id("<|pad|>") == info["pad_token_id"]
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(demo_dir))
    assert tok.eos_token_id == info["eos_token_id"] and tok.pad_token_id == info["pad_token_id"]
    assert tok("The lighthouse keeper's log, 1234567!").input_ids == hf.encode("The lighthouse keeper's log, 1234567!").ids
    # Deterministic: a second write gives identical files.
    first = (demo_dir / "tokenizer.json").read_bytes()
    write_demo_tokenizer(demo_dir)
    assert (demo_dir / "tokenizer.json").read_bytes() == first


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": True}, {"add_bos_token": True, "add_eos_token": True},
                                   {"add_eos_token": False}])
def test_builder_options_match_transformers(demo_dir, tmp_path, flags):
    """Native tokenizer + the builder's options == transformers AutoTokenizer on the same directory."""
    transformers = pytest.importorskip("transformers")
    from afs_build.tokenizer import load_tokenizer

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((demo_dir / "tokenizer.json").read_bytes())
    config = json.loads((demo_dir / "tokenizer_config.json").read_text())
    config.pop("add_bos_token"), config.pop("add_eos_token")
    config.update(flags)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    pack = load_tokenizer(d, None)
    nt = _native.Tokenizer(pack.tokenizer_json.decode(), json.dumps(pack.options))
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    for s in cases.generated_inputs(500, seed=23, added_contents=["<|endoftext|>", "<|user|>", "<|pad|>"]):
        assert nt.encode(s, True) == ref(s).input_ids, (flags, s)
        assert nt.encode(s, False) == ref(s, add_special_tokens=False).input_ids
        ids = nt.encode(s, False)
        assert nt.decode(ids, True) == ref.decode(ids, skip_special_tokens=True)


def test_add_bos_eos_options_override_post_processor(demo_dir):
    """Options add_bos/add_eos act like transformers' rebuilt TemplateProcessing("bos $A eos")."""
    text = (demo_dir / "tokenizer.json").read_text()
    hf = hf_tokenizers.Tokenizer.from_str(text)
    for bos, eos in ((True, False), (False, True), (True, True), (False, False)):
        single = ("<|endoftext|> " if bos else "") + "$A" + (" <|pad|>" if eos else "")
        hf.post_processor = hf_tokenizers.processors.TemplateProcessing(
            single=single, special_tokens=[("<|endoftext|>", 2491), ("<|pad|>", 2492)])
        options = {"bos_token_id": 2491, "eos_token_id": 2492, "add_bos_token": bos, "add_eos_token": eos}
        nt = _native.Tokenizer(text, json.dumps(options))
        for s in ["", "hi there", "<|endoftext|>x"]:
            assert nt.encode(s) == hf.encode(s).ids
            assert nt.encode(s, False) == hf.encode(s, add_special_tokens=False).ids
    with pytest.raises(_native.Error, match="bos_token_id is not"):
        _native.Tokenizer(text, json.dumps({"add_bos_token": True}))


def test_load_tokenizer_pack(demo_dir):
    from afs_build.tokenizer import load_tokenizer

    pack = load_tokenizer(demo_dir, {"eos_token_id": [2491, 2492]})
    assert pack.tokenizer_json == (demo_dir / "tokenizer.json").read_bytes()
    assert pack.options["eos_token_ids"] == [2491, 2492]
    assert pack.options["bos_token_id"] == 2491 and pack.options["pad_token_id"] == 2492
    assert pack.options["add_bos_token"] is None  # the PreTrainedTokenizerFast class ignores the flags
    assert pack.chat is not None and pack.chat["format"] == "afs-chat-v1"
    assert load_tokenizer(demo_dir, None, chat=False).chat is None


def test_load_tokenizer_errors_name_file_and_field(demo_dir, tmp_path):
    from afs_build.tokenizer import TokenizerError, load_tokenizer

    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path, None)
    d = tmp_path / "bad"
    d.mkdir()
    data = json.loads((demo_dir / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "NFKC"}
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=r"tokenizer.json: unsupported normalizer 'NFKC'"):
        load_tokenizer(d, None)
    data["normalizer"] = None
    (d / "tokenizer.json").write_text(json.dumps(data))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not a token"):
        load_tokenizer(d, None)
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": "yes"}))
    with pytest.raises(TokenizerError, match="add_bos_token must be true or false"):
        load_tokenizer(d, None)


def test_python_wrapper(demo_dir):
    from afs.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained_dir(demo_dir)
    hf = hf_tokenizers.Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    text = "Hello, world! Ünïcödé 😀 <|endoftext|>"
    assert tok.encode(text) == hf.encode(text).ids
    assert tok.decode(tok.encode(text)) == text
    stream = tok.stream()
    assert "".join(stream.step(i) for i in tok.encode(text)) + stream.flush() == text
    assert tok.eos_token_ids == [tok.eos_token_id]
    assert Tokenizer.from_file(demo_dir / "tokenizer.json").encode(text) == hf.encode(text).ids
    with pytest.raises(ValueError, match="at byte 1"):
        tok.encode(b"a\xff")
