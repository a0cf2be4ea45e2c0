"""`python -m minimax01 generate` writes its text as it is produced: the first pieces reach a
reader while the process is still generating (it used to print everything at the end)."""

import os
import signal
import subprocess
import sys
import time

import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.tokenizer import ByteTokenizer


def test_generate_streams_to_stdout(tmp_path):
    torch.manual_seed(0)
    MiniMaxForCausalLM(ModelConfig.from_preset("debug")).save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "minimax01", "generate", "--checkpoint",
                             str(tmp_path), "--prompt", "stream:", "--max-new-tokens", "2000",
                             "--temperature", "1", "--seed", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "0"})
    try:
        got, deadline = b"", time.time() + 120
        while len(got) < 12:  # unbuffered reads of whatever has been written
            assert time.time() < deadline, got
            piece = os.read(proc.stdout.fileno(), 4096)
            assert piece, (got, proc.stderr.read())
            got += piece
        assert proc.poll() is None  # still generating: the text came as it was produced
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
