"""`serve --tensor-parallel 2 --device cpu` over a real socket: the launcher starts two gloo ranks
that load their slices of a checkpoint in the official sharded layout (413 shards, legacy names);
the openai SDK gets exactly one process's greedy text (plain, streamed, concurrent requests);
SIGTERM stops every rank with status 0; a rank killed mid-service takes the server down with a
one-line error and status 1 instead of hanging."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from server_utils import expected_text, serve_process  # noqa: E402
from test_sliced_load import small_config, write_official  # noqa: E402

from minimax01 import MiniMaxForCausalLM  # noqa: E402
from minimax01.tokenizer import ByteTokenizer  # noqa: E402

ARGS = ("--tensor-parallel", 2, "--device", "cpu", "--max-context", 192, "--num-slots", 3,
        "--prefill-chunk", 32, "--log-level", "warning", "--tp-timeout", 60)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(small_config(vocab_size=300)).eval()
    path = write_official(model, tmp_path_factory.mktemp("tp") / "text01-mini")
    ByteTokenizer().save(path)
    return path, model


def children(pid: int) -> dict[int, int]:
    """rank -> pid of the processes `pid` started (read from /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            out[rank] = int(stat.parent.name)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_openai_sdk_against_tp_server_then_sigterm(ckpt):
    path, model = ckpt
    tok = ByteTokenizer()
    texts = ["The decay of lightning", "abc", "a much longer prompt that needs two prefill chunks "
             "of thirty-two tokens each"]
    want = [expected_text(model, tok, tok.encode(t, add_bos=True), 10) for t in texts]
    with serve_process(path, *ARGS) as (proc, url):
        ranks = children(proc.pid)
        assert sorted(ranks) == [0, 1]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        name = path.name
        got = {}

        def ask(i):
            r = client.completions.create(model=name, prompt=texts[i], max_tokens=10,
                                          temperature=0, extra_body={"ignore_eos": True})
            got[i] = r.choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [got.get(i) for i in range(3)] == want
        stream = client.completions.create(model=name, prompt=texts[0], max_tokens=10,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream) == want[0]
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["free_slots"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stdout.read().decode()
        deadline = time.time() + 5
        while any(alive(p) for p in ranks.values()):
            assert time.time() < deadline, "a rank outlived the launcher"
            time.sleep(0.1)


def test_a_dead_rank_takes_the_server_down(ckpt):
    path, _ = ckpt
    with serve_process(path, *ARGS) as (proc, url):
        ranks = children(proc.pid)
        r = httpx.post(f"{url}/v1/completions", json={"model": path.name, "prompt": "hi",
                                                      "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        ranks_before = dict(ranks)
        import os

        os.kill(ranks[1], signal.SIGKILL)
        code = proc.wait(30)
        out = proc.stdout.read().decode()
        assert code == 1, out
        assert "error: tensor-parallel rank 1 exited with status -9" in out, out
        assert "Traceback" not in out, out
        assert not any(alive(p) for p in ranks_before.values())
