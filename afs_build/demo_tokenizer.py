"""A small OLMo-2-format tokenizer for the demo model and for tests, trained here in pure Python.

write_demo_tokenizer(directory) writes tokenizer.json and tokenizer_config.json with the structure of
OLMo 2's (cl100k Split pre-tokenizer + ByteLevel, ByteLevel decoder and post-processor, BPE with
byte-level symbols) and an OLMo-2-Instruct chat template. The BPE is trained on afs_build.demo_corpus
with no tokenizer library, deterministically: the same files come out on every machine.

Vocabulary (DEMO_VOCAB_SIZE = 2496 ids, a multiple of 64, so the demo embedding has exactly that many
rows): ids 0-255 are the 256 byte symbols (id = byte value), then the merged tokens in merge order,
then the added tokens <|endoftext|> (bos and eos), <|pad|>, and the non-special chat markers
<|system|>, <|user|>, <|assistant|>.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

from .demo_corpus import DEMO_CORPUS

DEMO_VOCAB_SIZE = 2496

# The exact regex string of OLMo 2's tokenizer.json (cl100k, as HF writes it).
OLMO2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]
CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>"]

# OLMo 2 Instruct's chat template (Tulu 3 style).
OLMO2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)

_WHITE_SPACE = set(range(0x09, 0x0E)) | {0x20, 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000} | set(
    range(0x2000, 0x200B))


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (index = byte value)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = [], 256
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(extra))
            extra += 1
    return table


def _cls(ch: str) -> str:
    if ord(ch) in _WHITE_SPACE:
        return "S"
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "O"


def pre_tokenize(text: str) -> list[str]:
    """The OLMo 2 (cl100k) split in plain Python; ample for training on the demo corpus."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        j = i + 1
        if c == "'" and i + 1 < n and text[i + 1].lower() in "stmd":
            j = i + 2
        elif c == "'" and text[i + 1:i + 3].lower() in ("re", "ve", "ll"):
            j = i + 3
        elif _cls(c) == "L" or (c not in "\r\n" and _cls(c) in "OS" and i + 1 < n and _cls(text[i + 1]) == "L"):
            j = i + 1
            while j < n and _cls(text[j]) == "L":
                j += 1
        elif _cls(c) == "N":
            while j < n and j - i < 3 and _cls(text[j]) == "N":
                j += 1
        elif _cls(c) == "O" or (c == " " and i + 1 < n and _cls(text[i + 1]) == "O"):
            j = i + 1 if _cls(c) == "O" else i + 2
            while j < n and _cls(text[j]) == "O":
                j += 1
            while j < n and text[j] in "\r\n":
                j += 1
        else:  # whitespace run
            k = i
            while k < n and _cls(text[k]) == "S":
                k += 1
            last_nl = max((p for p in range(i, k) if text[p] in "\r\n"), default=-1)
            if last_nl >= 0:
                j = last_nl + 1
            elif k == n or k - i == 1:
                j = k
            else:
                j = k - 1
        out.append(text[i:j])
        i = j
    return out


def train_bpe(text: str, vocab_size: int, n_added: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-level BPE: merge the most frequent adjacent pair (ties: smallest pair) until the vocab
    (256 byte symbols + merged tokens + n_added) reaches vocab_size."""
    b2u = bytes_to_unicode()
    word_counts = Counter(pre_tokenize(text))
    words = [[b2u[b] for b in w.encode("utf-8")] for w in word_counts]
    freqs = list(word_counts.values())
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, syms in enumerate(words):
        for a, b in zip(syms, syms[1:]):
            pair_counts[(a, b)] += freqs[wi]
            where[(a, b)].add(wi)
    vocab = list(b2u)
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    while len(vocab) + n_added < vocab_size:
        live = [(c, p) for p, c in pair_counts.items() if c > 0]
        if not live:
            raise RuntimeError(f"the demo corpus supports only {len(vocab)} tokens, fewer than {vocab_size - n_added}")
        best_count = max(c for c, _ in live)
        pair = min(p for c, p in live if c == best_count)
        merges.append(pair)
        new = pair[0] + pair[1]
        if new not in known:
            known.add(new)
            vocab.append(new)
        for wi in list(where[pair]):
            syms = words[wi]
            f = freqs[wi]
            for a, b in zip(syms, syms[1:]):
                pair_counts[(a, b)] -= f
            merged, k = [], 0
            while k < len(syms):
                if k + 1 < len(syms) and (syms[k], syms[k + 1]) == pair:
                    merged.append(new)
                    k += 2
                else:
                    merged.append(syms[k])
                    k += 1
            words[wi] = merged
            for a, b in zip(merged, merged[1:]):
                pair_counts[(a, b)] += f
                where[(a, b)].add(wi)
        del pair_counts[pair]
    return vocab, merges


def demo_tokenizer_json(vocab: list[str], merges: list[tuple[str, str]]) -> dict:
    added = []
    for k, content in enumerate(SPECIAL_TOKENS + CHAT_MARKERS):
        special = content in SPECIAL_TOKENS
        added.append({"id": len(vocab) + k, "content": content, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": not special, "special": special})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": OLMO2_SPLIT_REGEX}, "behavior": "Removed", "invert": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(vocab)},
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


def write_demo_tokenizer(directory: Path) -> dict:
    """Writes tokenizer.json and tokenizer_config.json into `directory`; returns the special ids."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n_added = len(SPECIAL_TOKENS) + len(CHAT_MARKERS)
    vocab, merges = train_bpe(DEMO_CORPUS, DEMO_VOCAB_SIZE, n_added)
    tj = demo_tokenizer_json(vocab, merges)
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in tj["added_tokens"]
        },
        "bos_token": "<|endoftext|>",
        "chat_template": OLMO2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 4096,
        "pad_token": "<|pad|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>",
    }
    (directory / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                     encoding="utf-8")
    return {
        "vocab_size": len(vocab) + n_added,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|pad|>"],
    }
