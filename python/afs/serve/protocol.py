"""The OpenAI request schema afs-serve accepts, and OpenAI-shaped errors.

Requests are validated strictly (no type coercion, no NaN or infinity, unknown fields refused) so
that every bad request is a 400 naming its field. Fields OpenAI defines that change nothing here
(user, metadata, ...) are accepted and ignored; fields whose feature afs lacks (tools, logit_bias,
suffix, ...) are accepted only at their "off" value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_LOGPROBS = 20  # afs.engine.MAX_LOGPROBS: the engine's limit
MAX_N = 128
MAX_STOP = 16


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic ValidationError as a 400 naming the field."""
    err = e.errors(include_url=False)[0]
    path = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or not any(c in str(p) for c in "[]-"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unrecognized request argument"
    return APIError(400, f"{path}: {msg}" if path else msg, param=str(err["loc"][0]) if err["loc"] else None)


# Strict numbers: ints are not floats' strings, bools are not numbers, NaN and infinity are refused.
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Bool = False


class SamplingFields(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: Str | None = None
    n: Annotated[Int, Field(ge=1, le=MAX_N)] = 1
    max_tokens: Annotated[Int, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[Int, Field(ge=-1)] | None = None  # vLLM's extension; -1 and 0 disable it
    min_p: Annotated[Float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[Int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: Any = None
    stop_token_ids: list[Int] | None = None
    ignore_eos: Bool = False
    presence_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Any] | None = None
    user: Str | None = None
    metadata: dict[str, Any] | None = None
    store: Bool | None = None
    service_tier: Str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        for s in stops:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("must be valid Unicode text (no lone surrogates)") from None
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        return stops

    @field_validator("logit_bias", "suffix", "tools", check_fields=False)
    @classmethod
    def _off_only(cls, v, info):
        """Features afs lacks: accepted only when off (null, empty)."""
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self


def _is_token_list(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


class CompletionRequest(SamplingFields):
    prompt: Any
    logprobs: Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: Bool = False
    best_of: Annotated[Int, Field(ge=1, le=MAX_N)] | None = None
    suffix: Str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v) -> list:
        """Always a list of prompts, each a str or a list of token ids."""
        if isinstance(v, str) or _is_token_list(v):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) or _is_token_list(p) for p in v):
            return v
        raise ValueError("must be a string, a list of strings, a non-empty list of token ids, or a list of those")

    @model_validator(mode="after")
    def _checks(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Str
    content: Str | list[TextPart] | None = None
    name: Str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: Bool | None = False
    top_logprobs: Annotated[Int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: Bool | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self
