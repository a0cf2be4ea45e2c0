"""The OpenAI-compatible server over a real socket: uvicorn on a free port, httpx as the client.
Outputs are checked against generate() on the same weights."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from minimax01 import ModelConfig, MiniMaxForCausalLM, generate
from minimax01.infer.chat import ChatTemplate
from minimax01.infer.detok import TextStream
from minimax01.infer.engine import Engine
from minimax01.infer.server import create_app
from minimax01.tokenizer import ByteTokenizer

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOTS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()


@pytest.fixture(scope="module")
def server(model):
    tok = ByteTokenizer()
    engine = Engine(model, tok, num_slots=SLOTS, max_context=256, prefill_chunk=512)
    app = create_app(engine, tok, model_name="debug", api_key=KEY)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine, tok, app
    srv.should_exit = True
    thread.join(15)


def expected_text(model, tok, prompt_ids, n):
    """Greedy continuation by generate(), detokenized as a stream would be."""
    ids = generate(model, [prompt_ids], max_new_tokens=n)[0, len(prompt_ids):].tolist()
    stream = TextStream(tok)
    return "".join(stream.push(t) for t in ids) + stream.finish()


def wait_idle(url, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = httpx.get(f"{url}/health").json()
        if h["running"] == 0 and h["waiting"] == 0 and h["free_slots"] == SLOTS:
            return h
        time.sleep(0.05)
    raise AssertionError(f"server did not go idle: {h}")


def sse_events(lines):
    events = []
    for line in lines:
        if line.startswith("data: "):
            events.append(line[6:])
    return events


def test_health_models_and_auth(server):
    url, *_ = server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    r = httpx.get(f"{url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    models = httpx.get(f"{url}/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == "debug" and models["data"][0]["max_model_len"] == 256


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
                             "total_tokens": len(ids) + 12}
    with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
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
    body = {"messages": messages, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    msg = r.json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": want}
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={**body, "stream": True, "logprobs": True, "top_logprobs": 1}) as s:
        events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks[1:]) == 10


def test_32_concurrent_requests(server, model):
    url, engine, tok, _ = server
    prompts = [f"request {i}: " + "abcdefgh"[: i % 8] for i in range(32)]
    wants = [expected_text(model, tok, tok.encode(p, add_bos=True), 8) for p in prompts]

    async def one(client, i):
        body = {"prompt": prompts[i], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
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
    wait_idle(url)


@pytest.mark.parametrize("body,status,fragment", [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "bogus": 1}, 400, "unknown field 'bogus'"),
    ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": 5}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "x" * 300}, 400, "context limit"),
    ({"prompt": "x", "max_tokens": 1000}, 400, "context limit"),
    ({"prompt": [1, 2, 99999]}, 400, "vocabulary"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
])
def test_bad_completion_requests(server, body, status, fragment):
    url, *_ = server
    r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"]


def test_bad_chat_requests_and_bodies(server):
    url, *_ = server
    cases = [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi", "extra": 1}]}, "extra"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "logprobs"),
        ({"messages": "hi"}, "messages"),
    ]
    for body, fragment in cases:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], (body, r.text)
    for raw in (b"{not json", b"[1, 2]", b""):
        r = httpx.post(f"{url}/v1/completions", content=raw, headers={
            **AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400 and "error" in r.json(), raw
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_disconnects_free_their_slots(server):
    url, engine, tok, app = server
    counts = app.state.runner.counts
    before = counts["aborted"]
    body = {"prompt": "a long story", "max_tokens": 230, "temperature": 0, "ignore_eos": True}
    # a stream closed after its first chunk
    with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=60,
                      json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                break
    # a plain request whose client gives up
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", headers=AUTH, json=body, timeout=0.3)
    deadline = time.time() + 20
    while counts["aborted"] < before + 2:
        assert time.time() < deadline, counts
        time.sleep(0.05)
    wait_idle(url)
    # the server still answers
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**body, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_chat_template_from_the_tokenizer():
    class Tok(ByteTokenizer):
        chat_template = ("{% for m in messages %}{% if m.role == 'tool' %}"
                         "{{ raise_exception('no tools here') }}{% endif %}"
                         "[{{ m.role }}]{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")

    t = ChatTemplate(Tok())
    assert t.name == "tokenizer"
    assert t.render([{"role": "user", "content": "hi"}]) == "[user]hi[assistant]"
    with pytest.raises(ValueError, match="no tools here"):
        t.render([{"role": "tool", "content": "x"}])
    assert ChatTemplate(ByteTokenizer()).render([{"role": "user", "content": "hi"}]) == \
        "<|user|>\nhi\n<|assistant|>\n"


def test_serve_command_shuts_down_cleanly_on_sigterm(model, tmp_path):
    ckpt = tmp_path / "tiny-ckpt"
    model.save_pretrained(ckpt)
    ByteTokenizer().save(ckpt)
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minimax01", "serve", "--checkpoint", str(ckpt),
                             "--port", str(port), "--max-context", "256", "--num-slots", "2",
                             "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-ckpt"
        want = expected_text(model, ByteTokenizer(), ByteTokenizer().encode("hello", add_bos=True),
                             40)
        body = {"prompt": "hello", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as s:
            lines = s.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)  # mid-stream: the stream still completes
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in [first] + rest[:-1]
                       if json.loads(e[6:])["choices"])
        assert text == want  # the checkpoint's weights, served in full despite SIGTERM
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
