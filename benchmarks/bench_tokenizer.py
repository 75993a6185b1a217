"""Encode throughput of the native tokenizer (afs._native) against HF tokenizers, in the same run.

    python benchmarks/bench_tokenizer.py                 # single-threaded: both sides on one thread
    python benchmarks/bench_tokenizer.py --threads 0     # batch on every core (HF via rayon, afs via threads)

The tokenizer is an OLMo-2-style byte-level BPE trained here with HF tokenizers (--vocab, default
32000) on a generated corpus; texts are English-like and multilingual. Before timing, every encoding
is checked against HF (correctness before speed). Reports MB/s and the afs/HF ratio for one long
string and for a batch of lines.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path


def make_corpus(seed: int, n_chars: int, multilingual: bool) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from afs_build.demo_corpus import DEMO_CORPUS
    from tokenizer_cases import MULTILINGUAL_WORDS

    rng = random.Random(seed)
    english = DEMO_CORPUS.split()
    syllables = ["ka", "lo", "mi", "ter", "ban", "quo", "stre", "ing", "tion", "al", "en", "ur", "pha", "dex"]
    foreign = MULTILINGUAL_WORDS.split()
    out, size = [], 0
    while size < n_chars:
        r = rng.random()
        if multilingual and r < 0.5:
            w = rng.choice(foreign)
        elif r < 0.8:
            w = rng.choice(english)
        elif r < 0.95:
            w = "".join(rng.choice(syllables) for _ in range(rng.randrange(1, 5)))
        else:
            w = str(rng.randrange(0, 100000))
        sep = rng.choice([" "] * 12 + ["\n", ", ", ". ", "  ", "\n\n"])
        out.append(w + sep)
        size += len(w) + len(sep)
    return "".join(out)


def train(vocab_size: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from afs_build.demo_tokenizer import OLMO2_SPLIT_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(OLMO2_SPLIT_REGEX), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [make_corpus(s, 200_000, multilingual=s % 2 == 1) for s in range(12)]
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="1: single-threaded (default); 0: every core")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--mb", type=float, default=2.0, help="megabytes of text per workload")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.threads == 1:  # must be set before HF tokenizers starts its thread pool
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ.pop("RAYON_NUM_THREADS", None)
        os.environ["TOKENIZERS_PARALLELISM"] = "true"

    import tokenizers

    from afs import _native

    text_json = train(args.vocab)
    hf = tokenizers.Tokenizer.from_str(text_json)
    nt = _native.Tokenizer(text_json)
    n = int(args.mb * 1_000_000)
    print(f"vocab {hf.get_vocab_size()}, {args.mb} MB per workload, threads={args.threads or os.cpu_count()}, "
          f"HF tokenizers {tokenizers.__version__}")
    print(f"{'workload':<34}{'HF MB/s':>10}{'afs MB/s':>10}{'afs/HF':>8}")
    for kind in ("english", "multilingual"):
        text = make_corpus(100, n, multilingual=kind == "multilingual")
        lines = text.splitlines(keepends=True)
        mb = len(text.encode()) / 1e6
        # Correctness before speed.
        assert nt.encode(text) == hf.encode(text).ids, f"{kind}: single-string encodings differ"
        assert nt.encode_batch(lines, True, args.threads) == [e.ids for e in hf.encode_batch(lines)], kind
        t_hf = best_of(lambda: hf.encode(text), args.repeats)
        t_nt = best_of(lambda: nt.encode(text), args.repeats)
        print(f"{kind + ' single string':<34}{mb / t_hf:>10.1f}{mb / t_nt:>10.1f}{t_hf / t_nt:>8.2f}")
        t_hf = best_of(lambda: hf.encode_batch(lines), args.repeats)
        t_nt = best_of(lambda: nt.encode_batch(lines, True, args.threads), args.repeats)
        print(f"{kind + f' batch ({len(lines)} lines)':<34}{mb / t_hf:>10.1f}{mb / t_nt:>10.1f}{t_hf / t_nt:>8.2f}")


if __name__ == "__main__":
    main()
