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
from typing import Any, AsyncIterator, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .sampling import SamplingParams, TokenLogprobs, TokenOutput

MAX_LOGPROBS = 20  # SamplingParams.logprobs: most top tokens reported per token (the engine's limit)
KV_CACHE_DTYPES = ("auto", "fp8")  # load(kv_cache_dtype=...)

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
    # The common case, a list of Python ints, is checked in C loops (a 2048-token prompt: ~0.15 ms
    # instead of ~0.8 with the per-element loop below, which finds and names a bad element).
    if type(ids) is list and set(map(type, ids)) <= {int} and (not ids or (min(ids) >= -(2**31) and max(ids) < 2**31)):
        return ids
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise EngineError(f"{what} must be a sequence of token ids, got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise EngineError(f"{what}[{i}] = {t!r} is not an integer token id")
        if not -(2**31) <= int(t) < 2**31:
            raise EngineError(f"{what}[{i}] = {t} is not a token id of this model")
        out.append(int(t))
    return out


def _check_text(text: str, what: str) -> str:
    """Text the engine can take: a str that encodes to UTF-8 (no lone surrogates). NUL and other
    control characters are ordinary text, as in HF tokenizers."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EngineError(f"{what} is not valid Unicode text: lone surrogate {text[e.start]!r} at index {e.start}") from None
    return text


def _check_int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise EngineError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise EngineError(f"{name} must be in [{lo}, {hi}], got {value}")
    return int(value)


class Engine:
    """A loaded engine. Thread-safe; concurrent requests run as one continuous batch."""

    def __init__(self, engine_dir: str | Path, max_context: int = 0, threads: int = 0, cuda_graphs: bool = True,
                 kv_blocks: int = 0, kv_block_size: int = 16, max_batch_tokens: int = 0,
                 gpu_memory_fraction: float = 0.9, kv_cache_dtype: str = "auto") -> None:
        d = Path(engine_dir)
        manifest_path = d / "manifest.json"
        if not manifest_path.exists():
            raise EngineError(f"{d}: not an engine directory (no manifest.json); build one with afs-build")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            spec_hash = manifest["spec_hash"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError, OSError) as e:
            raise EngineError(f"{manifest_path}: unreadable manifest ({type(e).__name__}: {e})") from None
        if not isinstance(spec_hash, str) or not (spec_hash.isascii() and spec_hash.isalnum()):
            raise EngineError(f"{manifest_path}: invalid spec_hash {spec_hash!r}")
        max_context = _check_int(max_context, "max_context", 0, 2**31 - 1)
        threads = _check_int(threads, "threads", 0, 4096)
        kv_blocks = _check_int(kv_blocks, "kv_blocks", 0, 2**31 - 1)
        kv_block_size = _check_int(kv_block_size, "kv_block_size", 1, 2**31 - 1)
        max_batch_tokens = _check_int(max_batch_tokens, "max_batch_tokens", 0, 2**31 - 1)
        if (isinstance(gpu_memory_fraction, bool) or not isinstance(gpu_memory_fraction, (int, float))
                or not 0.0 < gpu_memory_fraction <= 1.0):
            raise EngineError(f"gpu_memory_fraction must be a number in (0, 1], got {gpu_memory_fraction!r}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise EngineError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        self.path = d
        self.kv_cache_dtype = kv_cache_dtype  # "auto" or "fp8", as loaded
        self._mod = _load_module(d, spec_hash)
        try:
            self._engine = self._mod.Engine.load(str(d / "model.afs"), max_context, threads, cuda_graphs, kv_blocks,
                                                 kv_block_size, max_batch_tokens, float(gpu_memory_fraction),
                                                 kv_cache_dtype)
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
                return list(self._engine.encode_prompt(_check_text(prompt, "prompt"))), True
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
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        sampling_params: "SamplingParams | Sequence[SamplingParams] | None" = None,
    ):
        """Generate a continuation.

        A list of prompts (texts, or token-id lists) runs as one continuously batched workload; pass
        sampling_params (one SamplingParams, or one per prompt) to set each request's parameters.

        prompt: text (returns text), a list of texts (returns a list of texts), or token ids (returns
        token ids). Greedy when temperature == 0, seeded sampling otherwise. Generation stops at the
        model's EOS ids (unless ignore_eos), at stop_token_ids, and at any `stop` string, which is not
        included in the text (like OpenAI). presence_penalty / frequency_penalty: OpenAI's, in [-2, 2]."""
        if sampling_params is None:
            sampling_params = SamplingParams(max_tokens, temperature, top_p, top_k, min_p, seed, stop,
                                             tuple(stop_token_ids), ignore_eos, presence_penalty, frequency_penalty)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
            return [r["text"] if "text" in r else r["tokens"] for r in self.generate_batch(prompt, sampling_params)]
        r = self._generate_one(prompt, sampling_params)
        return r["text"] if "text" in r else r["tokens"]

    def generate_batch(self, prompts: Sequence[str | Sequence[int]],
                       sampling_params: "SamplingParams | Sequence[SamplingParams]" = None) -> list[dict]:
        """Run many requests as one continuously batched workload. Returns one dict per prompt:
        tokens, finish_reason (and text for text prompts; logprobs, a list of TokenLogprobs, when
        asked for). Stop strings end the returned text at their first occurrence."""
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise EngineError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids, texts, args = [], [], []
        for p, sp in zip(prompts, params):
            if not isinstance(sp, SamplingParams):
                raise EngineError(f"sampling_params must be afs.SamplingParams, got {type(sp).__name__}")
            i, is_text = self._prompt_ids(p)
            ids.append(i)
            texts.append(is_text)
            a = self._sampling_args(sp)
            if sp.stop and not is_text:
                raise EngineError("stop strings need a text prompt; with token ids use stop_token_ids")
            args.append(a)
        results = self._call(self._engine.generate_batch, ids, args)
        out = []
        for r, is_text, sp in zip(results, texts, params):
            r = self._with_logprobs(dict(r), sp)
            if is_text:
                eos = set(self.eos_token_ids)
                text = self.tokenizer.decode([t for t in r["tokens"] if t not in eos], skip_special_tokens=True)
                for s in self._stops(sp.stop):
                    cut = text.find(s)
                    if cut >= 0:
                        text, r["finish_reason"] = text[:cut], "stop"
                r["text"] = text
            out.append(r)
        return out

    def submit(self, prompt: str | Sequence[int], sampling_params: "SamplingParams | None" = None) -> "Request":
        """Submit a request to the engine's continuous-batching scheduler and return at once.
        Iterate the returned Request for token ids (or `async for`); it is thread-safe."""
        sp = sampling_params or SamplingParams()
        ids, is_text = self._prompt_ids(prompt)
        return Request(self, self._call(self._engine.submit, ids, self._sampling_args(sp)))

    def stats(self) -> dict:
        """Scheduler and KV-cache counters: waiting, running, preemptions, kv_blocks_free/total,
        prefix_cache_queries/hits, ..."""
        return dict(self._engine.scheduler_stats())

    def generate_full(self, prompt, max_tokens=16, temperature=0.0, top_k=0, top_p=1.0, seed=0, *, min_p=0.0,
                      stop=None, stop_token_ids=(), ignore_eos=False, presence_penalty=0.0, frequency_penalty=0.0,
                      logprobs=None) -> dict:
        """Like generate, returning a dict: tokens, finish_reason, prefill_seconds, decode_seconds
        (and text, prompt_tokens for a text prompt; with logprobs=k, logprobs: a TokenLogprobs per
        token with the k most likely tokens)."""
        return self._generate_one(prompt, SamplingParams(max_tokens, temperature, top_p, top_k, min_p, seed, stop,
                                                         tuple(stop_token_ids), ignore_eos, presence_penalty,
                                                         frequency_penalty, logprobs))

    def _generate_one(self, prompt, sp: SamplingParams) -> dict:
        ids, is_text = self._prompt_ids(prompt)
        args = self._sampling_args(sp)
        stops = self._stops(sp.stop)
        if is_text:
            r = self._call(self._engine.generate_text, ids, args, stops)
        elif stops:
            raise EngineError("stop strings need a text prompt; with token ids use stop_token_ids")
        else:
            r = self._call(self._engine.generate, ids, args)
        return self._with_logprobs(dict(r), sp)

    @staticmethod
    def _with_logprobs(r: dict, sp: SamplingParams) -> dict:
        raw = r.pop("logprobs", ())
        if sp.logprobs is not None:
            r["logprobs"] = [TokenLogprobs(t, lp, tuple(map(tuple, top))) for t, (lp, top) in zip(r["tokens"], raw)]
        return r

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 16, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, *, min_p: float = 0.0, stop: str | Sequence[str] | None = None,
               stop_token_ids: Sequence[int] = (), ignore_eos: bool = False, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0) -> Iterator[str]:
        """Yield the generated text piece by piece as it is produced (never half a character).
        Closing the iterator early cancels the generation."""
        ids, _ = self._prompt_ids(prompt)
        self.tokenizer  # a clear error when there is none
        args = self._sampling_args(SamplingParams(max_tokens, temperature, top_p, top_k, min_p, seed, None,
                                                  tuple(stop_token_ids), ignore_eos, presence_penalty,
                                                  frequency_penalty))
        s = self._call(self._engine.stream_text, ids, args, self._stops(stop))
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
             stop: str | Sequence[str] | None = None, stream: bool = False, ignore_eos: bool = False,
             presence_penalty: float = 0.0, frequency_penalty: float = 0.0):
        """Answer a conversation ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat
        template. Returns the reply text, or an iterator of pieces with stream=True."""
        ids = self.encode_chat(messages)
        if stream:
            return self.stream(ids, max_tokens, temperature, top_k, top_p, seed, min_p=min_p, stop=stop,
                               ignore_eos=ignore_eos, presence_penalty=presence_penalty,
                               frequency_penalty=frequency_penalty)
        sp = SamplingParams(max_tokens, temperature, top_p, top_k, min_p, seed, stop, (), ignore_eos,
                            presence_penalty, frequency_penalty)
        return self._call(self._engine.generate_text, ids, self._sampling_args(sp), self._stops(stop))["text"]

    def encode_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a conversation ([{"role": ..., "content": ...}, ...]) with the checkpoint's
        chat template, as the engine applies it."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise EngineError("messages must be a list of {'role': ..., 'content': ...} dicts")
        pairs = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise EngineError(f"messages[{i}] must be a dict with string 'role' and 'content'")
            pairs.append((_check_text(m["role"], f"messages[{i}].role"), _check_text(m["content"], f"messages[{i}].content")))
        return list(self._call(self._engine.encode_chat, pairs, bool(add_generation_prompt)))

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
            _check_text(s, "stop")
        return stops

    def _sampling_args(self, sp: SamplingParams) -> tuple:
        """The native module's sampling tuple (see make_request in src/bindings/engine_module.cpp);
        types are checked here, values by the engine."""
        stops = _check_ids(sp.stop_token_ids, "stop_token_ids")
        max_tokens, top_k, seed = sp.max_tokens, sp.top_k, sp.seed
        for name, v in (("max_tokens", max_tokens), ("top_k", top_k), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise EngineError(f"{name} must be an integer, got {v!r}")
        if max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_tokens > self.max_context:
            raise EngineError(f"max_tokens = {max_tokens} exceeds the context limit of {self.max_context} tokens")
        if not 0 <= seed < 2**64:
            raise EngineError(f"seed must be in [0, 2**64), got {seed}")
        if top_k < 0:
            raise EngineError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        top_k = min(top_k, 2**31 - 1)  # any top_k >= vocab keeps every token
        floats = {}
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
            v = getattr(sp, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise EngineError(f"{name} must be a number, got {v!r}")
            floats[name] = float(v)
        logprobs = sp.logprobs
        if logprobs is not None:
            logprobs = _check_int(logprobs, "logprobs", 0, MAX_LOGPROBS)
        return (int(max_tokens), floats["temperature"], int(top_k), floats["top_p"], floats["min_p"], int(seed),
                stops, bool(sp.ignore_eos), floats["presence_penalty"], floats["frequency_penalty"],
                logprobs is not None, logprobs or 0)

    def bench(self, prompt_tokens: int = 128, gen_tokens: int = 64, warmup: int = 1) -> dict:
        prompt_tokens = _check_int(prompt_tokens, "prompt_tokens", 1, 2**31 - 1)
        gen_tokens = _check_int(gen_tokens, "gen_tokens", 1, 2**31 - 1)
        warmup = _check_int(warmup, "warmup", 0, 1000)
        try:
            return self._engine.bench(prompt_tokens, gen_tokens, warmup)
        except ValueError as e:
            raise EngineError(str(e)) from None

    def __repr__(self) -> str:
        kv = "" if self.kv_cache_dtype == "auto" else f", kv_cache_dtype={self.kv_cache_dtype}"
        return f"afs.Engine({str(self.path)!r}, backend={self.backend}, vocab={self.vocab_size}{kv})"


def _token_output(item) -> TokenOutput:
    token, time, logprob, top = item
    lp = None if logprob is None else TokenLogprobs(token, logprob, tuple(map(tuple, top)))
    return TokenOutput(token, time, lp)


class Request:
    """A request running in the engine's scheduler: iterate it (or `async for`) for token ids, or
    outputs() / aoutputs() for TokenOutput (token, time, logprobs)."""

    def __init__(self, engine: Engine, stream) -> None:
        self._engine = engine
        self._stream = stream

    @property
    def id(self) -> int:
        return self._stream.id

    def __iter__(self) -> Iterator[int]:
        for out in self.outputs():
            yield out.token

    def outputs(self) -> Iterator[TokenOutput]:
        while (item := self._stream.next()) is not None:
            yield _token_output(item)

    def __aiter__(self) -> AsyncIterator[int]:
        return self._atokens()

    async def _atokens(self):
        async for out in self.aoutputs():
            yield out.token

    async def aoutputs(self) -> AsyncIterator[TokenOutput]:
        """Outputs in the running event loop, without a thread: the engine wakes the loop through a
        pipe (loop.add_reader) whenever tokens are ready."""
        import asyncio

        loop = asyncio.get_running_loop()
        fd = self._stream.fileno()
        ready = asyncio.Event()
        loop.add_reader(fd, ready.set)
        try:
            while True:
                ready.clear()
                items, done = self._stream.drain()
                for item in items:
                    yield _token_output(item)
                if done:
                    return
                await ready.wait()
        finally:
            loop.remove_reader(fd)

    def text(self) -> Iterator[str]:
        """The generated text, piece by piece (never half a character)."""
        dec = self._engine.tokenizer.stream(skip_special_tokens=True)
        for t in self:
            if piece := dec.step(t):
                yield piece
        if tail := dec.flush():
            yield tail

    def cancel(self) -> None:
        """Stop the request now; its KV blocks are freed at the scheduler's next step."""
        self._stream.cancel()

    def result(self) -> dict | None:
        """{"tokens", "finish_reason"} once finished, else None."""
        r = self._stream.result()
        return dict(r) if r is not None else None


def load(engine_dir: str | Path, max_context: int = 0, threads: int = 0, cuda_graphs: bool = True,
         kv_blocks: int = 0, kv_block_size: int = 16, max_batch_tokens: int = 0,
         gpu_memory_fraction: float = 0.9, kv_cache_dtype: str = "auto") -> Engine:
    """Load an engine directory built by afs-build.

    max_context: context limit in tokens (0: the model's); threads: CPU threads (0: all);
    cuda_graphs: replay CUDA decode steps as graphs (False: eager launches, for debugging);
    kv_blocks / kv_block_size: the paged KV pool (0 blocks: CPU enough for 4 sequences of
    max_context, CUDA what gpu_memory_fraction of the GPU leaves after weights and buffers);
    max_batch_tokens: tokens per scheduler step, decode tokens + prompt chunks (0: CPU 512, CUDA 2048);
    gpu_memory_fraction: CUDA, the share of the GPU's memory the engine may end up using;
    kv_cache_dtype: "auto" (the weight type; CPU float32) or "fp8" (e4m3, one byte a value, no scale:
    values round to nearest even and saturate at +-448; more sequences fit and decode reads half the
    K/V bytes, at some accuracy)."""
    return Engine(engine_dir, max_context=max_context, threads=threads, cuda_graphs=cuda_graphs,
                  kv_blocks=kv_blocks, kv_block_size=kv_block_size, max_batch_tokens=max_batch_tokens,
                  gpu_memory_fraction=gpu_memory_fraction, kv_cache_dtype=kv_cache_dtype)
