"""Fine-tuning released checkpoints: train.init_from (both dialects, M1), LoRA (identity at
init, merge == unmerged, export loads), and a whole chat + LoRA run from a checkpoint."""

import json

import pytest
import torch

from minimax01 import MiniMaxForCausalLM
from minimax01.config import ModelConfig
from minimax01.tokenizer import ByteTokenizer
from minimax01.train.config_io import parse_overrides, resolve
from minimax01.train.init_from import check_model_fields, load_model
from minimax01.train.lora import apply_lora, lora_parameters, merge_lora, merge_state_dict
from minimax01.train.trainer import Trainer

TARGETS = ["qkv_proj", "output_gate", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug", vocab_size=259, **kw)).float()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _model()


def _ids():
    return torch.randint(0, 259, (1, 24), generator=torch.Generator().manual_seed(1))


def _as_m1(path):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="minimax_m1", architectures=["MiniMaxM1ForCausalLM"],
               shared_intermediate_size=0, shared_moe_mode="sigmoid")
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("dialect", ["legacy", "hf", "m1"])
def test_init_from_either_dialect(base, tmp_path, dialect):
    base.save_pretrained(tmp_path, dialect="legacy" if dialect == "m1" else dialect)
    if dialect == "m1":
        _as_m1(tmp_path)
    loaded = load_model(tmp_path)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded(_ids()).logits, base(_ids()).logits, rtol=0, atol=0)
    frozen = load_model(tmp_path, dtype=torch.bfloat16, trainable=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert frozen.model.layers[0].self_attn.slope.dtype == torch.float32


def test_model_fields_must_agree():
    ckpt = ModelConfig.from_preset("debug")
    assert check_model_fields(ckpt, "demo", {}) == ckpt  # the default preset: the checkpoint's
    assert check_model_fields(ckpt, "debug", {"router_aux_loss_coef": 0.01}) \
        == ckpt.replace(router_aux_loss_coef=0.01)
    with pytest.raises(ValueError, match=r"model.hidden_size = 128 but the checkpoint has 64"):
        check_model_fields(ckpt, "demo", {"hidden_size": 128})
    with pytest.raises(ValueError, match=r"model.preset 'small'.*hidden_size"):
        check_model_fields(ckpt, "small", {})


def test_lora_starts_at_the_base_and_merges(base, tmp_path):
    model = _model()
    ids = _ids()
    ref = model(ids).logits
    names = apply_lora(model, 4, 8.0, TARGETS)
    assert len(names) == 4 * 3 - 2 * 3 + 2 * 4  # 2 lightning x 3 + 2 softmax x 4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)  # B = 0
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.2)
    unmerged = model(ids).logits
    assert (unmerged - ref).abs().max() > 1e-2
    merged_sd = merge_state_dict(model.state_dict(), 2.0)
    assert not any("lora_" in k for k in merged_sd) and merged_sd.keys() == base.state_dict().keys()
    # the export: released (legacy) layout, loads through from_pretrained (what serve uses)
    from minimax01.checkpoint.hf import save_state_dict

    save_state_dict(merged_sd, model.config, tmp_path / "export", "legacy")
    exported = MiniMaxForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    torch.testing.assert_close(exported(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    merge_lora(model)  # in place, back to plain nn.Linear
    assert not lora_parameters(model)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def _write_chat(path, n=60):
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 7, (3 * i) % 5
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"{a}+{b}="},
                {"role": "assistant", "content": str(a + b)}]}) + "\n")


def test_chat_lora_run_from_a_checkpoint(base, tmp_path):
    base.save_pretrained(tmp_path / "base", dialect="hf", tokenizer=ByteTokenizer())
    _write_chat(tmp_path / "chat.jsonl")
    args = ["--train.init_from", str(tmp_path / "base"), "--data.source",
            str(tmp_path / "chat.jsonl"), "--data.format", "chat", "--data.eval_fraction", "0",
            "--train.lora.rank", "4", "--train.lora.alpha", "8", "--train.seq_len", "64",
            "--train.batch_size", "2", "--train.steps", "3", "--train.out_dir",
            str(tmp_path / "run"), "--train.sample_tokens", "0", "--train.tensorboard", "false",
            "--train.dtype", "float32", "--optim.lr", "5e-2", "--optim.warmup_steps", "0",
            "--train.progress", "false", "--train.eval_every", "0"]
    cfg = resolve(None, None, parse_overrides(args + ["--train.steps", "2"]))
    assert cfg.validate() == base.config  # the checkpoint's architecture
    assert Trainer(cfg).fit().export is not None
    # the same command with more steps resumes from the run's checkpoint (not the base)
    cfg = resolve(None, None, parse_overrides(args))
    trainer = Trainer(cfg)
    assert trainer.resume_from is not None
    result = trainer.fit()
    assert result.step == 3
    exported = MiniMaxForCausalLM.from_pretrained(result.export, dtype=torch.float32)
    old, new = base.state_dict(), exported.state_dict()
    assert new.keys() == old.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    # only the adapted projections moved (merged into their weights); experts, norms, embeddings,
    # router and lm_head are the checkpoint's, bit for bit
    assert changed and all(k.rsplit(".", 2)[-2] in TARGETS for k in changed)
    assert any("qkv_proj" in k for k in changed) and any("q_proj" in k for k in changed)


def test_init_from_refuses_a_bad_folder(tmp_path):
    cfg = resolve(None, None, parse_overrides(["--train.init_from", str(tmp_path / "none")]))
    with pytest.raises(ValueError, match="train.init_from: no checkpoint folder"):
        cfg.validate()
