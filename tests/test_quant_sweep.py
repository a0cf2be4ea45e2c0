"""`benchmarks/quant_slice.py --sweep` on the CPU (Triton's interpreter, tiny widths): the
workers check and time configs, a config that crashes its worker (injected abort) is reported and
the rest of its batch still runs in a fresh worker, the winners come out as a paste-able SHIPPED
entry whose configs the kernel accepts, and the saved JSON feeds `--winners`."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "quant_slice.py")


@pytest.mark.slow
def test_sweep_tiny_on_cpu_survives_a_crash(tmp_path):
    out = tmp_path / "sweep.json"
    crash = [1, 32, 256, 1, 4, 2]  # the first decode config (GEMV): its worker aborts in it
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--sweep",
                        "--sweep-limit", "2", "--sweep-no-dense", "--batches", "1",
                        "--sweep-only", "--sweep-fault", json.dumps(crash), "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())["sweep"]
    by = {tuple(r["config"]): r for r in res["configs"]}
    assert len(by) == 4  # 2 decode + 2 prefill configs, each accounted for
    assert "crashed" in by[tuple(crash)]["error"]
    ran = [r for c, r in by.items() if c != tuple(crash)]
    assert all(r.get("cases") and all("ms" in c and c["rel_err"] < 2 ** -7 for c in r["cases"])
               for r in ran)
    keys = {tuple(w["key"]) for w in res["winners"]}
    # w13 [8, 192, 64] and w2 [8, 64, 96] at decode b=1 (2 rows) and prefill 64 (128 rows)
    assert keys == {("int8", 192, 64, 8, 2), ("int8", 64, 96, 8, 2), ("int8", 192, 64, 8, 128),
                    ("int8", 64, 96, 8, 128)}
    assert all(w["config"] != crash for w in res["winners"])
    assert {r["matrix"] for r in res["paths"]["paths"]} == {"w13", "w2"}
    assert all(r["dequant_rel_err"] < 2 ** -7 for r in res["paths"]["paths"])
    assert "SHIPPED['cpu'] = {" in p.stdout and "DEQUANT_MIN_ROWS" in p.stdout
    # the printed entry is valid Python whose configs the kernel accepts
    from minimax01.ops.quant import triton_w8 as tw

    text = p.stdout[p.stdout.index("SHIPPED['cpu'] = {"):]
    text = text[:text.index("\n}\n") + 3]
    ns = {"SHIPPED": {}}
    exec(text, ns)
    assert {k: tw.check_config(v) for k, v in ns["SHIPPED"]["cpu"].items()}.keys() == keys
