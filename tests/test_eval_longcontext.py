"""MR-NIAH generation and scoring, extrapolation lengths, the eval command's --train-length and
--plot, the plot command, and every figure: the expected series are drawn (checked on the Figure
before saving) and the file is a valid, non-empty PNG of the expected size."""

import json

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.cli import main
from minimax01.config import LINEAR, SLIDING
from minimax01.eval import mrniah, plots
from minimax01.eval import retrieval as retrieval_mod
from minimax01.eval.perplexity import perplexity
from minimax01.eval.retrieval import RetrievalResult, evaluate_retrieval, extrapolation_lengths
from minimax01.tokenizer import ByteTokenizer

pytest.importorskip("matplotlib")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()


def check_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == plots.PNG_MAGIC and len(data) > min_bytes
    w, h = plots.png_size(path)
    assert w > 300 and h > 200
    return w, h


# ---------------------------------------------------------------------- MR-NIAH
@pytest.mark.parametrize("length,depth", [(400, 0.0), (2000, 0.5), (6000, 1.0)])
def test_mrniah_examples(length, depth):
    ex = mrniah.make_mrniah(7, seed=1, length=length, depth=depth)
    assert ex == mrniah.make_mrniah(7, seed=1, length=length, depth=depth)  # deterministic
    assert ex != mrniah.make_mrniah(8, seed=1, length=length, depth=depth)
    assert abs(len(ex.text) - length) < 120
    rounds = ex.prompt.split("User: Describe the ")[1:]
    topic = ex.answer.split(" is ")[0][4:]
    asked = [i for i, r in enumerate(rounds) if r.startswith(topic + ".")]
    assert len(asked) == 1  # the asked round appears exactly once ...
    assert abs(asked[0] - depth * (len(rounds) - 1)) <= 1  # ... at its depth
    assert ex.prompt.endswith(f"Repeat exactly what you said about the {topic}.\nAssistant: ")
    assert f"Assistant: {ex.answer}\n" in ex.prompt
    assert len(mrniah.components(ex.answer)) == 3


def test_mrniah_scoring_is_adjusted_recall():
    ans = "The lamp QX4 is quiet, amber and 412."
    assert mrniah.score(ans, ans) == 1.0
    assert mrniah.score(ans, "The lamp QX4 is quiet, teal and 412.\nmore") == pytest.approx(2 / 3)
    assert mrniah.score(ans, "nothing\nquiet amber 412") == 0.0  # only the first line counts
    assert mrniah.score(ans, "41 quieter ambers") == 0.0  # whole words
    with pytest.raises(ValueError, match="length >= 160"):
        mrniah.make_mrniah(0, length=100)


def test_mrniah_evaluation_scores_fractions(monkeypatch):
    tok = ByteTokenizer()

    def fake_generate(model, prompts, max_new_tokens):  # two components right, then stop
        width = max(len(p) for p in prompts)
        rows = []
        for p in prompts:
            topic = tok.decode(p).split("said about the ")[-1].split(".\n")[0]
            answer = [a for a in tok.decode(p).split("Assistant: ") if a.startswith(f"The {topic} ")][0]
            wrong = answer.split("\n")[0].rsplit(" ", 1)[0] + " 000."
            cont = (tok.encode(wrong) + [10] * max_new_tokens)[:max_new_tokens]
            rows.append([258] * (width - len(p)) + p + cont)
        return torch.tensor(rows)

    monkeypatch.setattr(retrieval_mod, "generate", fake_generate)
    res = evaluate_retrieval(tiny_model(), tok, "mrniah", [300, 600], [0.25, 0.75], samples=2,
                             train_length=300)
    assert res.accuracy() == pytest.approx(2 / 3)
    assert all(s["score"] == pytest.approx(2 / 3) and not s["correct"] for s in res.samples)
    assert len({s["id"] for s in res.samples}) == 8
    assert "600 (2x)" in res.table()


def test_extrapolation_lengths():
    assert extrapolation_lengths(1024) == [256, 512, 1024, 2048, 4096]
    assert extrapolation_lengths(100, 2) == [25, 50, 100, 200]
    with pytest.raises(ValueError):
        extrapolation_lengths(0)


# ---------------------------------------------------------------------- figures
def grid_result(task="passkey", train_length=512):
    res = RetrievalResult(task, [256, 512, 1024, 2048], [0.0, 0.5, 1.0], train_length=train_length)
    for n in res.lengths:
        for d in res.depths:
            res.total[(n, d)] = 4
            res.correct[(n, d)] = 4 if n <= train_length else (2 if d < 1 else 1)
    return res


def test_retrieval_figure_draws_heatmaps_and_curves(tmp_path):
    a, b = grid_result("passkey"), grid_result("needle")
    fig = plots.retrieval_figure([a, b], ["passkey", "needle"], "demo")
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 2
    cells = heatmaps[0].images[0].get_array()
    assert cells.shape == (3, 4) and cells[0, 0] == 1.0 and cells[2, 3] == 0.25
    assert [t.get_text() for t in heatmaps[0].get_xticklabels()] == ["256", "512", "1K", "2K"]
    curve = fig.axes[2]
    assert plots.line_labels(fig)[-1] == ["passkey", "needle", "training length"]
    xs, ys = curve.get_lines()[0].get_data()
    assert list(xs) == [256, 512, 1024, 2048] and list(ys) == pytest.approx([1, 1, 1.25 / 3, 1.25 / 3])
    w, h = check_png(plots.save_png(fig, tmp_path / "r.png"))
    assert w > 3 * h / 2  # three panels side by side


def test_ppl_and_comparison_and_run_figures(tmp_path):
    model = tiny_model()
    res = perplexity(model, torch.randint(0, 256, (300,)), context=256, bucket_base=2)
    fig = plots.ppl_figure({"tiny": res}, train_length=128)
    assert plots.line_labels(fig) == [["tiny", "training length"]]
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == len(res.buckets)
    check_png(plots.save_png(fig, tmp_path / "ppl.png"))
    fig = plots.comparison_figure({"a": ([1, 2, 3], [3, 2, 1]), "b": ([1, 2], [1, 1])},
                                  "x", "y", "t")
    assert plots.line_labels(fig) == [["a", "b"]] and fig.axes[0].get_title() == "t"
    records = [{"step": 0, "eval_loss": 6.0}]
    records += [{"step": s, "loss": 6 - s / 10, "lr": 1e-3, "tokens_per_s": 100.0 + s,
                 "moe_load": [[0.5, 0.5], [0.9, 0.1]]} for s in range(1, 11)]
    records.append({"step": 10, "eval_loss": 5.0})
    fig = plots.run_figure(records, "run", boundaries=[(5, "long")])
    labels = plots.line_labels(fig)
    assert labels[0] == ["train loss", "held-out loss"] and labels[1] == ["tokens/s"]
    assert labels[2] == ["mean over layers", "worst layer", "balanced"]
    worst = fig.axes[2].get_lines()[1].get_ydata()
    assert list(worst) == [pytest.approx(1.8)] * 10  # 0.9 share x 2 experts
    check_png(plots.save_png(fig, tmp_path / "run.png"))
    with pytest.raises(ValueError, match="no loss"):
        plots.run_figure([{"step": 1}])


# ---------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model().save_pretrained(path, tokenizer=ByteTokenizer())
    return path


def test_eval_command_train_length_plot_and_json(checkpoint, tmp_path, capsys):
    png, js = tmp_path / "niah.png", tmp_path / "niah.json"
    assert main(["eval", "mrniah", "--checkpoint", str(checkpoint), "--train-length", "200",
                 "--depths", "0,1", "--samples", "1", "--device", "cpu", "--plot", str(png),
                 "--json", str(js)]) == 0
    out = json.loads(js.read_text())
    assert out["lengths"] == [200, 400, 800] and out["train_length"] == 200  # 50 and 100 < 160
    assert "800 (4x)" in capsys.readouterr().out
    check_png(png)
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 200)
    png2 = tmp_path / "ppl.png"
    assert main(["eval", "ppl", "--checkpoint", str(checkpoint), "--data", str(text),
                 "--context", "512", "--train-length", "128", "--device", "cpu",
                 "--plot", str(png2)]) == 0
    check_png(png2)


def test_plot_command_on_plain_and_staged_runs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 50.0,
             "moe_load": [[0.6, 0.4]]} for s in range(1, 6)] + [{"step": 5, "eval_loss": 4.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(run)]) == 0
    check_png(run / "plots" / "training.png")
    staged = tmp_path / "staged"
    for i, name in enumerate(["short", "long"]):
        d = staged / "stages" / f"{i:02d}-{name}"
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from minimax01.commands.plot import load_run

    records, boundaries = load_run(staged)
    assert boundaries == [(5, "long")]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    out = tmp_path / "s.png"
    assert main(["plot", str(staged), "--out", str(out)]) == 0
    check_png(out)
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_chunked_greedy_equals_generate():
    from minimax01 import generate as reference_generate

    model = MiniMaxForCausalLM(ModelConfig.from_preset(
        "debug", layer_types=[LINEAR, SLIDING] * 2, sliding_window=7)).eval()
    prompts = [list(range(5, 45)), [1, 2, 3], list(range(100, 131))]
    ours = retrieval_mod.generate(model, prompts, max_new_tokens=6, chunk=9)
    ref = reference_generate(model, prompts, max_new_tokens=6)
    assert ours.tolist() == ref.tolist()

