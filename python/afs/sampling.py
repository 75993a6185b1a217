"""SamplingParams: per-request generation settings, with vLLM / OpenAI names."""

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
