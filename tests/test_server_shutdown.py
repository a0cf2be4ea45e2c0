"""SIGTERM on `serve` with requests in flight, over a real socket with a subprocess: each open
stream ends with a final event (an error "server_shutdown") and `data: [DONE]`, plain and queued
requests get a 503 in OpenAI's shape, no traceback, exit status 0 within the grace period plus a
bounded margin."""

import json
import signal
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from server_utils import serve_process, sse_data  # noqa: E402

from minimax01 import ModelConfig, MiniMaxForCausalLM  # noqa: E402
from minimax01.tokenizer import ByteTokenizer  # noqa: E402

GRACE = 1.5


def test_sigterm_ends_every_open_stream_with_a_final_event(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "m"
    MiniMaxForCausalLM(ModelConfig.from_preset("debug")).save_pretrained(ckpt)
    ByteTokenizer().save(ckpt)
    with serve_process(ckpt, "--max-context", "4096", "--num-slots", "3", "--graceful-timeout",
                       GRACE, "--log-level", "warning") as (proc, url):
        body = {"model": "m", "prompt": "once upon a time", "max_tokens": 4000,
                "temperature": 0, "ignore_eos": True}
        results, started = {}, threading.Barrier(3)

        def stream(i):
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                              timeout=60) as s:
                lines = s.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                started.wait()
                results[i] = sse_data([first] + list(lines))

        def plain(i):
            results[i] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # both streams are running (so they hold 2 of the 3 slots)
        threads += [threading.Thread(target=plain, args=(i,)) for i in (2, 3)]  # 3: queued
        for t in threads[2:]:
            t.start()
        deadline = time.time() + 60
        while True:  # until the plain requests are in: one running, one queued
            h = httpx.get(f"{url}/health", timeout=10).json()
            if h["running"] + h["waiting"] == 4:
                break
            assert time.time() < deadline, h
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=GRACE + 20)
        code = proc.wait(timeout=GRACE + 20)
        elapsed = time.monotonic() - t0
        output = proc.stdout.read().decode()
    assert code == 0, output
    assert elapsed < GRACE + 10, elapsed
    for i in (0, 1):
        events = results[i]
        assert events[-1] == "[DONE]", events[-3:]
        final = json.loads(events[-2])
        assert final["error"]["code"] == "server_shutdown", final
        assert all("choices" in json.loads(e) for e in events[:-2])  # text chunks before it
    for i in (2, 3):
        r = results[i]
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutdown", r.text
    for bad in ("Traceback", "CancelledError", "Cancel ", "ERROR"):
        assert bad not in output, output
