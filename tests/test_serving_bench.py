"""benchmarks/serving.py --tiny, briefly: the real HTTP server under Poisson conversations with
shared prefixes; no request fails, the prefix cache serves the shared prefixes (and nothing when
it is off), and every row has its latency numbers."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serving.py"


def test_serving_benchmark_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("serving_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["serving_bench"] = bench  # (its dataclasses look their module up)
    spec.loader.exec_module(bench)
    out = tmp_path / "serving.json"
    assert bench.main(["--tiny", "--rates", "20", "--num-conversations", "5", "--configs",
                       "all,no-prefix-cache", "--json", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"all", "no-prefix-cache"}
    for r in rows.values():
        assert r["errors"] == 0 and r["requests"] >= 5
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in
                   ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "output_tok_per_s"))
        assert r["ttft_p99_ms"] >= r["ttft_p50_ms"]
    # the same workload: the same prompts; only the cache differs
    assert rows["all"]["prompt_tokens"] == rows["no-prefix-cache"]["prompt_tokens"]
    assert rows["all"]["cache_hit_rate"] > 0 and rows["no-prefix-cache"]["cached_tokens"] == 0
    assert "TTFT p50" in capsys.readouterr().out
