"""The Python face of an engine: loads the engine's compiled nanobind module and wraps it.

Each engine directory holds its own module, python/_afs_engine_<spec hash>*.so, compiled for that
model. Modules are cached by spec hash, so two engines of one spec share code and engines of
different specs load side by side.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

_modules: dict[str, Any] = {}
_lock = threading.Lock()


class EngineError(ValueError):
    """An engine directory, engine file or request is invalid."""


def _load_module(engine_dir: Path, spec_hash: str):
    name = f"_afs_engine_{spec_hash}"
    with _lock:
        if name in _modules:
            return _modules[name]
        candidates = sorted((engine_dir / "python").glob(f"{name}*"))
        suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
        candidates = [c for c in candidates if c.name.endswith(suffixes)]
        if not candidates:
            raise EngineError(
                f"{engine_dir}: no engine module {name} for this Python "
                f"({', '.join(suffixes[:1])}); rebuild with afs-build using this interpreter"
            )
        spec = importlib.util.spec_from_file_location(name, candidates[0])
        if spec is None or spec.loader is None:
            raise EngineError(f"{candidates[0]}: cannot be imported")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _modules[name] = mod
        return mod


def _check_ids(ids: Sequence[int], what: str) -> list[int]:
    if isinstance(ids, (str, bytes)):
        raise EngineError(f"{what} must be a sequence of token ids, got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise EngineError(f"{what}[{i}] = {t!r} is not an integer token id")
        if not -(2**31) <= int(t) < 2**31:
            raise EngineError(f"{what}[{i}] = {t} is not a token id of this model")
        out.append(int(t))
    return out


class Engine:
    """A loaded engine. Thread-safe; one sequence runs at a time."""

    def __init__(self, engine_dir: str | Path, max_context: int = 0, threads: int = 0, cuda_graphs: bool = True) -> None:
        d = Path(engine_dir)
        manifest_path = d / "manifest.json"
        if not manifest_path.exists():
            raise EngineError(f"{d}: not an engine directory (no manifest.json); build one with afs-build")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            spec_hash = manifest["spec_hash"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise EngineError(f"{manifest_path}: unreadable manifest ({e})") from None
        if not isinstance(spec_hash, str) or not spec_hash.isalnum():
            raise EngineError(f"{manifest_path}: invalid spec_hash {spec_hash!r}")
        self.path = d
        self._mod = _load_module(d, spec_hash)
        try:
            self._engine = self._mod.Engine.load(str(d / "model.afs"), max_context, threads, cuda_graphs)
        except ValueError as e:
            raise EngineError(str(e)) from None
        self.manifest = json.loads(self._engine.manifest_json)
        self._tokenizer = None

    @property
    def vocab_size(self) -> int:
        return self._engine.vocab_size

    @property
    def max_context(self) -> int:
        return self._engine.max_context

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._engine.eos_token_ids)

    @property
    def backend(self) -> str:
        return self._engine.backend

    @property
    def random_weights(self) -> bool:
        return bool(self.manifest.get("source", {}).get("random_weights", False))

    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits at every position: float32 array of shape (len(token_ids), vocab)."""
        ids = _check_ids(token_ids, "token_ids")
        try:
            return self._engine.score(ids)
        except ValueError as e:
            raise EngineError(str(e)) from None

    # -- text --------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The engine's native tokenizer (afs.tokenizer.Tokenizer), with its compiled chat template."""
        if self._tokenizer is None:
            if not self._engine.has_tokenizer:
                raise EngineError(f"{self.path}: this engine has no tokenizer (the checkpoint had no tokenizer.json)")
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self._engine.tokenizer_json, self.manifest.get("tokenizer"),
                                        self.manifest.get("chat_template"))
        return self._tokenizer

    def _prompt_ids(self, prompt) -> tuple[list[int], bool]:
        """(token ids, prompt was text)."""
        if isinstance(prompt, str):
            try:
                return list(self._engine.encode_prompt(prompt)), True
            except ValueError as e:
                raise EngineError(str(e)) from None
        if isinstance(prompt, bytes):
            raise EngineError("prompt must be str (text) or a sequence of token ids, not bytes")
        return _check_ids(prompt, "prompt"), False

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[str],
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        *,
        min_p: float = 0.0,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
    ):
        """Generate a continuation.

        prompt: text (returns text), a list of texts (returns a list of texts), or token ids (returns
        token ids). Greedy when temperature == 0, seeded sampling otherwise. Generation stops at the
        model's EOS ids (unless ignore_eos), at stop_token_ids, and at any `stop` string, which is not
        included in the text (like OpenAI)."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            return [self.generate(p, max_tokens, temperature, top_k, top_p, seed, min_p=min_p, stop=stop,
                                  stop_token_ids=stop_token_ids, ignore_eos=ignore_eos) for p in prompt]
        ids, is_text = self._prompt_ids(prompt)
        args = self._sampling_args(max_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids, ignore_eos)
        stops = self._stops(stop)
        if not is_text:
            if stops:
                raise EngineError("stop strings need a text prompt; with token ids use stop_token_ids")
            return self._call(self._engine.generate, ids, *args)["tokens"]
        return self._call(self._engine.generate_text, ids, *args, stops)["text"]

    def generate_full(self, prompt, max_tokens=16, temperature=0.0, top_k=0, top_p=1.0, seed=0, *, min_p=0.0,
                      stop=None, stop_token_ids=(), ignore_eos=False) -> dict:
        """Like generate, returning a dict: tokens, finish_reason, prefill_seconds, decode_seconds
        (and text, prompt_tokens for a text prompt)."""
        ids, is_text = self._prompt_ids(prompt)
        args = self._sampling_args(max_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids, ignore_eos)
        if is_text:
            return self._call(self._engine.generate_text, ids, *args, self._stops(stop))
        if stop:
            raise EngineError("stop strings need a text prompt; with token ids use stop_token_ids")
        return self._call(self._engine.generate, ids, *args)

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 16, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, *, min_p: float = 0.0, stop: str | Sequence[str] | None = None,
               stop_token_ids: Sequence[int] = (), ignore_eos: bool = False) -> Iterator[str]:
        """Yield the generated text piece by piece as it is produced (never half a character).
        Closing the iterator early cancels the generation."""
        ids, _ = self._prompt_ids(prompt)
        self.tokenizer  # a clear error when there is none
        args = self._sampling_args(max_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids, ignore_eos)
        s = self._call(self._engine.stream_text, ids, *args, self._stops(stop))
        try:
            while True:
                piece = self._call(s.next)
                if piece is None:
                    return
                yield piece
        finally:
            s.cancel()

    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, *, min_p: float = 0.0,
             stop: str | Sequence[str] | None = None, stream: bool = False, ignore_eos: bool = False):
        """Answer a conversation ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat
        template. Returns the reply text, or an iterator of pieces with stream=True."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise EngineError("messages must be a list of {'role': ..., 'content': ...} dicts")
        pairs = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise EngineError(f"messages[{i}] must be a dict with string 'role' and 'content'")
            pairs.append((m["role"], m["content"]))
        ids = self._call(self._engine.encode_chat, pairs, True)
        if stream:
            return self.stream(list(ids), max_tokens, temperature, top_k, top_p, seed, min_p=min_p, stop=stop,
                               ignore_eos=ignore_eos)
        args = self._sampling_args(max_tokens, temperature, top_k, top_p, min_p, seed, (), ignore_eos)
        return self._call(self._engine.generate_text, list(ids), *args, self._stops(stop))["text"]

    @staticmethod
    def _call(fn, *args):
        try:
            return fn(*args)
        except ValueError as e:
            raise EngineError(str(e)) from None

    @staticmethod
    def _stops(stop) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else list(stop)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise EngineError(f"stop must be a non-empty string or a list of them, got {s!r}")
        return stops

    @staticmethod
    def _sampling_args(max_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids, ignore_eos) -> tuple:
        stops = _check_ids(stop_token_ids, "stop_token_ids")
        for name, v in (("max_tokens", max_tokens), ("top_k", top_k), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise EngineError(f"{name} must be an integer, got {v!r}")
        if not 1 <= max_tokens < 2**31:
            raise EngineError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 0 <= seed < 2**64:
            raise EngineError(f"seed must be in [0, 2**64), got {seed}")
        if not 0 <= top_k < 2**31:
            raise EngineError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise EngineError(f"{name} must be a number, got {v!r}")
        return (int(max_tokens), float(temperature), int(top_k), float(top_p), float(min_p), int(seed), stops,
                bool(ignore_eos))

    def bench(self, prompt_tokens: int = 128, gen_tokens: int = 64, warmup: int = 1) -> dict:
        try:
            return self._engine.bench(prompt_tokens, gen_tokens, warmup)
        except ValueError as e:
            raise EngineError(str(e)) from None

    def __repr__(self) -> str:
        return f"afs.Engine({str(self.path)!r}, backend={self.backend}, vocab={self.vocab_size})"


def load(engine_dir: str | Path, max_context: int = 0, threads: int = 0, cuda_graphs: bool = True) -> Engine:
    """Load an engine directory built by afs-build.

    max_context: context limit in tokens (0: the model's); threads: CPU threads (0: all);
    cuda_graphs: replay CUDA decode steps as graphs (False: eager launches, for debugging)."""
    return Engine(engine_dir, max_context=max_context, threads=threads, cuda_graphs=cuda_graphs)
