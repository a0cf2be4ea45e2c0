"""Helpers of the server tests: an app on a real socket (uvicorn in a thread), the `serve` command
as a subprocess, server-sent events, and the expected greedy text."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn

from minimax01 import generate
from minimax01.infer.detok import TextStream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve `app` on a free port in this process; yields its base URL."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(15)


@contextlib.contextmanager
def serve_process(checkpoint, *extra):
    """`python -m minimax01 serve --checkpoint ...` on a free port, waited for until /health
    answers; yields (process, url). The process is killed if the test leaves it running."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minimax01", "serve", "--checkpoint",
                             str(checkpoint), "--port", str(port), *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def sse_data(lines) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def expected_text(model, tok, prompt_ids, n, **kw):
    """Greedy continuation by generate(), detokenized as a stream would be."""
    ids = generate(model, [prompt_ids], max_new_tokens=n, **kw)[0, len(prompt_ids):].tolist()
    stream = TextStream(tok)
    return "".join(stream.push(t) for t in ids) + stream.finish()


def wait_idle(url, slots, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = httpx.get(f"{url}/health").json()
        if h["running"] == 0 and h["waiting"] == 0 and h["free_slots"] == slots:
            return h
        time.sleep(0.05)
    raise AssertionError(f"server did not go idle: {h}")


def chunks_of(events: list[str]) -> list[dict]:
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]
