"""Optional dependencies never break a command at import time.

Each case runs in a subprocess where some optional packages look uninstalled (`sys.modules[name]
= None`: `import name` raises ModuleNotFoundError and `importlib.util.find_spec(name)` is None,
exactly as when the package is missing):

* without Triton, every module of the package imports, except the Triton kernel files
  themselves (`ops/**/triton_*.py`), which only the `triton` backends load;
* `serve` works after `pip install minimax01[server]` alone (no Triton, Pillow, matplotlib,
  transformers, pyarrow): health, a completion
  equal to generate();
* `info` and `generate` work with none of the optional extras."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from minimax01 import ModelConfig, MiniMaxForCausalLM, generate
from minimax01.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ["triton", "fastapi", "uvicorn", "httpx", "transformers", "pyarrow", "matplotlib",
            "tensorboard", "jinja2", "PIL"]


def _hide(names) -> str:
    return textwrap.dedent(f"""
        import sys
        for name in {list(names)!r}:
            sys.modules[name] = None  # looks uninstalled to import and to find_spec
        """)


def _python(code: str, *, timeout=180, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def _cli(hidden, argv) -> str:
    return _hide(hidden) + textwrap.dedent(f"""
        import runpy
        sys.argv = ["minimax01"] + {list(argv)!r}
        runpy.run_module("minimax01", run_name="__main__", alter_sys=True)
        """)


def test_every_module_imports_without_triton():
    code = _hide(["triton"]) + textwrap.dedent("""
        import importlib, pkgutil
        import minimax01
        failed, done = [], 0
        for m in pkgutil.walk_packages(minimax01.__path__, "minimax01."):
            leaf = m.name.rsplit(".", 1)[-1]
            if leaf.startswith("triton_") or leaf == "__main__":
                continue  # the kernels themselves (loaded by the triton backends); the CLI
            try:
                importlib.import_module(m.name)
                done += 1
            except Exception as e:
                failed.append(f"{m.name}: {type(e).__name__}: {e}")
        assert "triton" not in [k for k, v in sys.modules.items() if v is not None]
        print(done, "modules")
        assert not failed, failed
        """)
    done = _python(code)
    assert done.returncode == 0, done.stdout + done.stderr
    assert int(done.stdout.split()[0]) > 60


def test_info_and_generate_without_any_optional_extra(tmp_path):
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()
    model.save_pretrained(tmp_path / "ckpt")
    ByteTokenizer().save(tmp_path / "ckpt")
    code = _hide(OPTIONAL) + textwrap.dedent(f"""
        from minimax01.cli import main
        assert main(["info", "--preset", "debug"]) == 0
        print("=== generate")
        assert main(["generate", "--checkpoint", {str(tmp_path / "ckpt")!r}, "--prompt", "hi",
                     "--max-new-tokens", "6", "--temperature", "0"]) == 0
        """)
    done = _python(code)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    info, gen = done.stdout.split("=== generate")
    assert "parameters" in info.lower()
    prompt = ByteTokenizer().encode("hi", add_bos=True)
    want = generate(model, [prompt], max_new_tokens=6)[0, len(prompt):].tolist()
    assert ByteTokenizer().decode(want) in gen


def test_serve_without_triton():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    code = _cli(["triton", "PIL", "matplotlib", "transformers", "pyarrow"],
                ["serve", "--preset", "debug", "--port", str(port), "--device", "cpu",
                 "--max-context", "128", "--num-slots", "2", "--log-level", "warning"])
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        body = {"model": "debug", "prompt": "hello", "max_tokens": 5, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        torch.manual_seed(0)  # serve --preset seeds the weights with --seed (default 0)
        model = MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()
        prompt = ByteTokenizer().encode("hello", add_bos=True)
        want = generate(model, [prompt], max_new_tokens=5)[0, len(prompt):].tolist()
        assert json.loads(r.text)["choices"][0]["text"] == ByteTokenizer().decode(want)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
