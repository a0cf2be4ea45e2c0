"""The trainer in-process: metrics, checkpoints, export, accumulation, faults, refusals."""

import json

import pytest
import torch

from minimax01 import MiniMaxForCausalLM
from minimax01.cli import main
from minimax01.train import checkpointing as ckpt
from minimax01.train.config_io import parse_overrides, resolve
from minimax01.train.metrics import read_metrics
from minimax01.train.trainer import Trainer, TrainingDiverged

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"


def config(out_dir, *args, **train):
    base = ["--train.out_dir", str(out_dir), "--train.seq_len", "32", "--train.batch_size", "2",
            "--train.export", "false", "--train.sample_tokens", "0", "--train.tensorboard", "false",
            "--data.source", SHAKESPEARE, "--data.eval_fraction", "0.05"]
    for k, v in train.items():
        base += [f"--train.{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return resolve("debug", None, parse_overrides(base + list(args)))


def test_run_logs_saves_prunes_and_exports(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = config(out, "--optim.lr", "1e-2", steps=12, save_every=4, keep_last=2, log_every=1,
                 eval_every=6, export=True, sample_tokens=12)
    result = Trainer(cfg).fit()
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[0]["eval_loss"] > evals[-1]["eval_loss"] + 0.5
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "aux_loss", "grad_norm",
                "moe_load", "moe_drop_rate"):
        assert key in train[0], key
    assert train[-1]["tokens"] == 12 * 2 * 32
    assert len(train[0]["moe_load"]) == 4 and len(train[0]["moe_load"][0]) == 4
    assert all(abs(sum(row) - 1) < 1e-3 for row in train[0]["moe_load"])
    assert train[0]["moe_drop_rate"] == [0.0] * 4  # dropless by default
    assert 0 < train[0]["aux_loss"] < 0.01  # coef 0.001 x (about top_k = 2)
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 0.5, (first, last)
    # the newest two checkpoints are kept, each complete
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [8, 12]
    state = ckpt.read_state(result.checkpoint)
    assert state["step"] == 12 and state["tokens"] == 12 * 64 and state["data"]["split"] == "train"
    assert (out / "config.toml").is_file()
    # the export loads and gives the held-out loss the run measured at its end
    model = MiniMaxForCausalLM.from_pretrained(out / "model")
    trainer = Trainer(config(tmp_path / "other", steps=1))
    assert trainer.evaluate(model) == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert result.sample is not None and result.sample.startswith("def ")
    assert "sample:" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out / "model"), "--prompt", "ROMEO:",
                 "--max-new-tokens", "5"]) == 0


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    no_aux = ["--model.router_aux_loss_coef", "0", "--data.eval_fraction", "0"]
    big = Trainer(config(tmp_path / "a", *no_aux, steps=3, batch_size=4, log_every=1,
                         eval_every=0)).fit()
    small = Trainer(config(tmp_path / "b", *no_aux, steps=3, batch_size=2, grad_accum=2,
                           log_every=1, eval_every=0)).fit()
    a, b = read_metrics(tmp_path / "a/metrics.jsonl"), read_metrics(tmp_path / "b/metrics.jsonl")
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    assert big.tokens == small.tokens == 3 * 4 * 32


def test_batch_size_warmup_in_the_loop(tmp_path):
    # grad_accum 4 with marks at 128 and 384 tokens: 1, then 2, then 4 micro-batches of 64 tokens
    cfg = config(tmp_path / "w", "--optim.batch_warmup_tokens", "[128, 384]", steps=6,
                 grad_accum=4, log_every=1, eval_every=0)
    Trainer(cfg).fit()
    tokens = [r["tokens"] for r in read_metrics(tmp_path / "w/metrics.jsonl") if "loss" in r]
    assert tokens == [64, 128, 256, 384, 640, 896]


class NaNTrainer(Trainer):
    """Poisons the loss of the forward passes whose (1-based) call number is in `bad`."""

    def __init__(self, cfg, bad):
        super().__init__(cfg)
        self.bad, self.calls = bad, 0

    def _forward(self, model, batch):
        out, lm_sum, n = super()._forward(model, batch)
        if model.training:
            self.calls += 1
            if self.calls in self.bad:
                lm_sum = lm_sum * float("nan")
        return out, lm_sum, n


def test_non_finite_step_is_skipped_and_logged(tmp_path):
    out = tmp_path / "nan"
    trainer = NaNTrainer(config(out, steps=5, log_every=1, eval_every=0, save_every=0), bad={3})
    result = trainer.fit()
    records = read_metrics(out / "metrics.jsonl")
    assert {"step": 3, "event": "skipped", "reason": "non-finite loss"} in records
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4, 5]
    assert result.step == 5


def test_repeated_non_finite_steps_stop_the_run_keeping_the_checkpoint(tmp_path):
    out = tmp_path / "nan"
    trainer = NaNTrainer(config(out, steps=20, save_every=2, eval_every=0,
                                max_bad_steps=3), bad=set(range(4, 100)))
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row .*step_00000002"):
        trainer.fit()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]  # no checkpoint of a bad state


def test_resume_with_an_incompatible_config_is_refused(tmp_path):
    out = tmp_path / "r"
    Trainer(config(out, steps=2, eval_every=0)).fit()
    with pytest.raises(ValueError, match=r"cannot resume from .*step_00000002.*model.hidden_size "
                                         r"\(checkpoint 64, now 32\)"):
        Trainer(config(out, "--model.hidden_size", "32", steps=4))
    with pytest.raises(ValueError, match=r"train.seq_len \(checkpoint 32, now 16\)"):
        Trainer(config(out, steps=4, seq_len=16))
    longer = Trainer(config(out, steps=3, eval_every=0)).fit()  # more steps: fine
    assert longer.step == 3


@pytest.mark.parametrize("args, message", [
    (["--data.source", "/no/such/place"], "no such file or folder: /no/such/place"),
    (["--train.seq_len", "99999999"], "exceeds the model's max_position_embeddings"),
    (["--data.tokenizer", "/no/tok.json"], "no tokenizer at /no/tok.json"),
    (["--model.vocab_size", "258", "--model.pad_token_id", "0"],
     "has 259 ids but model.vocab_size is 258"),
])
def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["train", "--preset", "debug", "--train.out_dir", str(out)] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err, err
    assert not out.exists()
    rc = main(["train", "--preset", "debug", "--train.out_dir", str(out), "--data.source",
               str(empty)])
    assert rc == 2 and "no non-empty data files" in capsys.readouterr().err
    assert not out.exists()


def test_half_written_checkpoints_are_ignored_and_cleaned(tmp_path, capsys):
    out = tmp_path / "p"
    Trainer(config(out, steps=2, save_every=2, eval_every=0)).fit()
    root = ckpt.checkpoint_root(out)
    (root / ".tmp-step_00000004").mkdir()                    # killed while writing
    (root / "step_00000006").mkdir()                         # not a checkpoint of ours
    (root / "step_00000006" / "__0_0.distcp").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(out) == root / "step_00000002"
    result = Trainer(config(out, steps=3, save_every=2, eval_every=0)).fit()
    assert result.step == 3
    err = capsys.readouterr().err
    assert "warning: checkpoint " in err and "step_00000006 is damaged (manifest.json is missing)" in err
    assert sorted(p.name for p in root.iterdir()) == ["damaged-step_00000006", "step_00000002",
                                                      "step_00000003"]
    state = json.loads((root / "step_00000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 1


def test_checkpoint_restores_model_optimizer_and_rng(tmp_path):
    out = tmp_path / "c"
    trainer = Trainer(config(out, steps=2, save_every=2, eval_every=0))
    trainer.fit()
    model = trainer.build_model()
    from minimax01.train.optim import build_optimizer

    opt = build_optimizer(model, trainer.cfg.optim)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out), model, opt, trainer.world)
    assert state["step"] == 2
    assert all(len(opt.state[p]) == 3 for p in model.parameters())  # step, exp_avg, exp_avg_sq
    assert float(opt.state[model.lm_head.weight]["step"]) == 2.0
    again = Trainer(config(tmp_path / "c2", steps=2, save_every=2, eval_every=0))
    again.fit()
    model2 = again.build_model()
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "c2"), model2,
                         build_optimizer(model2, again.cfg.optim), again.world)
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n  # same seed and data: bit-identical runs


def test_hf_tokenizer_json_trains_and_exports(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([SHAKESPEARE], trainers.BpeTrainer(vocab_size=300, special_tokens=[
        "<unk>", "<s>", "</s>", "<pad>"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    out = tmp_path / "bpe"
    cfg = config(out, "--data.tokenizer", str(path), "--model.vocab_size", "300",
                 "--model.bos_token_id", "1", "--model.eos_token_id", "2",
                 "--model.pad_token_id", "3", steps=2, eval_every=0, export=True)
    trainer = Trainer(cfg)
    assert trainer.tokenizer.bos_id == 1 and trainer.tokenizer.eos_id == 2
    batch = trainer.data.next_batch()
    assert batch["input_ids"].max() < 300 and batch["input_ids"][0, 0] != trainer.tokenizer.pad_id
    trainer.fit()
    from minimax01.tokenizer import load_tokenizer

    loaded = load_tokenizer(out / "model")
    assert loaded.encode("ROMEO: hi") == trainer.tokenizer.encode("ROMEO: hi")


def test_activation_checkpointing_and_token_drop_switches(tmp_path):
    runs = {}
    for name, extra in (("plain", {}), ("ac", {"activation_checkpointing": True})):
        Trainer(config(tmp_path / name, steps=2, log_every=1, eval_every=0, **extra)).fit()
        runs[name] = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    for a, b in zip(runs["plain"], runs["ac"]):  # recomputation changes nothing
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    Trainer(config(tmp_path / "drop", "--model.capacity_factor", "0.5", steps=2, log_every=1,
                   eval_every=0)).fit()
    rates = read_metrics(tmp_path / "drop" / "metrics.jsonl")[0]["moe_drop_rate"]
    assert len(rates) == 4 and all(r >= 0.5 - 1e-6 for r in rates)  # capacity is half the load
