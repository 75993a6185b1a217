"""Writes the fuzzers' fixed data files and (with --seeds) their checked-in seed corpus.

    python fuzz/make_corpus.py --data fuzz/build/data          # what fuzz/run.sh does
    python fuzz/make_corpus.py --seeds                         # rewrite fuzz/corpus/*/seed-*

Data files: the demo model's tokenizer.json, its manifest options and compiled chat template
(afs_build makes them with no network), and a small tokenizer.json cut down from the demo one.
Seeds are small, deterministic inputs in each harness's input format; crashes found later are
added next to them by hand (fuzz/README.md).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]

from afs_build.demo_tokenizer import write_demo_tokenizer  # noqa: E402
from afs_build.engine_format import ALIGN, HEADER_BYTES, manifest_bytes, pack_header  # noqa: E402


def demo_files() -> tuple[str, dict, dict]:
    """(tokenizer.json text, manifest tokenizer options, compiled chat template)."""
    from afs_build.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as d:
        write_demo_tokenizer(Path(d))
        pack = load_tokenizer(Path(d), None)
        return pack.tokenizer_json.decode("utf-8"), pack.options, pack.chat


def small_tokenizer(demo_json: str, n_merges: int = 48) -> str:
    """The demo tokenizer cut to the 256 byte symbols, its first merges and the added tokens."""
    d = json.loads(demo_json)
    merges = d["model"]["merges"][:n_merges]
    keep = 256 + n_merges
    d["model"]["vocab"] = {t: i for t, i in d["model"]["vocab"].items() if i < keep}
    d["model"]["merges"] = merges
    for k, a in enumerate(d["added_tokens"]):
        a["id"] = keep + k
    return json.dumps(d, ensure_ascii=False)


def write_data(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok, options, chat = demo_files()
    (out / "tokenizer.json").write_text(tok, encoding="utf-8")
    (out / "options.json").write_text(json.dumps(options), encoding="utf-8")
    (out / "chat.json").write_text(json.dumps(chat), encoding="utf-8")
    (out / "small_tokenizer.json").write_text(small_tokenizer(tok), encoding="utf-8")


def _tensor(name: str, dtype: str, shape: list[int], offset: int) -> dict:
    size = {"f32": 4, "bf16": 2, "f16": 2, "u8": 1}[dtype]
    for s in shape:
        size *= s
    return {"name": name, "dtype": dtype, "shape": shape, "layout": "row_major", "offset": offset,
            "bytes": size, "crc32": "00000000"}


def engine_manifests(tok_json: str, options: dict, chat: dict) -> dict[str, bytes]:
    base = {"afs_version": "0.1.0", "spec_hash": "0123456789abcdef", "spec": {}, "source": {"model": "seed"},
            "generation": {"eos_token_ids": [3], "bos_token_id": None, "pad_token_id": 1}}
    tables = {
        "two-tensors": [_tensor("embed", "f32", [16, 32], 0), _tensor("final_norm", "f32", [32], 4096)],
        "mixed-dtypes": [_tensor("a", "bf16", [8, 8], 0), _tensor("b", "f16", [4], 4096), _tensor("c", "u8", [100], 8192),
                         _tensor("scalar", "f32", [], 12288), _tensor("empty", "f32", [0, 7], 16384)],
        "tokenizer-blob": [_tensor("tokenizer.json", "u8", [len(tok_json.encode())], 0)],
    }
    out = {}
    for name, table in tables.items():
        m = dict(base, tensors=table)
        if name == "tokenizer-blob":
            m |= {"tokenizer": options, "chat_template": chat}
        out[name] = manifest_bytes(m)
    return out


def write_seeds() -> None:
    corpus = ROOT / "fuzz" / "corpus"
    tok, options, chat = demo_files()
    small = small_tokenizer(tok)
    seeds: dict[str, dict[str, bytes]] = {t: {} for t in ("engine_file", "json", "tokenizer", "tokenizer_json")}

    # engine_file: mode byte + payload (see engine_file_fuzzer.cpp).
    manifests = engine_manifests(small, options, chat)
    for name, m in manifests.items():
        pages = 2 if name == "tokenizer-blob" else 5
        seeds["engine_file"][f"manifest-{name}"] = bytes([2 + 3 * pages]) + m
    m = manifests["two-tensors"]
    d_off = (HEADER_BYTES + len(m) + ALIGN - 1) // ALIGN * ALIGN
    whole = pack_header(m, d_off, d_off + 2 * ALIGN) + m
    whole += b"\0" * (d_off + 2 * ALIGN - len(whole))
    seeds["engine_file"]["file-raw"] = b"\0" + whole[: d_off + 64]  # truncated: the size check fires
    seeds["engine_file"]["file-fixed-crc"] = b"\1" + whole[:HEADER_BYTES] + m
    seeds["engine_file"]["header-only"] = b"\0" + whole[:HEADER_BYTES]

    # json
    seeds["json"] |= {
        "manifest": manifests["two-tensors"],
        "options": json.dumps(options).encode(),
        "chat": json.dumps(chat).encode(),
        "escapes": '{"a": "\\u00e9\\ud83d\\ude00\\n\\t\\"\\\\\\/", "b": [1, -0, 1.5e-3, 1E+2, true, false, null]}'.encode(),
        "messages": json.dumps([{"role": "user", "content": "hi"}]).encode(),
    }

    # tokenizer: flags byte + text (or ids).
    texts = ["The quick brown fox", "Hello, world!\n\nWhat's up?", "naïve café 日本語 😀", "  leading spaces\t\r\n",
             "<|endoftext|><|user|>\nhi<|assistant|>", "x", "it's 1234567 don't", "\x00 nul and \x7f"]
    for i, t in enumerate(texts):
        seeds["tokenizer"][f"text-{i}"] = bytes([i & 3]) + t.encode()
    seeds["tokenizer"]["invalid-utf8"] = b"\x00ab\xff\xc3(\xe2\x82"
    seeds["tokenizer"]["ids"] = bytes([4]) + struct.pack("<8i", 256, 257, 0xC3, 0xA9, 2491, -1, 1 << 30, 2495)

    # tokenizer_json
    seeds["tokenizer_json"] |= {
        "small-tokenizer": small.encode(),
        "options": json.dumps(options).encode(),
        "chat": json.dumps(chat).encode(),
    }

    for target, files in seeds.items():
        d = corpus / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / f"seed-{name}").write_bytes(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="write the fixed data files here")
    ap.add_argument("--seeds", action="store_true", help="rewrite the checked-in seed corpus")
    args = ap.parse_args()
    if args.data:
        write_data(args.data)
    if args.seeds:
        write_seeds()


if __name__ == "__main__":
    main()
