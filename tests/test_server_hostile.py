"""Hostile input to the server: every bad request is a 4xx in OpenAI's error shape naming the
offending `param` (and never reaches the engine); random bodies never give a 5xx; the API key is
checked before the body is read; numerically extreme but valid sampling values in one request
never fail the requests batched with it; a request whose row breaks (NaN logits) ends alone."""

import asyncio
import json
import random
import socket
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from server_utils import chunks_of, expected_text, running, sse_data, wait_idle  # noqa: E402

from minimax01 import ModelConfig, MiniMaxForCausalLM  # noqa: E402
from minimax01.infer.engine import Engine  # noqa: E402
from minimax01.infer.server import create_app  # noqa: E402
from minimax01.tokenizer import ByteTokenizer  # noqa: E402

KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOTS = 6
POISON_SEED = 666  # requests with this seed get NaN logits (PoisonEngine)


class PoisonEngine(Engine):
    """An engine whose model 'breaks' on the rows of requests seeded POISON_SEED."""

    def _sample(self, rows, logits):
        bad = [i for i, s in enumerate(rows) if s.params.seed == POISON_SEED]
        if bad:
            logits = logits.clone()
            logits[bad] = float("nan")
        return super()._sample(rows, logits)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()


@pytest.fixture(scope="module")
def server(model):
    tok = ByteTokenizer()
    engine = PoisonEngine(model, tok, num_slots=SLOTS, max_context=256, prefill_chunk=512)
    app = create_app(engine, tok, model_name="debug", api_key=KEY, max_body_bytes=1 << 20)
    with running(app) as url:
        yield url, engine, tok


def post(url, path, body=None, content=None, headers=AUTH, timeout=60):
    content = json.dumps(body).encode() if content is None else content  # \ud800 escaped
    return httpx.post(f"{url}{path}", headers={**headers, "Content-Type": "application/json"},
                      timeout=timeout, content=content)


def assert_error(r, status, param="?", code="?", fragment=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and err["type"]
    if param != "?":
        assert err["param"] == param, err
    if code != "?":
        assert err["code"] == code, err
    if fragment is not None:
        assert fragment in err["message"], err


C = {"model": "debug", "prompt": "hi", "max_tokens": 2}
M = {"model": "debug", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("patch,status,param,code", [
    ({"max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ({"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"max_tokens": "8"}, 400, "max_tokens", "invalid_type"),
    ({"max_tokens": 8.0}, 400, "max_tokens", "invalid_type"),
    ({"max_tokens": True}, 400, "max_tokens", "invalid_type"),
    ({"max_tokens": 2 ** 70}, 400, "max_tokens", "context_length_exceeded"),
    ({"max_tokens": 1000}, 400, "max_tokens", "context_length_exceeded"),
    ({"prompt": "x" * 300}, 400, "prompt", "context_length_exceeded"),
    ({"bogus": 1}, 400, "bogus", "unknown_parameter"),
    ({"Bogus-Field": 1}, 400, "Bogus-Field", "unknown_parameter"),
    ({"temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"temperature": -1}, 400, "temperature", "invalid_value"),
    ({"temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"top_p": 0}, 400, "top_p", "invalid_value"),
    ({"top_p": 1.5}, 400, "top_p", "invalid_value"),
    ({"top_k": -2}, 400, "top_k", "invalid_value"),
    ({"top_k": 2 ** 70}, 400, "top_k", "invalid_value"),
    ({"seed": 2 ** 64}, 400, "seed", "invalid_value"),
    ({"seed": -2 ** 63 - 1}, 400, "seed", "invalid_value"),
    ({"seed": "1"}, 400, "seed", "invalid_type"),
    ({"stream": "yes"}, 400, "stream", "invalid_type"),
    ({"stream_options": {"include_usage": "yes"}}, 400, "stream_options.include_usage", "?"),
    ({"n": 2}, 400, "n", "unsupported_value"),
    ({"logprobs": 99}, 400, "logprobs", "invalid_value"),
    ({"logprobs": -1}, 400, "logprobs", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ({"stop": [""]}, 400, "stop", "invalid_value"),
    ({"stop": "x" * 2000}, 400, "stop", "invalid_value"),
    ({"stop": [1]}, 400, "stop[0]", "invalid_type"),
    ({"stop_token_ids": [-1]}, 400, "stop_token_ids", "invalid_value"),
    ({"stop_token_ids": [10 ** 6]}, 400, "stop_token_ids", "invalid_value"),
    ({"logit_bias": {"abc": 1}}, 400, "logit_bias", "invalid_value"),
    ({"logit_bias": {"1": 500}}, 400, "logit_bias", "invalid_value"),
    ({"logit_bias": {"99999": 1}}, 400, "logit_bias", "invalid_value"),
    ({"logit_bias": {"1": "x"}}, 400, "logit_bias", "invalid_type"),
    ({"logit_bias": [1]}, 400, "logit_bias", "invalid_type"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_value"),
    ({"frequency_penalty": 3}, 400, "frequency_penalty", "invalid_value"),
    ({"suffix": "x"}, 400, "suffix", "unsupported_value"),
    ({"best_of": 2}, 400, "best_of", "unsupported_value"),
    ({"echo": True, "logprobs": 1}, 400, "echo", "unsupported_value"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "unsupported_value"),
    ({"prompt": 5}, 400, "prompt", "invalid_type"),
    ({"prompt": [1, 2, 99999]}, 400, "prompt", "invalid_value"),
    ({"prompt": [1, "a"]}, 400, "prompt[1]", "invalid_type"),
    ({"prompt": []}, 400, "prompt", "invalid_value"),
    ({"prompt": "\ud800x"}, 400, "prompt", "invalid_value"),
    ({"stop": ["ok", "\udfff"]}, 400, "stop[1]", "invalid_value"),
    ({"user": 5}, 400, "user", "invalid_type"),
    ({"model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"model": None}, 400, "model", "?"),
])
def test_bad_completion_requests(server, patch, status, param, code):
    url, *_ = server
    assert_error(post(url, "/v1/completions", {**C, **patch}), status, param, code)


def test_required_fields(server):
    url, *_ = server
    for path, body, field in [("/v1/completions", {"prompt": "x"}, "model"),
                              ("/v1/completions", {"model": "debug"}, "prompt"),
                              ("/v1/chat/completions", {"messages": M["messages"]}, "model"),
                              ("/v1/chat/completions", {"model": "debug"}, "messages")]:
        assert_error(post(url, path, body), 400, field, "missing_required_parameter")


@pytest.mark.parametrize("patch,status,param", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "extra": 1}]}, 400, "messages[0].extra"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a\udc00"}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]}, 400,
     "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": {}}]}]},
     400, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "r"}]}, 400,
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "tool", "content": "r", "tool_call_id": "nope"}]}, 400,
     "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     400, "messages[0].tool_calls"),
    ({"messages": [{"role": "function", "content": "r"}]}, 400, "messages[0].name"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400,
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}},
                {"type": "function", "function": {"name": "f"}}]}, 400,
     "tools[1].function.name"),
    ({"tools": [{"type": "retrieval"}]}, 400, "tools[0].type"),
    ({"tool_choice": "auto"}, 400, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}},
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tool_choice.function.name"),
    ({"max_completion_tokens": 10 ** 6}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages"),
    ({"metadata": {"k": 1}}, 400, "metadata.k"),
])
def test_bad_chat_requests(server, patch, status, param):
    url, *_ = server
    assert_error(post(url, "/v1/chat/completions", {**M, **patch}), status, param)


def test_context_length_code_on_both_endpoints(server):
    url, *_ = server
    assert_error(post(url, "/v1/chat/completions", {**M, "max_tokens": 10 ** 4}), 400,
                 "max_tokens", "context_length_exceeded")
    assert_error(post(url, "/v1/completions", {**C, "prompt": list(range(256))}), 400,
                 "prompt", "context_length_exceeded")
    # big enough to be parsed and tokenized off the event loop
    assert_error(post(url, "/v1/completions", {**C, "prompt": "x" * 300_000}), 400,
                 "prompt", "context_length_exceeded")


@pytest.mark.parametrize("raw,param,fragment", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b"", None, "empty"),
    (b"   ", None, "empty"),
    (b'{"model": "debug", "prompt": "\xff\xfe"}', None, "UTF-8"),
    (b'{"model": "debug", "prompt": "x", "temperature": NaN}', "temperature", "NaN"),
    (b'{"model": "debug", "prompt": "x", "top_p": -Infinity}', "top_p", "Infinity"),
    (b'{"model": "debug", "prompt": "x", "temperature": 1e999}', "temperature", "range"),
    (b'{"model": "debug", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", "max_tokens",
     "5001 digits"),
    (b'{"model": "debug", "prompt": "\\ud800x"}', "prompt", "surrogate"),
    (b'{"model": "debug", "prompt": "x", "logit_bias": {"\\udc00": 1}}', "logit_bias",
     "surrogate"),
    (b'{"model": "debug", "prompt": ' + b"[" * 100 + b"]" * 100 + b"}", "?", "nested"),
    (b'{"model": "debug", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", None, "nested"),
])
def test_bad_bodies(server, raw, param, fragment):
    url, *_ = server
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_error(post(url, path, content=raw), 400, param, fragment=fragment)


def test_huge_bodies_are_refused(server):
    url, *_ = server
    big = json.dumps({**C, "prompt": "x" * (2 << 20)}).encode()
    assert_error(post(url, "/v1/completions", content=big), 413, code="request_too_large")

    def chunked():  # no Content-Length: the limit holds while reading
        for _ in range(40):
            yield b" " * 65536
    r = httpx.post(f"{url}/v1/completions", content=chunked(),
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert_error(r, 413, code="request_too_large")


def test_auth_comes_before_the_body(server):
    url, *_ = server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path in ("/v1/completions", "/v1/chat/completions"):
            assert_error(post(url, path, content=b"{garbage", headers=headers), 401,
                         code="invalid_api_key")
        for path in ("/docs", "/openapi.json", "/redoc", "/v1/models", "/v1/models/debug"):
            assert_error(httpx.get(f"{url}{path}", headers=headers), 401)
    # a declared 1 GB body that never comes: answered at once, from the headers alone
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 1000000000\r\n\r\n{")
        t0 = time.time()
        reply = s.recv(65536).decode()
        assert reply.startswith("HTTP/1.1 401") and time.time() - t0 < 5, reply
    assert httpx.get(f"{url}/health").status_code == 200
    spec = httpx.get(f"{url}/openapi.json", headers=AUTH).json()
    assert "CompletionRequest" in spec["components"]["schemas"]
    assert httpx.get(f"{url}/docs", headers=AUTH).status_code == 200


def test_unknown_routes_and_methods(server):
    url, *_ = server
    assert_error(httpx.get(f"{url}/v1/nothing", headers=AUTH), 404)
    assert_error(httpx.get(f"{url}/v1/completions", headers=AUTH), 405)


def _fuzz_values(rng):
    return [None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63, -2 ** 64, 10 ** 30, 0.5, -0.0, 1e-300,
            5e-324, 1e308, "", "x", "\u0000", "é" * 3, "\ud800", [], [1], ["a"], [[1]], {},
            {"a": 1}, {"type": "text"}, [None], rng.random(), rng.randint(-10 ** 6, 10 ** 6),
            "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(5))]


FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n",
          "stream", "stream_options", "stop", "stop_token_ids", "seed", "logprobs",
          "top_logprobs", "logit_bias", "echo", "suffix", "best_of", "tools", "tool_choice",
          "response_format", "user", "ignore_eos", "presence_penalty", "max_completion_tokens",
          "zzz"]


def test_fuzzed_bodies_never_give_a_5xx(server, model):
    url, _, tok = server
    rng = random.Random(1234)

    async def one(client, path, body):
        if isinstance(body, dict) and body.get("stream") is True:
            async with client.stream("POST", path, json=body) as r:
                lines = [line async for line in r.aiter_lines()]
                return r.status_code, lines
        r = await client.post(path, content=json.dumps(body).encode())
        return r.status_code, r.json()

    bodies = []
    for i in range(240):
        path = "/v1/completions" if i % 2 else "/v1/chat/completions"
        body = dict(C if i % 2 else M, max_tokens=1)
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(FIELDS)] = rng.choice(_fuzz_values(rng))
        if rng.random() < 0.1:
            body = rng.choice(_fuzz_values(rng))
        bodies.append((path, body))

    async def run_all():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:
            sem = asyncio.Semaphore(16)

            async def limited(path, body):
                async with sem:
                    return await one(client, path, body)
            return await asyncio.gather(*(limited(p, b) for p, b in bodies))

    results = asyncio.run(run_all())
    statuses = [s for s, _ in results]
    assert all(s < 500 for s in statuses), [(b, r) for (b, (s, r)) in zip(bodies, results)
                                           if s >= 500][:3]
    assert statuses.count(200) >= 5 and sum(400 <= s < 500 for s in statuses) > 100
    for (path, body), (status, reply) in zip(bodies, results):
        if status != 200:
            assert set(reply["error"]) == {"message", "type", "param", "code"}, reply
        elif isinstance(reply, list):  # a stream: ends with [DONE], no error event
            events = sse_data(reply)
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e)
                                                  for e in events[:-1]), events
    wait_idle(url, SLOTS)
    ids = tok.encode("after the storm", add_bos=True)
    r = post(url, "/v1/completions", {**C, "prompt": "after the storm", "max_tokens": 6,
                                      "temperature": 0, "ignore_eos": True})
    assert r.json()["choices"][0]["text"] == expected_text(model, tok, ids, 6)


def test_extreme_sampling_values_fail_no_one(server, model):
    """Values that crashed the shared sampling step (and every request in it) before: valid,
    so they are sampled, numerically safely; a tiny temperature or top_p is greedy."""
    url, _, tok = server
    prompt = "the same prompt"
    ids = tok.encode(prompt, add_bos=True)
    greedy = expected_text(model, tok, ids, 12)
    base = {**C, "prompt": prompt, "max_tokens": 12, "ignore_eos": True}
    greedy_like = [{"temperature": 1e-40}, {"temperature": 5e-324}, {"top_p": 1e-300},
                   {"temperature": 2, "top_p": 1e-300}, {"top_k": 1, "temperature": 2},
                   {"temperature": 1e-30, "top_k": 2 ** 62}, {"temperature": 0, "top_k": 2 ** 62}]
    sampled = [{"temperature": 2, "top_k": 2 ** 63 - 1}, {"temperature": 2, "top_k": 10 ** 9},
               {"temperature": 2.0, "top_p": 1.0, "seed": -2 ** 63},
               {"temperature": 1, "logit_bias": {str(i): -100 for i in range(259)}},
               {"temperature": 1, "logit_bias": {str(i): 100 for i in range(256)}}]

    async def run_all():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:
            async def one(patch, stream):
                body = {**base, **patch, "stream": stream}
                if not stream:
                    r = await client.post("/v1/completions", json=body)
                    assert r.status_code == 200, (patch, r.text)
                    return r.json()["choices"][0]["text"]
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200, patch
                    chunks = chunks_of(sse_data([line async for line in r.aiter_lines()]))
                return "".join(c["choices"][0]["text"] for c in chunks)
            innocent = [one({"temperature": 0}, True) for _ in range(3)]
            return await asyncio.gather(*innocent, *(one(p, i % 2 == 0) for i, p in
                                                     enumerate(greedy_like + sampled)))

    got = asyncio.run(run_all())
    assert got[:3] == [greedy] * 3
    assert got[3:3 + len(greedy_like)] == [greedy] * len(greedy_like)
    assert all(isinstance(t, str) for t in got[3 + len(greedy_like):])
    wait_idle(url, SLOTS)


def test_a_broken_row_ends_alone(server, model):
    """NaN logits in one request's row: that request gets an error (a 500, or an error event
    and [DONE] on a stream) and the requests in the same steps are served in full."""
    url, _, tok = server
    prompt = "innocent"
    ids = tok.encode(prompt, add_bos=True)
    want = expected_text(model, tok, ids, 20)
    body = {**C, "prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True}

    async def run_all():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:
            async def stream(b):
                body = {**b, "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    return [line async for line in r.aiter_lines()]
            return await asyncio.gather(
                stream(body), client.post("/v1/completions", json={**body, "seed": POISON_SEED}),
                stream({**body, "seed": POISON_SEED}), client.post("/v1/completions", json=body))

    ok_stream, bad_plain, bad_stream, ok_plain = asyncio.run(run_all())
    assert "".join(c["choices"][0]["text"] for c in chunks_of(sse_data(ok_stream))) == want
    assert ok_plain.json()["choices"][0]["text"] == want
    assert_error(bad_plain, 500, None, "nonfinite_logits")
    events = sse_data(bad_stream)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == \
        "nonfinite_logits"
    wait_idle(url, SLOTS)
