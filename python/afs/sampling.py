"""SamplingParams: per-request generation settings, with vLLM / OpenAI names; what a request
reports per token (TokenOutput, TokenLogprobs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int = 0
    stop: str | Sequence[str] | None = None  # stop strings (text prompts); not included in the output
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    # OpenAI penalties in [-2, 2] over the generated tokens: a token's logit loses presence_penalty
    # once it has appeared, and frequency_penalty for every time it has appeared.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: off. k in [0, 20]: report each sampled token's log-probability and the k most likely
    # tokens' (log-softmax of the model's logits, before penalties and temperature), as vLLM does.
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    token: int
    logprob: float  # of `token`
    top: tuple[tuple[int, float], ...]  # (id, logprob) of the most likely tokens, most likely first


@dataclass(frozen=True)
class TokenOutput:
    token: int
    time: float  # time.monotonic() when the engine produced the token
    logprobs: TokenLogprobs | None  # when the request asked for logprobs
