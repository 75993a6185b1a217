"""afs-serve, the OpenAI-compatible server, run as a user runs it (a subprocess on a local port) in
front of the demo engine, and driven with the official openai client, httpx and raw sockets.

Oracles: the engine's own Python API in this process (generate / chat / score, checked against HF
transformers elsewhere) for every output; numpy log-softmax of score() logits for logprobs; the
server's /metrics for KV blocks and running requests after clients hang up. The request schema is
fuzzed with hypothesis against the application in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("afs._native", reason="afs is not installed with its native module (pip install .)")
for _mod in ("fastapi", "uvicorn", "httpx", "openai", "hypothesis"):
    pytest.importorskip(_mod, reason="the server tests need the test extra: pip install '.[test]'")

import httpx  # noqa: E402
import openai  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import afs  # noqa: E402
from conftest import TIME_SCALE, subprocess_env  # noqa: E402
from reference import LOGPROB_ATOL, log_softmax, top_logprobs  # noqa: E402

KEY = "sk-afs-test"
MODEL = "demo"
PROMPTS = ["The quick brown fox", "Hello, world!", "naïve café 日本語 😀", "Once upon a time", "x", "1, 2, 3,"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from afs_build.cli import build_engine

    out = tmp_path_factory.mktemp("serve-demo")
    build_engine(model="demo", arch="cpu", dtype="fp32", output=out, quiet=True)
    return out


@pytest.fixture(scope="module")
def engine(demo_dir) -> afs.Engine:
    """The oracle: the same engine directory, used directly."""
    return afs.load(demo_dir, threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """afs-serve in a subprocess, its log in a file."""

    def __init__(self, engine_dir: Path, log: Path, *args: str) -> None:
        self.port = _free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "afs.serve.cli", str(engine_dir), "--port", str(self.port), "--threads", "1",
             "--served-model-name", MODEL, "--log-level", "warning", *args],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=subprocess_env())
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"afs-serve exited:\n{log.read_text()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"afs-serve did not come up:\n{log.read_text()}")

    def client(self, api_key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and ln[0] != "#")}

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def server(demo_dir, tmp_path_factory):
    s = Served(demo_dir, tmp_path_factory.mktemp("serve") / "afs-serve.log", "--api-key", KEY,
               "--max-body-bytes", "262144")
    yield s
    assert s.stop() == 0, s.log.read_text()


def _sse(lines) -> list:
    """The data of each server-sent event: parsed JSON, or the string [DONE]."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return out


def _token_text(b: bytes) -> str:
    """How logprobs name a token: its text, or \\xNN escapes when its bytes are not whole UTF-8."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{x:02x}" for x in b)


def _auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def _assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err["message"]


# ---------------------------------------------------------------------------------------------
# Endpoints through the openai client


def test_models_health_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL
    m = server.metrics()
    for name in ("afs_queue_depth", "afs_requests_running", "afs_prompt_tokens_total", "afs_generation_tokens_total",
                 "afs_kv_cache_usage_ratio", "afs_kv_cache_blocks_used", "afs_prefix_cache_hit_rate",
                 'afs_time_to_first_token_seconds_bucket{le="+Inf"}', "afs_inter_token_latency_seconds_count"):
        assert name in m, name


def test_completions_equal_engine(server, engine):
    client = server.client()
    tok = engine.tokenizer
    for p in PROMPTS:
        want = engine.generate_full(p, max_tokens=12)
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
        assert r.object == "text_completion" and r.model == MODEL and len(r.choices) == 1
        assert r.choices[0].text == want["text"]
        assert r.choices[0].finish_reason == want["finish_reason"]
        assert r.usage.prompt_tokens == len(tok.encode(p))
        assert r.usage.completion_tokens == len(want["tokens"])
    # Token-id prompts and several prompts in one request: one choice each, in order.
    ids = [tok.encode(p) for p in PROMPTS[:3]]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [engine.generate(p, max_tokens=6) for p in PROMPTS[:3]]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == "Hello" + engine.generate("Hello", max_tokens=5)


def test_chat_equals_engine(server, engine):
    r = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == engine.chat(MESSAGES, max_tokens=12)
    assert r.usage.prompt_tokens == len(engine.encode_chat(MESSAGES))
    # Content as a list of text parts is the same message.
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    r2 = server.client().chat.completions.create(model=MODEL, messages=parts, max_tokens=12, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_streaming_equals_whole(server, engine):
    client = server.client()
    for p in PROMPTS[:3]:
        whole = client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0)
        chunks = list(client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
            [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # The raw stream ends with [DONE].
    with httpx.stream("POST", server.url + "/v1/completions", headers=_auth(), timeout=60,
                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert _sse(r.iter_lines())[-1] == "[DONE]"


def test_stop_strings(server, engine):
    client = server.client()
    text = engine.generate("Once upon a time", max_tokens=32, ignore_eos=True)
    stop = next(text[k:k + 3] for k in range(4, len(text) - 3) if text[k:k + 3].strip() == text[k:k + 3])
    want = text[:text.find(stop)]
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=32, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=32, temperature=0,
                                            stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_and_seeds(server, engine):
    """Choice k of a seeded request samples with seed + k; temperature 1 is OpenAI's default."""
    r = server.client().completions.create(model=MODEL, prompt="Hello", max_tokens=8, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    want = [engine.generate("Hello", max_tokens=8, temperature=1.0, seed=7 + k) for k in range(3)]
    assert [c.text for c in r.choices] == want
    assert len(set(want)) > 1
    chunks = list(server.client().completions.create(model=MODEL, prompt="Hello", max_tokens=8, n=3, seed=7,
                                                      stream=True))
    for k in range(3):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == k) == want[k]


def test_penalties_and_logprobs(server, engine):
    client = server.client()
    ids = engine.tokenizer.encode("The quick brown fox")
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0,
                                  presence_penalty=1.2, frequency_penalty=0.7, extra_body={"ignore_eos": True})
    assert r.choices[0].text == engine.generate("The quick brown fox", max_tokens=16, ignore_eos=True,
                                                presence_penalty=1.2, frequency_penalty=0.7)
    # Logprobs against log_softmax of score() at each generated position.
    tokens = engine.generate(ids, max_tokens=10, ignore_eos=True)
    ref = log_softmax(engine.score(ids + tokens[:-1])[len(ids) - 1:])
    tok = engine.tokenizer
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.tokens == [_token_text(tok.token_bytes(t)) for t in tokens]
    assert np.allclose(lp.token_logprobs, [ref[i, t] for i, t in enumerate(tokens)], rtol=0, atol=LOGPROB_ATOL)
    for i, top in enumerate(lp.top_logprobs):
        want = {_token_text(tok.token_bytes(t)): v for t, v in top_logprobs(ref[i], 3)}
        assert set(top) == set(want) and all(abs(top[k] - want[k]) <= LOGPROB_ATOL for k in want)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chat_ids = engine.encode_chat(MESSAGES)
    chat_tokens = engine.generate(chat_ids, max_tokens=6, ignore_eos=True)
    ref = log_softmax(engine.score(chat_ids + chat_tokens[:-1])[len(chat_ids) - 1:])
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert [bytes(c.bytes) for c in content] == [tok.token_bytes(t) for t in chat_tokens]
    for i, c in enumerate(content):
        assert abs(c.logprob - ref[i, chat_tokens[i]]) <= LOGPROB_ATOL
        assert [bytes(t.bytes) for t in c.top_logprobs] == [tok.token_bytes(t) for t, _ in top_logprobs(ref[i], 2)]
    streamed = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                                   logprobs=True, top_logprobs=2, stream=True,
                                                   extra_body={"ignore_eos": True}))
    assert [bytes(c.bytes) for ch in streamed if ch.choices[0].logprobs for c in ch.choices[0].logprobs.content] == \
        [bytes(c.bytes) for c in content]


# ---------------------------------------------------------------------------------------------
# Errors


def test_errors_through_the_openai_client(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", temperature=3.0)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=5000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 5000}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[[1, 2, 999999]], max_tokens=2)
    assert "not a token id of this model" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="Hi")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").completions.create(model=MODEL, prompt="Hi")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"frobnicate": 1})
    assert e.value.body["param"] == "frobnicate"
    for kwargs in (dict(n=0), dict(logit_bias={"5": 10}), dict(top_logprobs=3), dict(presence_penalty=2.5),
                   dict(tools=[{"type": "function", "function": {"name": "f"}}]), dict(messages=[])):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**{"model": MODEL, "messages": MESSAGES, **kwargs})


def test_errors_over_http(server):
    url = server.url + "/v1/completions"
    _assert_error(httpx.post(url, json={"model": MODEL, "prompt": "Hi"}), 401, code="invalid_api_key")
    _assert_error(httpx.post(url, headers={"Authorization": "Bearer nope"}, json={"prompt": "Hi"}), 401)
    _assert_error(httpx.post(url, headers=_auth(), content=b"{not json"), 400)
    _assert_error(httpx.post(url, headers=_auth(), content=b"[1, 2]"), 400)
    _assert_error(httpx.post(url, headers=_auth(), content=b'{"prompt": "Hi", "temperature": NaN}'), 400)
    _assert_error(httpx.post(url, headers=_auth(), content=b'{"prompt": "Hi", "max_tokens": 1e999}'), 400)
    _assert_error(httpx.post(url, headers=_auth(), content=b"[" * 100000 + b"]" * 100000), 400)
    _assert_error(httpx.post(url, headers=_auth(), content=b'{"prompt": "\\ud800"}'), 400, param="prompt")
    _assert_error(httpx.post(url, headers=_auth(), content=b'{"prompt": "Hi", "stop": "\\udfff"}'), 400, param="stop")
    _assert_error(httpx.post(url, headers=_auth(), content=b'{"prompt": "Hi", "model": "\\ud800"}'), 404)
    _assert_error(httpx.post(server.url + "/v1/chat/completions", headers=_auth(),
                             content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), 400, param="messages")
    _assert_error(httpx.post(url, headers=_auth(), content=b'{"prompt": "\xff\xfe Hi"}'), 400)  # not UTF-8
    for field, value in (("max_tokens", 0), ("max_tokens", -1), ("top_p", 0), ("temperature", -0.5), ("n", 200),
                         ("frequency_penalty", 2.5), ("logprobs", 21), ("stop_token_ids", [-1])):
        _assert_error(httpx.post(url, headers=_auth(), json={"prompt": "Hi", field: value}), 400)
    _assert_error(httpx.post(url, headers=_auth(), json={"prompt": "Hi", "max_tokens": 10**30}), 400,
                  code="context_length_exceeded")
    # NUL is ordinary text, as in HF tokenizers.
    assert httpx.post(url, headers=_auth(), json={"prompt": "a\u0000b", "max_tokens": 2}).status_code == 200
    big = json.dumps({"prompt": "x" * 300000}).encode()
    _assert_error(httpx.post(url, headers=_auth(), content=big), 413, code="request_too_large")

    def chunked():
        yield big  # no Content-Length: the limit applies while the body is read

    _assert_error(httpx.post(url, headers=_auth(), content=chunked()), 413)
    _assert_error(httpx.get(server.url + "/v1/nothing-here", headers=_auth()), 404)
    _assert_error(httpx.get(url, headers=_auth()), 405)
    _assert_error(httpx.get(server.url + "/v1/models/other", headers=_auth()), 404, code="model_not_found")


# ---------------------------------------------------------------------------------------------
# Concurrency, hang-ups, queue limit, shutdown


def test_64_concurrent_streaming_clients(server, engine):
    """64 clients x 4 streamed requests each, all at once: every output equals the request run alone."""
    words = "alpha beta gamma delta river stone cloud garden number seven light house".split()
    rng = np.random.default_rng(0)
    prompts = [[" ".join(rng.choice(words, int(rng.integers(1, 12)))) for _ in range(4)] for _ in range(64)]
    solo = {p: engine.generate(p, max_tokens=10) for ps in prompts for p in ps}
    running: list[float] = []

    async def one_client(client, ps):
        out = []
        for p in ps:
            text = ""
            async for chunk in await client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0,
                                                               stream=True):
                text += chunk.choices[0].text
            out.append(text)
        return out

    async def watch(stop):
        async with httpx.AsyncClient() as h:
            while not stop.is_set():
                m = (await h.get(server.url + "/metrics")).text
                running.append(float(next(ln.split()[1] for ln in m.splitlines()
                                          if ln.startswith("afs_requests_running "))))
                await asyncio.sleep(0.05)

    async def main():
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            results = await asyncio.gather(*(one_client(client, ps) for ps in prompts))
        stop.set()
        await watcher
        return results

    results = asyncio.run(main())
    assert results == [[solo[p] for p in ps] for ps in prompts]
    assert max(running) > 8, "requests did not overlap"


def _post_raw(port: int, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def test_100_clients_hang_up(server):
    """100 long requests whose clients go away (streaming after a first token, streaming before any,
    or waiting for a whole response): all are cancelled, a new request is served within 5 s, and
    every KV block is free again."""

    async def hang_up(i: int):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        stream = i % 10 < 7
        writer.write(_post_raw(server.port, {"model": MODEL, "prompt": f"request {i}", "max_tokens": 1000,
                                             "ignore_eos": True, "stream": stream}))
        await writer.drain()
        if i % 10 < 4:
            await reader.readuntil(b"\ndata: {")  # the first token arrived
        else:
            await asyncio.sleep(0.3)
        writer.close()

    async def main():
        await asyncio.gather(*(hang_up(i) for i in range(100)))

    asyncio.run(main())
    t0 = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", headers=_auth(), timeout=30,
                   json={"model": MODEL, "prompt": "still there?", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - t0 < 5.0 * TIME_SCALE
    deadline = time.monotonic() + 5.0 * TIME_SCALE
    while True:
        m = server.metrics()
        idle = (m["afs_kv_cache_blocks_used"], m["afs_requests_running"], m["afs_queue_depth"],
                m["afs_requests_in_flight"]) == (0, 0, 0, 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle, m
    # The 40 that saw a token were running, and none could have finished 1000 tokens.
    assert m['afs_request_finished_total{finish_reason="cancelled"}'] >= 40


def test_queue_full_then_sigterm_drains(demo_dir, tmp_path):
    s = Served(demo_dir, tmp_path / "serve.log", "--max-queue", "2", "--drain-timeout", "60")
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 600, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        with httpx.Client(timeout=60) as h1, httpx.Client(timeout=60) as h2:
            with h1.stream("POST", s.url + "/v1/completions", json=body) as r1, \
                    h2.stream("POST", s.url + "/v1/completions", json=body) as r2:
                lines1, lines2 = r1.iter_lines(), r2.iter_lines()
                first = [next(lines1), next(lines2)]
                assert all(f.startswith("data: {") for f in first)
                with pytest.raises(openai.RateLimitError) as e:
                    s.client().completions.create(model=MODEL, prompt="Hi", max_tokens=2)
                assert e.value.response.headers["retry-after"] == "1"
                assert e.value.body["code"] == "queue_full"
                s.proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                with pytest.raises(httpx.ConnectError):  # no longer accepting
                    httpx.get(s.url + "/health")
                # The requests in flight run to the end.
                for f, lines in zip(first, (lines1, lines2)):
                    events = _sse([f, *lines])
                    assert events[-1] == "[DONE]"
                    assert events[-2]["usage"]["completion_tokens"] == 600
                    assert events[-3]["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(30) == 0, s.log.read_text()
    finally:
        s.stop()


def test_sigterm_drain_timeout_cancels(demo_dir, tmp_path):
    s = Served(demo_dir, tmp_path / "serve.log", "--drain-timeout", "1")
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            rest = []
            with pytest.raises(httpx.RemoteProtocolError):  # the response is cut off, not finished
                for line in lines:
                    rest.append(line)
            assert "data: [DONE]" not in rest and len(rest) < 2 * 3000
        assert s.proc.wait(30) == 0, s.log.read_text()
        assert time.monotonic() - t0 < 15
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------
# Fuzzing the request schema (in-process app: the same code, no network; a small context so that any
# valid request finishes fast). Valid bodies must succeed; anything else must be a 4xx in OpenAI's
# shape, never a 5xx.

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
_junk = st.recursive(_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=8)
# Junk without integers, for fields where a valid large integer would only make the request slow.
_junk_no_int = _junk.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
_short_text = st.text(min_size=1, max_size=8)

# Valid values of the fields both endpoints share (sized for max_context 64).
_VALID = {
    "model": st.just(MODEL),
    "max_tokens": st.integers(1, 6),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 3000),
    "min_p": st.floats(0, 1),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": st.one_of(_short_text, st.lists(_short_text, max_size=16)),
    "stop_token_ids": st.lists(st.integers(0, 2000), max_size=3),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "stream": st.booleans(),
    "logit_bias": st.just({}),
    "ignore_eos": st.booleans(),
    "user": st.text(max_size=8),
}
_prompt = st.one_of(_short_text, st.lists(st.integers(0, 2495), min_size=1, max_size=6),
                    st.lists(st.one_of(_short_text, st.lists(st.integers(0, 2495), min_size=1, max_size=3)),
                             min_size=1, max_size=2))
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                  "content": st.one_of(st.text(max_size=4), st.lists(
                                      st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=2)}),
                                      max_size=2))})
VALID_COMPLETIONS = st.fixed_dictionaries({"prompt": _prompt}, optional={
    **_VALID, "logprobs": st.integers(0, 20), "echo": st.just(False), "suffix": st.just("")})
VALID_CHATS = st.tuples(
    st.fixed_dictionaries({"messages": st.lists(_message, min_size=1, max_size=2)}, optional={
        **_VALID, "max_completion_tokens": st.integers(1, 6), "response_format": st.just({"type": "text"}),
        "tools": st.just([])}),
    st.one_of(st.just({}), st.just({"logprobs": False}),
              st.fixed_dictionaries({"logprobs": st.just(True)}, optional={"top_logprobs": st.integers(0, 20)})),
).map(lambda t: {**t[0], **t[1]})


def _anything(valid):
    """Mostly valid values, sometimes values of the wrong type or range."""
    return st.one_of(valid, _junk_no_int)


def _hostile(valid_body: st.SearchStrategy, extra: dict) -> st.SearchStrategy:
    fields = {**{k: _anything(v) for k, v in _VALID.items()}, **extra}
    unknown = st.dictionaries(st.text(min_size=1, max_size=8), _junk_no_int, max_size=1)
    return st.tuples(valid_body, st.fixed_dictionaries({}, optional=fields), unknown).map(
        lambda t: {**t[2], **t[0], **t[1]})


HOSTILE_COMPLETIONS = _hostile(
    st.fixed_dictionaries({"prompt": _anything(st.one_of(_prompt, st.text(max_size=40),
                                                         st.lists(st.integers(-3, 3000), max_size=6)))}),
    {"logprobs": _anything(st.integers(-1, 25)), "echo": _anything(st.booleans()),
     "best_of": _anything(st.integers(0, 3)), "suffix": _anything(st.text(max_size=3)),
     "stream_options": _anything(st.fixed_dictionaries({}, optional={"include_usage": _anything(st.booleans())}))})
HOSTILE_CHATS = _hostile(
    st.fixed_dictionaries({"messages": _anything(st.lists(st.fixed_dictionaries(
        {"role": _anything(st.sampled_from(["system", "user", "assistant", "tool", "robot"])),
         "content": _anything(st.one_of(st.text(max_size=30), st.none(), st.lists(st.fixed_dictionaries(
             {"type": _anything(st.just("text")), "text": _anything(st.text(max_size=10))}), max_size=2)))},
        optional={"name": _anything(st.text(max_size=5))}), max_size=3))}),
    {"logprobs": _anything(st.booleans()), "top_logprobs": _anything(st.integers(-1, 25)),
     "max_completion_tokens": _anything(st.integers(-1, 6)),
     "response_format": _anything(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})),
     "tools": _anything(st.lists(_junk_no_int, max_size=1))})


@pytest.fixture(scope="module")
def app_client(demo_dir):
    from fastapi.testclient import TestClient

    from afs.serve import ServerConfig, create_app

    e = afs.load(demo_dir, threads=1, max_context=64)
    with TestClient(create_app(e, ServerConfig(model_name=MODEL, max_body_bytes=65536)),
                    raise_server_exceptions=False) as c:
        yield c


def _check_response(r, valid: bool) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    assert r.status_code == 200 or not valid, (r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = _sse(r.text.split("\n"))
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
    else:
        assert r.json()["choices"]


FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("path,bodies,valid", [
    ("/v1/completions", VALID_COMPLETIONS, True), ("/v1/chat/completions", VALID_CHATS, True),
    ("/v1/completions", HOSTILE_COMPLETIONS, False), ("/v1/chat/completions", HOSTILE_CHATS, False),
], ids=["valid-completions", "valid-chats", "hostile-completions", "hostile-chats"])
@FUZZ
@given(data=st.data())
def test_fuzz_request_schema(app_client, path, bodies, valid, data):
    """Valid bodies succeed; anything else is a 4xx in OpenAI's shape, never a 5xx."""
    _check_response(app_client.post(path, json=data.draw(bodies)), valid=valid)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode),
                     _junk.map(lambda v: json.dumps(v).encode()[:200])))
def test_fuzz_raw_bodies_no_5xx(app_client, raw):
    for path in ("/v1/completions", "/v1/chat/completions"):
        _check_response(app_client.post(path, content=raw, headers={"content-type": "application/json"}), valid=False)


def test_import_without_server_extra():
    """afs imports with fastapi and uvicorn absent; afs-serve then says how to get them."""
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "import afs, afs.serve\n"
            "from afs.serve.cli import main\n"
            "main(['/nonexistent'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert r.returncode == 1, r.stderr
    assert "pip install 'afs[serve]'" in r.stderr
