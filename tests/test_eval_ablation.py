"""The ablation suites: the shipped configs are matched (parameters within 1% of the hybrid,
equal training FLOPs, the 7:1 pattern, the sliding window) and differ only in [model]; a micro
suite runs end to end (corpus, training, evals, tables, figures), resumes, and refuses bad
suites."""

import json
import shutil
from pathlib import Path

import pytest

from minimax01.cli import main
from minimax01.config import FULL, LINEAR, SLIDING
from minimax01.eval import ablation, plots

ROOT = Path(__file__).resolve().parents[1] / "configs" / "ablations"


@pytest.mark.parametrize("folder", [ROOT, ROOT / "tiny"])
def test_shipped_suites_are_matched(folder):
    suite = ablation.load_suite(folder)
    ablation.check_matched(suite)
    assert set(suite.runs) == {"softmax", "lightning", "hybrid", "hybrid_swa"}
    models = {n: c.model.build() for n, c in suite.runs.items()}
    assert set(models["softmax"].layer_types) == {FULL}
    assert set(models["lightning"].layer_types) == {LINEAR}
    for name, kind in (("hybrid", FULL), ("hybrid_swa", SLIDING)):
        types = models[name].layer_types
        assert types.count(LINEAR) == 7 * types.count(kind) and types[7] == kind
    assert models["hybrid_swa"].sliding_window == suite.seq_len("hybrid") // 8
    rows = ablation.arithmetic(suite)
    flops = [r["train_flops"] for r in rows]
    assert max(flops) / min(flops) < 1.05  # the same compute (up to one step each)
    assert all(abs(r["params_vs_reference"]) < 0.01 for r in rows)
    if folder == ROOT:
        assert 90e6 < models["hybrid"].num_parameters() < 110e6  # ~100M


def write_micro_suite(tmp_path):
    """Two 2-layer runs (softmax and lightning + sliding window), a few steps, small evals."""
    folder = tmp_path / "suite"
    folder.mkdir()
    common = ('[data]\neval_fraction = 0.05\n[optim]\nlr = 3e-3\nwarmup_steps = 1\n'
              'schedule = "constant"\n[train]\nbatch_size = 2\nseq_len = 128\ndtype = "float32"\n'
              'save_every = 2\nlog_every = 1\neval_every = 2\neval_batches = 1\n'
              'sample_tokens = 0\ntensorboard = false\nprogress = false\n')
    model = '[model]\npreset = "debug"\nnum_hidden_layers = 2\n'
    (folder / "soft.toml").write_text(model + 'intermediate_size = 69\n'
                                      'layer_types = ["full_attention", "full_attention"]\n' + common)
    (folder / "swa.toml").write_text(model + 'intermediate_size = 64\nsliding_window = 16\n'
                                     'layer_types = ["linear_attention", "sliding_attention"]\n'
                                     + common)
    text = tmp_path / "text.txt"
    text.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n"
                            for i in range(3000)))
    (folder / "suite.toml").write_text(f'''[suite]
runs = ["soft", "swa"]
reference = "swa"
param_tolerance = 0.01
budget = "tokens"
tokens = 512
[data]
text = "{text}"
documents = 60
synthetic_fraction = 0.5
tasks = ["passkey", "mrniah"]
min_length = 160
max_length = 300
heldout_characters = 3000
[eval]
tasks = ["passkey", "mrniah"]
depths = [0.5]
samples = 1
factor = 2
ppl_windows = 1
throughput_lengths = [64, 256]
batch_size = 4
''')
    return folder


def test_micro_suite_end_to_end_and_resume(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder = write_micro_suite(tmp_path)
    out = tmp_path / "out"
    assert main(["ablate", str(folder), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "## Parameters and compute" in text and "## Throughput" in text
    report = json.loads((out / "ablation.json").read_text())
    assert report["reference"] == "swa" and set(report["runs"]) == {"soft", "swa"}
    soft = report["runs"]["soft"]
    assert soft["loss_at"]["100%"] is not None and soft["eval_loss"] > 0
    assert set(soft["retrieval"]) == {"passkey", "mrniah"}
    assert list(soft["retrieval"]["passkey"]["by_length"]) == ["64", "128", "256"]
    assert list(soft["retrieval"]["mrniah"]["by_length"]) == ["256"]
    assert "vs_reference" in soft["retrieval"]["passkey"]  # significance against the reference
    assert [b["hi"] for b in soft["ppl_buckets"]][-1] == 256  # loss by position up to 2x
    assert set(soft["forward_tokens_per_s"]) == {"64", "256"}
    md = (out / "ablation.md").read_text()
    assert "| 256* |" in md or "256*" in md  # extrapolation marked
    corpus = json.loads((out / "data" / "corpus.json").read_text())
    assert corpus["documents"] == 60 and corpus["counts"]["natural"] > 0
    assert corpus["counts"]["passkey"] > 0 and corpus["counts"]["mrniah"] > 0
    for name in ("loss_by_flops", "loss_by_position", "passkey_by_length", "mrniah_by_length",
                 "passkey_heatmaps", "throughput"):
        path = out / f"{name}.png"
        assert path.read_bytes()[:8] == plots.PNG_MAGIC and path.stat().st_size > 5000
    # per-sample scores for `power compare`
    assert main(["power", "compare", str(out / "evals/soft/passkey.json"),
                 str(out / "evals/swa/passkey.json"), "--resamples", "500"]) == 0
    # a second run skips everything already done
    before = (out / "runs/soft/metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["ablate", str(folder), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "[soft] trained (2 steps): skipped" in log and "[swa] evaluated: skipped" in log
    assert (out / "runs/soft/metrics.jsonl").read_text() == before
    # more budget: the run resumes from its checkpoint and trains on
    shutil.rmtree(out / "evals")
    assert main(["ablate", str(folder), "--out", str(out), "--tokens", "1024", "--only", "soft",
                 "--phase", "train"]) == 0
    steps = [json.loads(l)["step"] for l in (out / "runs/soft/metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == [1, 2, 3, 4]
    assert main(["ablate", str(folder), "--out", str(out), "--phase", "report"]) == 2
    assert "not evaluated yet" in capsys.readouterr().err


def test_bad_suites_are_refused(tmp_path, capsys):
    folder = write_micro_suite(tmp_path)
    assert main(["ablate", str(tmp_path), "--dry-run"]) == 2
    assert "no suite.toml" in capsys.readouterr().err
    suite = folder / "suite.toml"
    good = suite.read_text()
    suite.write_text(good.replace("param_tolerance = 0.01", "param_tolerance = 0.001"))
    assert main(["ablate", str(folder), "--dry-run"]) == 2
    assert "outside the suite's param_tolerance" in capsys.readouterr().err
    suite.write_text(good.replace("samples = 1", "sample = 1"))
    assert main(["ablate", str(folder), "--dry-run"]) == 2
    assert "unknown key 'sample'; did you mean 'samples'" in capsys.readouterr().err
    suite.write_text(good)
    soft = folder / "soft.toml"
    soft.write_text(soft.read_text().replace("lr = 3e-3", "lr = 1e-3"))
    assert main(["ablate", str(folder), "--dry-run"]) == 2
    assert "[optim] lr differs" in capsys.readouterr().err


def test_loss_at_interpolates_between_records():
    from minimax01.eval.ablation_report import loss_at

    curve = [{"tokens": 100, "loss": 5.0}, {"tokens": 200, "loss": 4.0}, {"tokens": 400, "loss": 2.0}]
    assert loss_at(curve, 1.0) == 2.0
    assert loss_at(curve, 0.5) == 4.0
    assert loss_at(curve, 0.75) == pytest.approx(3.0)
    assert loss_at(curve, 0.1) == 5.0  # before the first record
    assert loss_at([], 0.5) is None
