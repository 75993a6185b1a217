"""afs.Tokenizer: the engine's native byte-level BPE tokenizer, usable on its own.

    tok = afs.tokenizer.Tokenizer.from_pretrained_dir("path/to/OLMo-2-1124-7B-Instruct")
    ids = tok.encode("Hello world")
    text = tok.decode(ids)
    stream = tok.stream()                     # incremental detokenizer
    pieces = [stream.step(i) for i in ids] + [stream.flush()]
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

Encoding and decoding agree with Hugging Face `tokenizers` on every input (tests/test_tokenizer.py);
the options (bos/eos ids, add_bos/add_eos) follow tokenizer_config.json as transformers reads it.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from . import _native
from .chat import CompiledChat

Error = _native.Error
# Cuts streamed text before the first stop string (not included), holding back a tail that may still
# grow into one: push(text) -> final text, finish() -> the rest, stopped. The engine's own rule.
StopStrings = _native.StopStrings


class StreamDecoder:
    """Feed ids one at a time; step() returns only complete characters; flush() returns the rest."""

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = False):
        self._dec = _native.StreamDecoder(tokenizer._native, skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._dec.step(token_id)

    def flush(self) -> str:
        return self._dec.flush()


class Tokenizer:
    def __init__(self, tokenizer_json: str | bytes, options: Mapping | None = None, chat: Mapping | None = None):
        if isinstance(tokenizer_json, bytes):
            tokenizer_json = tokenizer_json.decode("utf-8")
        self.options = dict(options or {})
        self._native = _native.Tokenizer(tokenizer_json, json.dumps(self.options))
        self.chat = CompiledChat(chat) if chat else None
        self._native_chat = _native.ChatTemplate(json.dumps(chat)) if chat else None

    @classmethod
    def from_file(cls, path: str | PathLike, options: Mapping | None = None) -> "Tokenizer":
        """From a tokenizer.json file alone (HF tokenizers' Tokenizer.from_file behaviour)."""
        return cls(Path(path).read_text(encoding="utf-8"), options)

    @classmethod
    def from_pretrained_dir(cls, directory: str | PathLike, generation_config: Mapping | None = None,
                            chat: bool = True) -> "Tokenizer":
        """From a checkpoint directory: tokenizer.json plus tokenizer_config.json (special tokens, flags,
        chat template) and generation_config.json (stop ids), as afs-build reads them."""
        from afs_build.tokenizer import load_tokenizer

        directory = Path(directory)
        if generation_config is None and (directory / "generation_config.json").is_file():
            generation_config = json.loads((directory / "generation_config.json").read_text(encoding="utf-8"))
        pack = load_tokenizer(directory, dict(generation_config) if generation_config else None, chat=chat)
        return cls(pack.tokenizer_json, pack.options, pack.chat)

    # -- encoding / decoding ---------------------------------------------------------------------

    def encode(self, text: str | bytes, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Bytes must be UTF-8 (afs.tokenizer.Error names the first bad byte)."""
        return self._native.encode(text, add_special_tokens)

    def encode_batch(self, texts: Sequence[str | bytes], add_special_tokens: bool = True,
                     num_threads: int = 0) -> list[list[int]]:
        return self._native.encode_batch(texts, add_special_tokens, num_threads)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._native.decode(list(ids), skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._native.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._native.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a byte-level token may hold part of a UTF-8 character)."""
        return self._native.token_bytes(token_id)

    @property
    def vocab_size(self) -> int:
        """Distinct tokens, added tokens included (HF get_vocab_size())."""
        return self._native.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self.options.get("bos_token_id")

    @property
    def eos_token_id(self) -> int | None:
        return self.options.get("eos_token_id")

    @property
    def pad_token_id(self) -> int | None:
        return self.options.get("pad_token_id")

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.options.get("eos_token_ids") or [])

    # -- chat ------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        """The prompt for `messages`, with the checkpoint's compiled chat template (as the engine
        applies it). Token ids by default, the text with tokenize=False."""
        if self._native_chat is None:
            raise ValueError("this tokenizer has no chat template")
        text = self._native_chat.apply(list(messages), add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text
