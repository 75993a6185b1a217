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
from typing import Any, Sequence

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

    def generate(
        self,
        token_ids: Sequence[int],
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        *,
        min_p: float = 0.0,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
    ) -> list[int]:
        """Generated token ids (greedy when temperature == 0; seeded sampling otherwise)."""
        return self.generate_full(token_ids, max_tokens, temperature, top_k, top_p, seed, min_p=min_p,
                                  stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)["tokens"]

    def generate_full(self, token_ids, max_tokens=16, temperature=0.0, top_k=0, top_p=1.0, seed=0, *, min_p=0.0,
                      stop_token_ids=(), ignore_eos=False) -> dict:
        """Like generate, returning {"tokens", "finish_reason", "prefill_seconds", "decode_seconds"}."""
        ids = _check_ids(token_ids, "token_ids")
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
        try:
            return self._engine.generate(ids, int(max_tokens), float(temperature), int(top_k), float(top_p),
                                         float(min_p), int(seed), stops, bool(ignore_eos))
        except ValueError as e:
            raise EngineError(str(e)) from None

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
