"""The OpenAI-compatible server over a real socket, happy paths: uvicorn on a free port, httpx as
the client, outputs checked against generate() on the same weights. Hostile input:
test_server_hostile.py; the openai SDK: test_server_openai.py; SIGTERM: test_server_shutdown.py."""

import asyncio
import json
import signal

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from server_utils import (chunks_of, expected_text, running, serve_process, sse_data,  # noqa: E402
                          wait_idle)

from minimax01 import ModelConfig, MiniMaxForCausalLM  # noqa: E402
from minimax01.infer.chat import ChatTemplate  # noqa: E402
from minimax01.infer.engine import Engine  # noqa: E402
from minimax01.infer.server import create_app  # noqa: E402
from minimax01.tokenizer import ByteTokenizer  # noqa: E402

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOTS = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()


@pytest.fixture(scope="module")
def server(model):
    tok = ByteTokenizer()
    engine = Engine(model, tok, num_slots=SLOTS, max_context=256, prefill_chunk=512)
    app = create_app(engine, tok, model_name="debug", api_key=KEY)
    with running(app) as url:
        yield url, engine, tok, app


def test_health_models_and_auth(server):
    url, *_ = server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    r = httpx.get(f"{url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    models = httpx.get(f"{url}/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == "debug" and models["data"][0]["max_model_len"] == 256
    one = httpx.get(f"{url}/v1/models/debug", headers=AUTH).json()
    assert one["id"] == "debug" and one["object"] == "model"
    r = httpx.get(f"{url}/v1/models/gpt-4", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_completion_streaming_and_not(server, model):
    url, _, tok, _ = server
    prompt = "To be, or not"
    ids = tok.encode(prompt, add_bos=True)  # string prompts start with BOS, as in training
    want = expected_text(model, tok, ids, 12)
    body = {"model": "debug", "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["choices"][0]["text"] == want and data["choices"][0]["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12,
                             "total_tokens": len(ids) + 12,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=60,
                      json={**body, **usage}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        chunks = chunks_of(sse_data(s.iter_lines()))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    # token ids as the prompt, and log-probs
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                   json={**body, "prompt": ids, "logprobs": 2, "max_tokens": 3})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == 3 and all(len(t) <= 2 for t in lp["top_logprobs"])
    assert all(v <= 0 for v in lp["token_logprobs"])


def test_chat_streaming_and_not(server, model):
    url, _, tok, _ = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt_ids = tok.encode(ChatTemplate(tok).render(messages), add_bos=True)
    want = expected_text(model, tok, prompt_ids, 10)
    body = {"model": "debug", "messages": messages, "max_tokens": 10, "temperature": 0,
            "ignore_eos": True}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    msg = r.json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": want}
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={**body, "stream": True, "logprobs": True, "top_logprobs": 1}) as s:
        chunks = chunks_of(sse_data(s.iter_lines()))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert sum(len((c["choices"][0]["logprobs"] or {"content": []})["content"])
               for c in chunks[1:]) == 10
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_32_concurrent_requests(server, model):
    url, engine, tok, _ = server
    prompts = [f"request {i}: " + "abcdefgh"[: i % 8] for i in range(32)]
    wants = [expected_text(model, tok, tok.encode(p, add_bos=True), 8) for p in prompts]

    async def one(client, i):
        body = {"model": "debug", "prompt": prompts[i], "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}
        if i % 2:  # half of them stream
            text = ""
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text += json.loads(line[6:])["choices"][0]["text"]
            return text
        r = await client.post("/v1/completions", json=body)
        return r.json()["choices"][0]["text"]

    async def run_all():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    got = asyncio.run(run_all())
    assert got == wants
    wait_idle(url, SLOTS)


def test_disconnects_free_their_slots(server):
    url, engine, tok, app = server
    counts = app.state.runner.counts
    before = counts["aborted"]
    body = {"model": "debug", "prompt": "a long story", "max_tokens": 230, "temperature": 0,
            "ignore_eos": True}
    # a stream closed after its first chunk
    with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=60,
                      json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                break
    # a plain request whose client gives up
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", headers=AUTH, json=body, timeout=0.3)
    import time
    deadline = time.time() + 20
    while counts["aborted"] < before + 2:
        assert time.time() < deadline, counts
        time.sleep(0.05)
    wait_idle(url, SLOTS)
    # the server still answers
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**body, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_serve_command_finishes_a_short_stream_on_sigterm(model, tmp_path):
    ckpt = tmp_path / "tiny-ckpt"
    model.save_pretrained(ckpt)
    ByteTokenizer().save(ckpt)
    with serve_process(ckpt, "--max-context", "256", "--num-slots", "2", "--graceful-timeout",
                       "60", "--log-level", "warning") as (proc, url):  # ample on a busy CPU
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-ckpt"
        tok = ByteTokenizer()
        want = expected_text(model, tok, tok.encode("hello", add_bos=True), 40)
        body = {"model": "tiny-ckpt", "prompt": "hello", "max_tokens": 40, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as s:
            lines = s.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)  # mid-stream: within the grace period it completes
            rest = [line for line in lines if line.startswith("data: ")]
        chunks = chunks_of(sse_data([first] + rest))
        assert all("choices" in c for c in chunks), chunks[-1]
        assert "".join(c["choices"][0]["text"] for c in chunks) == want  # served in full
        assert proc.wait(timeout=30) == 0
