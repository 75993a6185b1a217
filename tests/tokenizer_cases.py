"""Tokenizer fixtures and generated inputs for the differential tests against HF tokenizers.

Tokenizers are trained here, at test time, with HF `tokenizers` and OLMo 2's pre-tokenizer, special
tokens and decoder, plus added tokens that exercise every AddedToken flag. Inputs come from seeded
generators, so a failure reproduces from its (generator, seed) pair.
"""

from __future__ import annotations

import json
import random

from afs_build.demo_corpus import DEMO_CORPUS
from afs_build.demo_tokenizer import OLMO2_SPLIT_REGEX

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Words from many scripts (with combining marks, digits and emoji) so that merges cover non-ASCII.
MULTILINGUAL_WORDS = (
    "Привет мир как дела хорошо спасибо пожалуйста москва книга "
    "你好 世界 我们 今天 天气 很好 中国 北京 学习 语言 模型 "
    "こんにちは ありがとう 東京 日本語 カタカナ ひらがな "
    "안녕하세요 감사합니다 서울 한국어 "
    "مرحبا بالعالم شكرا كتاب اللغة العربية "
    "שלום עולם תודה "
    "नमस्ते दुनिया धन्यवाद हिन्दी भाषा "
    "สวัสดี ขอบคุณ ภาษาไทย "
    "Ελληνικά καλημέρα ευχαριστώ "
    "café naïve résumé façade Zürich São Paulo Ångström coöperate "
    "٠١٢٣٤٥٦٧٨٩ १२३४ １２３ ⅠⅡⅢ ½ ¾ "
    "😀 😂 👍 👍🏽 🇺🇸 👨‍👩‍👧‍👦 ❤️ 🎉 🚀 "
)


def training_corpus() -> list[str]:
    rng = random.Random(1234)
    words = MULTILINGUAL_WORDS.split()
    lines = DEMO_CORPUS.splitlines()
    extra = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    return lines * 3 + extra


def train_hf_tokenizer(vocab_size: int, *, pattern: str = "cl100k", ignore_merges: bool = False,
                       post_processor: str = "bytelevel", merges_as_strings: bool = False) -> str:
    """Trains a byte-level BPE with HF tokenizers; returns the tokenizer.json text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if pattern == "cl100k":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(OLMO2_SPLIT_REGEX), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer)
    # Added tokens with every flag: normalized and not, special and not, lstrip/rstrip, single_word,
    # multi-byte content, content that already is a vocab token, content that is not byte-level.
    tok.add_special_tokens([AddedToken("[MASK]", lstrip=True, rstrip=True, special=True, normalized=False)])
    tok.add_tokens([
        AddedToken("<|user|>", normalized=True, special=False),
        AddedToken("<|assistant|>", normalized=False, special=False),
        AddedToken("hello", single_word=True, normalized=False, special=False),
        AddedToken("日本", normalized=True, special=False),
        AddedToken("Ġthe", normalized=False, special=False),
        AddedToken(" spaced ", normalized=False, special=False),
        AddedToken("<tab>", lstrip=True, normalized=True, special=False),
    ])
    if post_processor == "template":
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A <|pad|>", special_tokens=[("<|endoftext|>", 0), ("<|pad|>", 1)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    text = tok.to_str()
    if merges_as_strings:
        data = json.loads(text)
        data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
        text = json.dumps(data, ensure_ascii=False)
    return text


# ------------------------------------------------------------------------------------- inputs

WHITESPACE = [" ", " ", " ", "\t", "\n", "\n", "\r", "\r\n", "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c",
              "\x85", "\u2009", "\u200b", "\ufeff", "\u1680"]
PUNCT = list(".,;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~`") + ["...", "--", "—", "“", "”", "«", "»", "¿", "¡", "…"]
DIGITS = "0123456789" * 3 + "٠١٢٣٤٥٦٧٨٩" + "०१२३४५६७८९" + "０１２３４５６７８９" + "²³¹½¼ⅠⅫ①⑩"
COMBINING = [chr(c) for c in range(0x300, 0x370)] + ["\u0e31", "\u093f", "\u0951", "\u20dd", "\ufe0f", "\u200d"]
EMOJI = ["😀", "👍", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸", "🇯🇵", "❤️", "☺︎", "🧑🏿‍🚀", "#️⃣", "🫠", "🦄", "\U0001faf8"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]


def _random_codepoint(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        cp = rng.randrange(0x20, 0x7F)
    elif r < 0.45:
        cp = rng.randrange(0x00, 0x20)
    elif r < 0.60:
        cp = rng.randrange(0x80, 0x800)
    elif r < 0.85:
        cp = rng.randrange(0x800, 0x10000)
    elif r < 0.95:
        cp = rng.randrange(0x10000, 0x30000)
    else:
        cp = rng.randrange(0x30000, 0x110000)
    if 0xD800 <= cp <= 0xDFFF:
        cp = 0xFFFD
    return chr(cp)


def gen_random_unicode(rng):
    return "".join(_random_codepoint(rng) for _ in range(rng.randrange(0, 40)))


def gen_whitespace(rng):
    parts = []
    for _ in range(rng.randrange(1, 12)):
        r = rng.random()
        if r < 0.5:
            parts.append("".join(rng.choice(WHITESPACE) for _ in range(rng.randrange(1, 6))))
        elif r < 0.75:
            parts.append(rng.choice(["a", "word", "Über", "日本", "x1", "42", "é"]))
        else:
            parts.append(rng.choice(PUNCT))
    return "".join(parts)


def gen_digits(rng):
    parts = []
    for _ in range(rng.randrange(1, 8)):
        parts.append("".join(rng.choice(DIGITS) for _ in range(rng.randrange(1, 12))))
        parts.append(rng.choice(["", " ", ".", ",", "-", "a", " $", "%", "\n", "x"]))
    return "".join(parts)


def gen_contractions(rng):
    parts = []
    for _ in range(rng.randrange(1, 10)):
        c = rng.choice(CONTRACTIONS + ["'", "'ſ", "’s", "'x"])
        c = "".join(ch.upper() if rng.random() < 0.4 else ch for ch in c)
        parts.append(rng.choice(["", "I", "we", "THEY", " ", "don", "1", "!", "\n", "é"]) + c)
        parts.append(rng.choice(["", " ", "a", "re", "\n", ".", "'"]))
    return "".join(parts)


def gen_emoji(rng):
    parts = []
    for _ in range(rng.randrange(1, 10)):
        parts.append(rng.choice(EMOJI + [" ", "a", "!", "\u200d", "\ufe0f", "🏽", "  "]))
    return "".join(parts)


def gen_multilingual(rng):
    words = MULTILINGUAL_WORDS.split()
    return rng.choice(["", " "]).join(
        rng.choice(words) + rng.choice(["", "", " ", ",", "。", "\n", "!"]) for _ in range(rng.randrange(1, 10)))


def gen_combining(rng):
    parts = []
    for _ in range(rng.randrange(1, 10)):
        base = rng.choice(["a", "e", "Z", " ", "1", "क", "ก", "!", "\n", ""])
        parts.append(base + "".join(rng.choice(COMBINING) for _ in range(rng.randrange(0, 4))))
    return "".join(parts)


def gen_english(rng):
    words = DEMO_CORPUS.split()
    start = rng.randrange(0, len(words) - 30)
    seg = words[start:start + rng.randrange(1, 30)]
    seps = [" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n"]
    return "".join(w + rng.choice(seps) for w in seg)


def make_gen_specials(added_contents: list[str]):
    def gen_specials(rng):
        parts = []
        for _ in range(rng.randrange(1, 10)):
            r = rng.random()
            if r < 0.4:
                parts.append(rng.choice(added_contents))
            elif r < 0.6:
                parts.append(rng.choice(WHITESPACE[:8]) * rng.randrange(1, 3))
            elif r < 0.8:
                parts.append(rng.choice(["hello", "hellohello", "a", "日本語", "x_", "_", "é", "the", "Ġthe"]))
            else:
                parts.append(rng.choice(PUNCT))
        return "".join(parts)
    return gen_specials


def gen_mutated(rng):
    s = list(gen_english(rng))
    for _ in range(rng.randrange(1, 6)):
        s.insert(rng.randrange(0, len(s) + 1), _random_codepoint(rng))
    return "".join(s)


GENERATORS = [gen_random_unicode, gen_whitespace, gen_digits, gen_contractions, gen_emoji, gen_multilingual,
              gen_combining, gen_english, gen_mutated]


def generated_inputs(n: int, seed: int, added_contents: list[str]) -> list[str]:
    rng = random.Random(seed)
    gens = GENERATORS + [make_gen_specials(added_contents)] * 2
    return [gens[i % len(gens)](rng) for i in range(n)]


def invalid_utf8_inputs(n: int, seed: int) -> list[bytes]:
    """Byte strings that mostly are not UTF-8: truncations, stray continuation bytes, overlongs,
    surrogates, values past U+10FFFF, all spliced into valid text."""
    rng = random.Random(seed)
    bad = [b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
           b"\xf5", b"\xff", b"\xe2\x82", b"\xf0\x9f\x98", b"\xc3", b"\xf8\x88\x80\x80\x80", b"\xfe\xff"]
    out = []
    for _ in range(n):
        text = gen_english(rng).encode() if rng.random() < 0.5 else gen_random_unicode(rng).encode()
        k = rng.randrange(0, len(text) + 1)
        out.append(text[:k] + rng.choice(bad) + text[k:])
    return out
