"""afs-serve's application: OpenAI-compatible endpoints over one engine.

    POST /v1/completions, POST /v1/chat/completions   (stream: server-sent events, then [DONE])
    GET  /v1/models, /v1/models/{model}, /health, /metrics

Every request becomes one engine request per choice (prompt x n), run by the engine's
continuous-batching scheduler; tokens reach the event loop through Request.aoutputs(), which needs
no thread per request. A client that goes away has its engine requests cancelled, which frees their
KV blocks at the scheduler's next step. Errors are OpenAI-shaped; bad input is a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, EngineError
from ..sampling import SamplingParams, TokenLogprobs
from ..tokenizer import StopStrings
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error

log = logging.getLogger("afs.serve")

MIN_LOGPROB = -9999.0  # what JSON can carry for log(0), as OpenAI and vLLM report it


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int = 512  # requests (choices) in the engine at once; more are refused with 429
    max_body_bytes: int = 1 << 20


class JSON(JSONResponse):
    """JSON with non-ASCII escaped, so text echoed from a request (a lone surrogate included) can
    always be encoded."""

    def render(self, content) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


class EngineFailure(Exception):
    """The engine ended a request with an error (a failed step), not the client's doing."""


class ClientGone(Exception):
    pass


class Choice:
    """One choice of a response: an engine request, and its text, tokens and logprobs as they stream."""

    def __init__(self, server: "Server", index: int, prompt_ids: list[int], params: SamplingParams,
                 stops: list[str], arrival: float) -> None:
        self.server, self.index, self.arrival = server, index, arrival
        self.stops = stops
        self.request = server.engine.submit(prompt_ids, params)  # EngineError: a bad request
        server.in_flight += 1
        self.tokens: list[int] = []
        self.text = ""
        self.logprobs: list[TokenLogprobs] = []
        self.finish_reason: str | None = None
        self._closed = False

    async def events(self) -> AsyncIterator[tuple[str, TokenLogprobs | None]]:
        """(text that became final, logprobs of the token that produced it) per token; "" while a
        character or a possible stop string is incomplete. Sets finish_reason at the end."""
        dec = self.server.engine.tokenizer.stream(skip_special_tokens=True)
        stops = StopStrings(self.stops)
        metrics, last = self.server.metrics, self.arrival
        try:
            async with contextlib.aclosing(self.request.aoutputs()) as outputs:
                async for out in outputs:
                    (metrics.itl if self.tokens else metrics.ttft).observe(max(out.time - last, 0.0))
                    last = out.time
                    self.tokens.append(out.token)
                    if out.logprobs is not None:
                        self.logprobs.append(out.logprobs)
                    text = stops.push(dec.step(out.token))
                    self.text += text
                    yield text, out.logprobs
                    if stops.stopped:
                        self.finish_reason = "stop"
                        return
            tail = stops.push(dec.flush())
            tail += "" if stops.stopped else stops.finish()
            self.text += tail
            if tail:
                yield tail, None
            reason = (self.request.result() or {}).get("finish_reason", "")
            if reason.startswith("error"):
                raise EngineFailure(reason)
            self.finish_reason = "stop" if stops.stopped else reason
        finally:
            self.close()

    def close(self) -> None:
        """Cancels the engine request unless it finished; counts the choice out. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.server.in_flight -= 1
        self.request.cancel()  # a no-op once the engine has finished it
        self.server.metrics.count_finished(self.finish_reason or "cancelled")
        self.server.metrics.request_seconds.observe(time.monotonic() - self.arrival)


class Server:
    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.metrics = Metrics()
        self.in_flight = 0
        self.draining = False
        self.created = int(time.time())
        self.fingerprint = "afs-" + str(engine.manifest.get("spec_hash", ""))[:16]
        self._token_text: dict[int, tuple[str, list[int]]] = {}

    # -- request plumbing ------------------------------------------------------------------------

    async def read_json(self, request: Request) -> dict:
        limit = self.config.max_body_bytes
        too_large = APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_large if length.isdigit() else APIError(400, "invalid Content-Length header")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks), parse_constant=_no_constants)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON ({type(e).__name__}: {e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                                f"'{self.config.model_name}'.", param="model", code="model_not_found")

    def admit(self, choices: int) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": "5"})
        if self.in_flight + choices > self.config.max_queue:
            self.metrics.rejected_queue_full += 1
            raise APIError(429, f"the server is at capacity ({self.config.max_queue} requests in flight); "
                                "retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})

    def max_tokens(self, requested: int | None, prompt_len: int, default: int | None, param: str) -> int:
        ctx = self.engine.max_context
        room = ctx - prompt_len
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt has "
                                f"{prompt_len} tokens.", param=param, code="context_length_exceeded")
        if requested is None:
            return min(default, room) if default else room
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                                "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        return requested

    def encode(self, text: str, param: str) -> list[int]:
        try:
            return self.engine.tokenizer.encode(text)
        except ValueError as e:  # invalid Unicode (lone surrogates) included
            raise APIError(400, f"{param}: {e}", param=param) from None

    def start(self, prompts: list[list[int]], req, max_tokens: list[int], logprobs: int | None,
              arrival: float) -> list[Choice]:
        """Submits prompt x n engine requests; all or none."""
        self.admit(len(prompts) * req.n)
        base_seed = req.seed
        choices: list[Choice] = []
        try:
            for p, ids in enumerate(prompts):
                for k in range(req.n):
                    seed = secrets.randbits(63) if base_seed is None else (base_seed + k) % 2**64
                    sp = SamplingParams(
                        max_tokens=max_tokens[p], temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
                        min_p=req.min_p or 0.0, seed=seed, stop_token_ids=tuple(req.stop_token_ids or ()),
                        ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty or 0.0,
                        frequency_penalty=req.frequency_penalty or 0.0, logprobs=logprobs)
                    choices.append(Choice(self, len(choices), ids, sp, req.stop or [], arrival))
        except EngineError as e:
            for c in choices:
                c.close()
            raise APIError(400, str(e)) from None
        return choices

    async def run_all(self, request: Request, choices: list[Choice]) -> None:
        """Runs every choice to its end; cancels them all if the client disconnects first."""

        async def consume(c: Choice) -> None:
            async for _ in c.events():
                pass

        work = asyncio.ensure_future(asyncio.gather(*(consume(c) for c in choices)))
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                raise ClientGone()
            work.result()
        finally:
            watch.cancel()
            for c in choices:
                c.close()

    async def merged_events(self, choices: list[Choice]):
        """(choice, text, logprobs) from every choice as they come, then (choice, None, None) at each
        choice's end."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice) -> None:
            try:
                async for text, lp in c.events():
                    queue.put_nowait((c, text, lp))
                queue.put_nowait((c, None, None))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((c, e, None))

        tasks = [asyncio.ensure_future(pump(c)) for c in choices]
        try:
            left = len(choices)
            while left:
                c, text, lp = await queue.get()
                if isinstance(text, BaseException):
                    raise text
                if text is None:
                    left -= 1
                yield c, text, lp
        finally:
            for t in tasks:
                t.cancel()
            for c in choices:
                c.close()

    def token_text(self, token: int) -> tuple[str, list[int]]:
        """A token as text for logprobs (raw bytes as \\xNN when they are not whole UTF-8) and its bytes."""
        if token not in self._token_text:
            b = self.engine.tokenizer.token_bytes(token)
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:
                s = "".join(f"\\x{x:02x}" for x in b)
            self._token_text[token] = (s, list(b))
        return self._token_text[token]

    def usage(self, prompts: list[list[int]], choices: list[Choice]) -> dict:
        p = sum(len(ids) for ids in prompts)
        c = sum(len(ch.tokens) for ch in choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # -- /v1/completions ---------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        self.check_auth(request)
        req = _validate(CompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        prompts, echoes = [], []
        for i, p in enumerate(req.prompt):
            param = "prompt" if len(req.prompt) == 1 else f"prompt[{i}]"
            prompts.append(self.encode(p, param) if isinstance(p, str) else list(p))
            echoes.append(p if isinstance(p, str) else self.engine.tokenizer.decode(p))
        limits = [self.max_tokens(req.max_tokens, len(ids), 16, "prompt") for ids in prompts]
        choices = self.start(prompts, req, limits, req.logprobs, arrival)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.config.model_name,
                "system_fingerprint": self.fingerprint}
        n = req.n

        def echo(c: Choice) -> str:
            return echoes[c.index // n] if req.echo else ""

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def sse() -> AsyncIterator[str]:
                offsets = {c.index: len(echo(c)) for c in choices}
                for c in choices:
                    if req.echo:
                        yield _sse(base, {"choices": [_completion_choice(c.index, echo(c), None, None)]},
                                   include_usage)
                async for c, text, lp in self.merged_events(choices):
                    if text is None:
                        chunk = _completion_choice(c.index, "", None, c.finish_reason)
                    elif text or lp is not None:
                        lps = None
                        if lp is not None:
                            lps, offsets[c.index] = self.completion_logprobs([lp], offsets[c.index])
                        chunk = _completion_choice(c.index, text, lps, None)
                    else:
                        continue
                    yield _sse(base, {"choices": [chunk]}, include_usage)
                if include_usage:
                    yield _sse(base, {"choices": [], "usage": self.usage(prompts, choices)}, False)
                yield "data: [DONE]\n\n"

            return self.stream_response(sse())
        await self.run_all(request, choices)
        out = []
        for c in choices:
            lps = self.completion_logprobs(c.logprobs, len(echo(c)))[0] if req.logprobs is not None else None
            out.append(_completion_choice(c.index, echo(c) + c.text, lps, c.finish_reason))
        return JSON({**base, "choices": out, "usage": self.usage(prompts, choices)})

    def completion_logprobs(self, lps: list[TokenLogprobs], offset: int) -> tuple[dict, int]:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            s = self.token_text(lp.token)[0]
            top = {self.token_text(t)[0]: _logprob(v) for t, v in lp.top}
            top.setdefault(s, _logprob(lp.logprob))
            out["tokens"].append(s)
            out["token_logprobs"].append(_logprob(lp.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(s)
        return out, offset

    # -- /v1/chat/completions ----------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        self.check_auth(request)
        req = _validate(ChatCompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = self.engine.encode_chat(messages)
        except EngineError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        limit = self.max_tokens(req.max_completion_tokens or req.max_tokens, len(ids), None, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        choices = self.start([ids], req, [limit], logprobs, arrival)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": self.config.model_name,
                "system_fingerprint": self.fingerprint}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            base["object"] = "chat.completion.chunk"

            async def sse() -> AsyncIterator[str]:
                for c in choices:
                    role = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}
                    yield _sse(base, {"choices": [role]}, include_usage)
                async for c, text, lp in self.merged_events(choices):
                    if text is None:
                        chunk = {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}
                    elif text or lp is not None:
                        lps = {"content": [self.chat_logprob(lp)]} if lp is not None else None
                        chunk = {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": lps,
                                 "finish_reason": None}
                    else:
                        continue
                    yield _sse(base, {"choices": [chunk]}, include_usage)
                if include_usage:
                    yield _sse(base, {"choices": [], "usage": self.usage([ids], choices)}, False)
                yield "data: [DONE]\n\n"

            return self.stream_response(sse())
        await self.run_all(request, choices)
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": [self.chat_logprob(lp) for lp in c.logprobs]} if req.logprobs else None,
                "finish_reason": c.finish_reason} for c in choices]
        return JSON({**base, "object": "chat.completion", "choices": out, "usage": self.usage([ids], choices)})

    def chat_logprob(self, lp: TokenLogprobs) -> dict:
        s, b = self.token_text(lp.token)
        top = []
        for t, v in lp.top:
            ts, tb = self.token_text(t)
            top.append({"token": ts, "logprob": _logprob(v), "bytes": tb})
        return {"token": s, "logprob": _logprob(lp.logprob), "bytes": b, "top_logprobs": top}

    def stream_response(self, events: AsyncIterator[str]) -> StreamingResponse:
        async def body():
            try:
                async for e in events:
                    yield e
            except EngineFailure as e:
                yield "data: " + json.dumps(APIError(500, str(e), type="server_error").body()) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await events.aclose()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- the rest ----------------------------------------------------------------------------------

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "afs",
                "max_model_len": self.engine.max_context}


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _validate(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _logprob(v: float) -> float:
    return v if v >= MIN_LOGPROB else MIN_LOGPROB  # also NaN -> MIN_LOGPROB


def _completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def _sse(base: dict, fields: dict, usage_field: bool) -> str:
    chunk = {**base, **fields}
    if usage_field:
        chunk.setdefault("usage", None)
    return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The FastAPI application serving `engine`; app.state.server is the Server."""
    server = Server(engine, config)
    app = FastAPI(title="afs-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    def endpoint(name: str, handler: Callable[[Request], Awaitable[Response]]):
        async def run(request: Request) -> Response:
            try:
                response = await handler(request)
            except APIError as e:
                response = JSON(e.body(), status_code=e.status, headers=e.headers)
            except ClientGone:
                response = Response(status_code=499)
            except EngineFailure as e:
                response = JSON(APIError(500, str(e), type="server_error").body(), status_code=500)
            server.metrics.count_response(name, response.status_code)
            return response

        return run

    async def models(request: Request) -> Response:
        server.check_auth(request)
        return JSON({"object": "list", "data": [server.model_card()]})

    async def model(request: Request) -> Response:
        server.check_auth(request)
        server.check_model(request.path_params["model"])
        return JSON(server.model_card())

    async def health(request: Request) -> Response:
        if server.draining:
            return JSON({"status": "draining"}, status_code=503, headers={"Retry-After": "5"})
        return JSON({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(server.metrics.render(engine.stats(), server.in_flight),
                                 media_type="text/plain; version=0.0.4")

    app.add_api_route("/v1/completions", endpoint("completions", server.completions), methods=["POST"])
    app.add_api_route("/v1/chat/completions", endpoint("chat_completions", server.chat_completions),
                      methods=["POST"])
    app.add_api_route("/v1/models", endpoint("models", models), methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", endpoint("models", model), methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSON(APIError(exc.status_code, str(exc.detail), code=kind).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return JSON(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    return app
