"""Post-training end to end on CPU: DPO data layouts and reference modes, GRPO rollouts through
the in-process engine (weights handed over in memory), rewards that rise on the synthetic
addition task, held-out DPO accuracy that rises, the paper's post-training stage preset, and a
mixed SFT -> DPO -> GRPO schedule killed mid-stage and resumed."""

import json
import math
import os
import signal
import time

import pytest
import torch

from minimax01 import ModelConfig, MiniMaxForCausalLM
from minimax01.cli import main
from minimax01.tokenizer import ByteTokenizer
from minimax01.train import stages as st
from minimax01.train.config_io import from_preset, set_value, to_toml
from minimax01.train.metrics import read_metrics
from minimax01.train.objectives import make_trainer
from minimax01.train.post.demo import dpo_config, rl_config
from minimax01.train.post.dpo_data import PairEncoder, collate_rows
from minimax01.train.post.logprobs import sequence_sums, token_logprobs
from minimax01.train.post.rollout import sync_weights
from minimax01.train.post.synthetic import write_format_docs, write_preferences
from minimax01.train.post.verifier import exact_match, load_verifier


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded 2-core machine: more threads only spin
    yield
    torch.set_num_threads(before)


def stage_metrics(run, index):
    folder = dict((i, f) for i, (_, f) in enumerate(st.stage_runs(run)))[index]
    return read_metrics(folder / "metrics.jsonl")


# ---------------------------------------------------------------------- DPO data
def test_packed_and_padded_pairs_give_the_sequence_logprobs_of_one_at_a_time():
    tok = ByteTokenizer()
    enc = PairEncoder(tok, max_len=16)
    pairs = [(7, enc.encode({"prompt": "2+2=", "chosen": "4", "rejected": "5"})),
             (3, enc.encode({"prompt": "10+1=", "chosen": "11", "rejected": "9 or so, longer"}))]
    # the long rejected answer is cut to 16 tokens: prompt (bos + 5) + 10
    assert len(pairs[1][1][1][0]) == 16 and enc.truncated == 1
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(ModelConfig.from_preset("debug")).float().eval()
    torch.set_grad_enabled(False)
    expect = []
    for _, pair in pairs:
        for tokens, plen in pair:
            logits = model(torch.tensor([tokens])).logits[0]
            lp = torch.log_softmax(logits, -1)
            expect.append(sum(lp[i, tokens[i + 1]] for i in range(plen - 1, len(tokens) - 1)))
    rows = [[pairs[0]], [pairs[1]]]
    for packed in (True, False):
        b = collate_rows(rows, 48, tok.pad_id, packed)
        assert b["pair_ids"].tolist() == [7, 3] and b["num_pairs"] == 2
        out = model(b["input_ids"], cu_seqlens=b.get("cu_seqlens"))
        lp = token_logprobs(out.logits, b["labels"]).reshape(-1)
        sums = sequence_sums(lp, b["seq_index"].reshape(-1), 4)
        assert sums.tolist() == pytest.approx([float(e) for e in expect], abs=1e-4)
        if packed:  # every sequence its own document, padding its own segment, per row
            # row 1: bos + "2+2=" + answer + eos = 7, twice, padding to 48; row 2: 6 + 3, 16
            assert b["cu_seqlens"].tolist() == [0, 7, 14, 48, 57, 73, 96]
    torch.set_grad_enabled(True)


def test_bad_preference_records_name_the_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, '
                    '"rejected": "c"}\n')
    cfg = dpo_config(tmp_path / "x")
    set_value(cfg, "data.source", str(path))
    with pytest.raises(ValueError, match=r"line 2: field 'chosen' must be a string"):
        make_trainer(cfg)


def test_dpo_raises_held_out_accuracy_and_precomputed_matches_the_model(tmp_path):
    cfg = dpo_config(tmp_path / "model", steps=30, eval_every=15)
    result = make_trainer(cfg).fit()
    evals = [r for r in read_metrics(tmp_path / "model/run/metrics.jsonl") if "eval_accuracy" in r]
    train = [r for r in read_metrics(tmp_path / "model/run/metrics.jsonl") if "margin" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_loss"] == pytest.approx(math.log(2))
    assert evals[-1]["eval_accuracy"] >= evals[0]["eval_accuracy"] + 0.3
    assert evals[-1]["eval_loss"] < 0.6 and result.step == 30
    assert train[-1]["margin"] > 0 and train[0]["chosen_reward"] == pytest.approx(0, abs=1e-5)
    # the same run with precomputed reference log-probs: the same numbers (one model in memory)
    pre = dpo_config(tmp_path / "pre", steps=3, reference="precomputed", eval_every=0)
    short = dpo_config(tmp_path / "short", steps=3, eval_every=0)
    make_trainer(pre).fit()
    make_trainer(short).fit()
    a = [r for r in read_metrics(tmp_path / "pre/run/metrics.jsonl") if "loss" in r]
    b = [r for r in read_metrics(tmp_path / "short/run/metrics.jsonl") if "loss" in r]
    for x, y in zip(a, b):
        for k in ("loss", "margin", "accuracy", "chosen_reward", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    sidecar = json.loads((tmp_path / "pre/run/reference_logps.json").read_text())
    assert len(sidecar["logps"]) == 600 and all(c < 0 and r < 0 for c, r in sidecar["logps"])


# ---------------------------------------------------------------------- RL
def test_verifier_loading():
    assert load_verifier("exact_match") is exact_match
    assert exact_match("1+1=", " 2\n", "2") == 1.0 and exact_match("1+1=", "3", "2") == 0.0
    assert load_verifier("os.path:join") is os.path.join
    for spec, match in [("nope", "module:function"), ("no_such_mod:f", "cannot import"),
                        ("os:no_such_fn", "has no")]:
        with pytest.raises(ValueError, match=match):
            load_verifier(spec)


def test_grpo_refuses_context_parallelism_and_bad_values(tmp_path):
    cfg = from_preset("debug")
    set_value(cfg, "train.objective", "grpo")
    set_value(cfg, "parallel.cp", 2)
    with pytest.raises(ValueError, match="parallel.cp and parallel.ep must be 1"):
        make_trainer(cfg)
    for key, value, match in [("train.rl.group_size", 1, "at least 2"),
                              ("train.rl.clip", "dual", "train.rl.clip must be one of"),
                              ("train.rl.pass_rate", [0.8, 0.2], "pass_rate"),
                              ("train.objective", "ppo", "train.objective must be one of")]:
        bad = from_preset("debug")
        set_value(bad, key, value)
        with pytest.raises(ValueError, match=match):
            bad.validate()


def test_weights_reach_the_engine_in_memory():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    a, b = MiniMaxForCausalLM(cfg), MiniMaxForCausalLM(cfg)
    pointers = [p.data_ptr() for p in b.parameters()]
    sync_weights(a, b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [p.data_ptr() for p in b.parameters()] == pointers  # in place: graphs stay valid


def test_grpo_raises_the_mean_reward_on_addition(tmp_path):
    """Format warm-up (random answers: reward ~1/5 by chance), then GRPO with the paper's
    clipping and KL; the mean reward of the rollouts rises."""
    cfg = rl_config(tmp_path, warmup_steps=40, rl_steps=24, rl_lr=3e-3, eval_every=12)
    results = st.run_stages(cfg)
    assert [r.step for r in results] == [40, 24]
    recs = [r for r in stage_metrics(tmp_path / "run", 1) if "reward" in r]
    first = sum(r["reward"] for r in recs[:6]) / 6
    last = sum(r["reward"] for r in recs[-6:]) / 6
    assert last > first + 0.1, (first, last)
    for r in recs:
        assert r["time_generate_s"] > 0 and r["time_train_s"] > 0 and r["kl"] >= 0
        assert 0 <= r["clip_frac"] <= 1 and r["response_length"] >= 1
    evals = [r["eval_reward"] for r in stage_metrics(tmp_path / "run", 1) if "eval_reward" in r]
    assert len(evals) == 3 and all(0 <= e <= 1 for e in evals)  # greedy: noisy at this size


# ---------------------------------------------------------------------- stages
def test_post_training_preset_is_the_papers_table():
    post = st.resolve_stages("minimax-01-post")
    assert [s["name"] for s in post] == ["sft-8k", "sft-1m", "dpo-8k", "dpo-1m", "rl-8k"]
    assert [s["seq_len"] for s in post] == [8192, 1032192, 8192, 1032192, 8192]
    assert [s["epochs"] for s in post] == [2, 2, 1, 1, 1]
    assert [s["batch_size"] for s in post] == [128, 80, 64, 64, 512]
    assert [s["optim"]["lr"] for s in post] == [1e-5, 3e-6, 5e-7, 5e-7, 1e-6]
    assert [s.get("train", {}).get("objective", "lm") for s in post] == \
        ["lm", "lm", "dpo", "dpo", "grpo"]
    assert [w for *_, w in post[1]["length_mixture"]] == [0.5, 0.5]
    cfg = from_preset("debug")
    set_value(cfg, "train.stages", "minimax-01-post")
    with pytest.raises(ValueError, match="2 epoch"):
        st.check_run(cfg)


def _child(argv):
    torch.set_num_threads(1)
    os._exit(main(argv))


def test_sft_dpo_grpo_schedule_resumes_in_the_right_stage(tmp_path):
    import multiprocessing as mp

    docs = write_format_docs(tmp_path / "docs.jsonl", 200, digits=1, max_sum=4)
    pairs = write_preferences(tmp_path / "pairs.jsonl", 100, digits=1)
    cfg = from_preset("debug")
    for k, v in {"data.source": str(docs), "data.eval_fraction": 0.0, "train.seq_len": 32,
                 "train.batch_size": 2, "train.save_every": 1, "train.eval_every": 0,
                 "train.sample_tokens": 0, "train.export": False, "train.progress": False,
                 "train.tensorboard": False, "train.out_dir": str(tmp_path / "run")}.items():
        set_value(cfg, k, v)
    cfg.train.stages = [
        {"name": "sft", "steps": 2},
        {"name": "dpo", "steps": 6, "init": "weights", "train": {"objective": "dpo"},
         "data": {"source": str(pairs)}},
        {"name": "rl", "steps": 2, "init": "weights",
         "train": {"objective": "grpo", "rl": {"prompts": "addition:1:4", "group_size": 2,
                                               "prompts_per_step": 2, "max_new_tokens": 2,
                                               "eval_prompts": 0}}}]
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    run = mp.get_context("fork").Process(target=_child, args=(["train", "--config", str(path)],))
    run.start()
    target = tmp_path / "run/stages/01-dpo/checkpoints/step_00000003"
    deadline = time.monotonic() + 240
    while not target.exists():
        assert run.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(run.pid, signal.SIGKILL)
    run.join()
    assert (tmp_path / "run/stages/00-sft/stage_done.json").exists()
    assert not (tmp_path / "run/stages/01-dpo/stage_done.json").exists()
    assert main(["train", "--config", str(path)]) == 0
    dpo = stage_metrics(tmp_path / "run", 1)
    steps = [r["step"] for r in dpo if "margin" in r]
    assert steps == list(range(1, 7))  # resumed after step 3 or later, every step once
    rl = stage_metrics(tmp_path / "run", 2)
    assert [r["step"] for r in rl if "reward" in r] == [1, 2]
    done = json.loads((tmp_path / "run/stages/02-rl/stage_done.json").read_text())
    assert done["step"] == 2


def scrambled_reward(prompt, completion, answer):
    """A verifier (train.rl.verifier = "test_post_training:scrambled_reward") whose rewards
    vary between any two completions, so advantages are not all zero."""
    return float(sum(map(ord, completion)) % 7)


def test_grpo_minibatches_after_the_first_see_a_ratio_other_than_one(tmp_path):
    """Two optimizer steps per rollout batch: the first minibatch's policy is the rollout
    policy (ratio exactly 1, nothing clipped); the second's has moved (ratio != 1)."""
    cfg = from_preset("debug")
    for k, v in {"train.objective": "grpo", "train.rl.prompts": "addition:1:4",
                 "train.rl.group_size": 4, "train.rl.prompts_per_step": 4,
                 "train.rl.minibatches": 2, "train.rl.max_new_tokens": 2,
                 "train.rl.eval_prompts": 0, "train.rl.clip": "ppo", "train.rl.kl": "none",
                 "train.rl.verifier": "test_post_training:scrambled_reward",
                 "train.steps": 2, "train.seq_len": 32, "train.log_every": 1,
                 "train.eval_every": 0, "train.save_every": 0, "optim.lr": 3e-2,
                 "optim.warmup_steps": 0, "optim.schedule": "constant", "train.export": False,
                 "train.sample_tokens": 0, "train.progress": False, "train.tensorboard": False,
                 "train.out_dir": str(tmp_path / "run")}.items():
        set_value(cfg, k, v)
    make_trainer(cfg).fit()
    recs = [r for r in read_metrics(tmp_path / "run/metrics.jsonl") if "ratio" in r]
    assert recs[0]["ratio"] == pytest.approx(1.0, abs=1e-6) and recs[0]["clip_frac"] == 0
    assert abs(recs[1]["ratio"] - 1.0) > 1e-4
    assert "reward" in recs[0] and "reward" not in recs[1]  # one rollout batch, two updates
