"""train.stages: each stage's config (overrides, budgets, presets, errors), the data mixture by
document length (shares, purity, exact resume), and staged runs: killed mid-stage, or stopped at
a stage boundary, then re-run with the same command == uninterrupted, record for record."""

import json
import math
import multiprocessing as mp
import os
import random
import signal
import time

import pytest
import torch

from minimax01.cli import main
from minimax01.tokenizer import ByteTokenizer
from minimax01.train import checkpointing as ckpt
from minimax01.train import stages as st
from minimax01.train.config import RunConfig
from minimax01.train.config_io import from_preset, load_toml, set_value, to_toml
from minimax01.train.data.mixture import LengthMixture, check_mixture
from minimax01.train.data.sources import open_source
from minimax01.train.metrics import read_metrics

TIMING_KEYS = {"tokens_per_s", "memory_gib", "mfu"}


def write_docs(path, n=300, seed=0):
    """Short documents of 'a's (5-40 bytes) and long ones of 'b's (100-300 bytes)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            long = i % 3 == 0
            k = rng.randint(100, 300) if long else rng.randint(5, 40)
            c = "b" if long else "a"
            f.write(json.dumps({"text": "".join(rng.choice(c + c.upper()) for _ in range(k))}) + "\n")
    return path


def base_config(tmp_path, docs):
    cfg = from_preset("debug")
    for key, value in {"data.source": str(docs), "data.eval_fraction": 0.05,
                       "train.out_dir": str(tmp_path / "run"), "train.batch_size": 2,
                       "train.seq_len": 32, "train.save_every": 2, "train.log_every": 1,
                       "train.eval_every": 3, "train.eval_batches": 1, "train.sample_tokens": 0,
                       "train.export": False, "train.tensorboard": False, "train.progress": False,
                       "optim.schedule": "cosine", "optim.warmup_steps": 2}.items():
        set_value(cfg, key, value)
    return cfg


STAGES = [{"name": "short", "steps": 5},
          {"name": "long", "seq_len": 64, "rope_theta": 1e5, "batch_size": 2, "tokens": 6 * 128,
           "length_mixture": [[0, 64, 0.5], [64, math.inf, 0.5]], "optim": {"lr": 1e-3}}]


# ---------------------------------------------------------------------- configs
def test_stage_configs_apply_their_overrides(tmp_path):
    cfg = base_config(tmp_path, write_docs(tmp_path / "d.jsonl"))
    cfg.train.stages = STAGES
    st.check_run(cfg)
    a, b = (st.stage_config(cfg, STAGES, i) for i in range(2))
    assert a.train.steps == 5 and a.train.seq_len == 32 and a.train.seed == 0
    assert b.train.seq_len == 64 and b.train.steps == 6 and b.train.seed == 1
    assert b.model.build().rope_theta == 1e5 and a.model.build().rope_theta == 10_000.0
    assert b.optim.lr == 1e-3 and a.optim.lr == cfg.optim.lr
    assert b.data.length_mixture[1][1] == math.inf
    assert b.train.out_dir.endswith("stages/01-long") and not b.train.stages
    # ceil(tokens / tokens per step)
    odd = st.stage_config(cfg, [{"tokens": 129, "seq_len": 64}], 0)
    assert odd.train.steps == math.ceil(129 / 128)
    # round trip through TOML (array of tables with inf and nested tables)
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert load_toml(tmp_path / "c.toml").to_dict() == cfg.to_dict()
    plan = st.plan(cfg)
    assert [p["steps"] for p in plan] == [5, 6] and plan[1]["tokens"] == 6 * 128


@pytest.mark.parametrize("stage,match", [
    ({"steps": 2, "seq_length": 8}, "unknown key 'seq_length'; did you mean 'seq_len'"),
    ({"steps": 2, "tokens": 10}, "exactly one of tokens"),
    ({"name": "x"}, "exactly one of tokens"),
    ({"steps": 2, "model": {"hidden_size": 8}}, "cannot change the model's shapes"),
    ({"steps": 2, "train": {"stepz": 3}}, "unknown config key train.stepz"),
    ({"steps": 2, "init": "warm"}, "init must be"),
    ({"steps": 2, "length_mixture": [[0, 10, -1]]}, "weight >= 0"),
    ({"steps": 2, "length_mixture": [[0, 10, 1], [5, 20, 1]]}, "overlap"),
    ({"steps": 2, "name": "a b"}, "name must be"),
])
def test_bad_stages_name_the_problem(tmp_path, stage, match):
    cfg = base_config(tmp_path, write_docs(tmp_path / "d.jsonl"))
    cfg.train.stages = [stage]
    with pytest.raises(ValueError, match=match):
        st.check_run(cfg)


def test_presets_are_the_papers_schedules():
    text01 = st.resolve_stages("minimax-01")
    assert [s["seq_len"] for s in text01] == [131072, 524288, 1048576]
    assert [s["rope_theta"] for s in text01] == [5e6, 1e7, 1e7]
    assert [s["tokens"] for s in text01] == [300e9, 32e9, 26e9]
    assert [[w for *_, w in s["length_mixture"]] for s in text01] == \
        [[0.3, 0.7, 0.0], [0.35, 0.35, 0.3], [0.3, 0.3, 0.4]]
    m1 = st.resolve_stages("minimax-m1")
    assert len(m1) == 4 and m1[0]["seq_len"] == 32768 and m1[-1]["seq_len"] == 1048576
    with pytest.raises(ValueError, match="unknown preset"):
        st.resolve_stages("minimax-02")
    small = st.scaled("minimax-01", 1 / 32, 1e-6)
    assert [s["seq_len"] for s in small] == [4096, 16384, 32768]
    assert small[0]["tokens"] == pytest.approx(300e3) and small[0]["length_mixture"][0][1] == 1024
    cfg = RunConfig()
    set_value(cfg, "train.stages", "minimax-01")  # a preset by name validates as a whole
    st.check_run(cfg)
    set_value(cfg, "train.stages", "minimax-m1")
    with pytest.raises(ValueError, match="exactly one of tokens"):
        st.check_run(cfg)


def test_scaled_preset_prints_valid_toml(tmp_path, capsys):
    assert st.main(["minimax-01", "--length-scale", "1/32", "--token-scale", "1e-6"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "s.toml").write_text("[model]\npreset = \"debug\"\n" + text.replace(
        "[[train.stages]]", "[[train.stages]]"))
    cfg = load_toml(tmp_path / "s.toml")
    assert [s["seq_len"] for s in cfg.train.stages] == [4096, 16384, 32768]


# ---------------------------------------------------------------------- the length mixture
def mixture(docs, weights, seed=0, seq_len=24):
    tok = ByteTokenizer()
    return LengthMixture(open_source(str(docs)), tok, [[0, 64, weights[0]], [64, math.inf, weights[1]]],
                         seq_len, tok.pad_id, seed, 0.0, True, True, True)


def test_mixture_rows_follow_the_weights_and_come_from_their_bucket(tmp_path):
    docs = write_docs(tmp_path / "d.jsonl", n=600)
    mix = mixture(docs, [0.3, 0.7])
    counts = [0, 0]
    for r in range(400):
        b = mix.bucket_of_row(r)
        row = mix.next_row()
        counts[b] += 1
        letters = {chr(t).lower() for t in row[0] if t < 256}
        assert letters == ({"a"} if b == 0 else {"b"})  # short rows hold short documents only
    assert abs(counts[1] / 400 - 0.7) < 0.07
    only_long = mixture(docs, [0.0, 1.0])
    assert {only_long.bucket_of_row(r) for r in range(50)} == {1}
    with pytest.raises(ValueError, match="weight"):
        check_mixture([[0, 10, 0.0]])


def test_mixture_resumes_exactly(tmp_path):
    docs = write_docs(tmp_path / "d.jsonl")
    a = mixture(docs, [0.5, 0.5], seed=3)
    for _ in range(37):
        a.next_row()
    state = json.loads(json.dumps(a.state_dict()))
    b = mixture(docs, [0.5, 0.5], seed=3)
    b.load_state_dict(state)
    for _ in range(30):
        assert a.next_row() == b.next_row()


def test_mixture_refuses_empty_buckets_and_synthetic(tmp_path):
    docs = write_docs(tmp_path / "d.jsonl")
    tok = ByteTokenizer()
    empty = LengthMixture(open_source(str(docs)), tok, [[0, 64, 1.0], [5000, 6000, 1.0]], 24,
                          tok.pad_id, 0, 0.0, True, True, True)
    with pytest.raises(ValueError, match="no training documents of 5000 to 6000 tokens"):
        empty.check()
    with pytest.raises(ValueError, match="synthetic"):
        LengthMixture(open_source("synthetic", synthetic_length=100), tok, [[0, 64, 1.0]], 24,
                      tok.pad_id, 0, 0.0, True, True, True)


# ---------------------------------------------------------------------- staged runs
def staged_toml(tmp_path, name, stages=STAGES):
    cfg = base_config(tmp_path, tmp_path / "d.jsonl")
    cfg.train.out_dir = str(tmp_path / name)
    cfg.train.stages = stages
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(cfg))
    return path


def _child(argv):
    torch.set_num_threads(1)
    os._exit(main(argv))


def start(argv):
    proc = mp.get_context("fork").Process(target=_child, args=(argv,))
    proc.start()
    return proc


def run_child(argv):
    proc = start(argv)
    proc.join()
    return proc.exitcode


def comparable(run):
    out = []
    for _, folder in st.stage_runs(run):
        out.append([{k: v for k, v in r.items() if k not in TIMING_KEYS}
                    for r in read_metrics(folder / "metrics.jsonl")])
    return out


def test_staged_run_resumes_mid_stage_and_at_a_boundary_like_an_uninterrupted_run(tmp_path):
    write_docs(tmp_path / "d.jsonl")
    ref = start(["train", "--config", str(staged_toml(tmp_path, "ref"))])
    ref.join()
    assert ref.exitcode == 0
    expect = comparable(tmp_path / "ref")
    assert [len([r for r in s if "loss" in r]) for s in expect] == [5, 6]
    done = json.loads((tmp_path / "ref/stages/00-short/stage_done.json").read_text())
    assert done["step"] == 5 and done["checkpoint"].endswith("step_00000005")

    # killed (SIGKILL) in the middle of the second stage, then the same command again
    killed = staged_toml(tmp_path, "killed")
    run = start(["train", "--config", str(killed)])
    target = tmp_path / "killed/stages/01-long/checkpoints/step_00000002"
    deadline = time.monotonic() + 120
    while not target.exists():
        assert run.is_alive() and time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(run.pid, signal.SIGKILL)
    run.join()
    assert ckpt.latest_checkpoint(tmp_path / "killed/stages/01-long") is not None
    again = start(["train", "--config", str(killed)])
    again.join()
    assert again.exitcode == 0
    assert comparable(tmp_path / "killed") == expect

    # stopped at the boundary: only the first stage was configured; then both
    # (in child processes with one thread, like the reference: the in-process thread count can
    # differ and change the float reduction order)
    first = staged_toml(tmp_path, "boundary", STAGES[:1])
    assert run_child(["train", "--config", str(first)]) == 0
    assert not (tmp_path / "boundary/stages/01-long").exists()
    both = staged_toml(tmp_path, "boundary")
    assert run_child(["train", "--config", str(both)]) == 0
    assert comparable(tmp_path / "boundary") == expect

    # a finished stage whose settings changed is refused, naming the key
    changed = [dict(STAGES[0], steps=6), STAGES[1]]
    bad = staged_toml(tmp_path, "boundary", changed)
    assert main(["train", "--config", str(bad)]) == 2


def _adam_steps(cfg, checkpoint):
    from minimax01 import MiniMaxForCausalLM
    from minimax01.parallel import checkpoint as dcp_checkpoint
    from minimax01.train.optim import build_optimizer

    model = MiniMaxForCausalLM(cfg.model.build()).float()
    opt = build_optimizer(model, cfg.optim)
    dcp_checkpoint.load(checkpoint, model, opt)
    return int(next(iter(opt.state.values()))["step"])


@pytest.mark.parametrize("mode,steps", [("continue", 4), ("weights", 1)])
def test_init_continue_keeps_adamw_state_and_weights_starts_fresh(tmp_path, mode, steps):
    write_docs(tmp_path / "d.jsonl")
    stages = [{"name": "a", "steps": 3}, {"name": "b", "steps": 1, "init": mode}]
    cfg = load_toml(staged_toml(tmp_path, mode, stages))
    results = st.run_stages(cfg)
    assert [r.step for r in results] == [3, 1]
    assert _adam_steps(cfg, results[1].checkpoint) == steps


def test_init_from_an_hf_model(tmp_path):
    from minimax01 import MiniMaxForCausalLM
    from minimax01.train.optim import build_optimizer
    from minimax01.train.trainer import Trainer

    write_docs(tmp_path / "d.jsonl")
    cfg = load_toml(staged_toml(tmp_path, "hf", [{"name": "a", "steps": 2,
                                                  "train": {"export": True}}]))
    st.run_stages(cfg)
    export = tmp_path / "hf/stages/00-a/model"
    sub = st.stage_config(cfg, [{"name": "c", "steps": 1, "init_from": str(export)}], 0)
    trainer = Trainer(sub, init=st._initializer(export, False, sub.optim))
    model = trainer.build_model()
    trainer.init(model, build_optimizer(model, sub.optim))
    ref = MiniMaxForCausalLM.from_pretrained(export)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2.float())
    with pytest.raises(FileNotFoundError, match="neither a training checkpoint"):
        st._initializer(tmp_path, False, sub.optim)(model, build_optimizer(model, sub.optim))


def test_shipped_context_extension_configs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "ablations"
    for path, lengths in ((root / "context_extension.toml", [4096, 32768]),
                          (root / "tiny" / "context_extension.toml", [256, 2048])):
        cfg = load_toml(path)
        st.check_run(cfg)
        plan = st.plan(cfg)
        assert [p["seq_len"] for p in plan] == lengths
        assert plan[1]["rope_theta"] > plan[0]["rope_theta"] and plan[1]["length_mixture"]


def test_corpus_of_whole_documents(tmp_path, capsys):
    from minimax01.eval import ablation

    text = tmp_path / "t"
    text.mkdir()
    for i in range(6):
        (text / f"f{i}.txt").write_text("x" * (3000 * (i + 1)) + "\n")  # 3K..18K: several pieces
    spec = tmp_path / "c.toml"
    spec.write_text(f'[data]\ntext = "{text}"\nnatural_unit = "document"\ndocuments = 4\n'
                    f'synthetic_fraction = 0.0\nheldout_characters = 100\n')
    assert ablation.main(["corpus", str(spec), str(tmp_path / "out")]) == 0
    docs = [json.loads(line)["text"] for line in (tmp_path / "out/train.jsonl").read_text().splitlines()]
    assert [len(d) for d in docs] == [3001, 6001, 9001, 12001]  # whole files, not 4 KiB pieces
    assert len((tmp_path / "out/heldout.txt").read_text()) == 15001
    spec.write_text(spec.read_text().replace("documents = 4", "documents = 5"))
    assert ablation.main(["corpus", str(spec), str(tmp_path / "out")]) == 2  # another spec
    assert "another [data] spec" in capsys.readouterr().err


def test_mixture_over_text_files_measures_whole_files(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(8):  # short files of 'a', long files (several 4 KiB pieces) of 'b'
        (folder / f"s{i}.txt").write_text("a" * (50 + i) + "\n")
        (folder / f"l{i}.txt").write_text(("b" * 99 + "\n") * (60 + i))
    tok = ByteTokenizer()
    mix = LengthMixture(open_source(str(folder)), tok, [[0, 1000, 1.0], [1000, math.inf, 1.0]],
                        32, tok.pad_id, 0, 0.0, True, True, True)
    mix.check()
    for r in range(200):
        b = mix.bucket_of_row(r)
        letters = {chr(t) for t in mix.next_row()[0] if t < 256} - {"\n"}
        assert letters == ({"a"} if b == 0 else {"b"})


def test_schema_checks_the_form_and_the_trainer_refuses_a_staged_config(tmp_path, capsys):
    """RunConfig.validate (the schema) checks train.stages' form and data.length_mixture; the
    stages' own configs are check_run's (the overrides go through config_io). A Trainer never
    runs a staged config's base as if it had no stages."""
    from minimax01.train.trainer import Trainer

    cfg = base_config(tmp_path, write_docs(tmp_path / "d.jsonl"))
    for value, match in (("minimax-02", "unknown preset 'minimax-02'"),
                         ([{"steps": 1}, 3], "list of tables")):
        cfg.train.stages = value
        with pytest.raises(ValueError, match=match):
            cfg.validate()
    cfg.train.stages = []
    cfg.data.length_mixture = [[0, 10, 1], [5, 20, 1]]
    with pytest.raises(ValueError, match="data.length_mixture: buckets overlap"):
        cfg.validate()
    cfg.data.length_mixture = []
    cfg.train.stages = STAGES
    cfg.validate()
    with pytest.raises(ValueError, match="train.stages is set"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    # the train command checks every stage before it prints or runs anything
    path = staged_toml(tmp_path, "bad", [{"name": "a", "steps": 1, "train": {"seq_len": 1}}])
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    assert "train.stages[0] (a): train.seq_len must be at least 2" in capsys.readouterr().err
