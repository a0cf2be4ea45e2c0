"""MFU options of the trainer: selective recompute (`train.recompute`) gives the gradients of no
recompute while keeping fewer activations; low-precision weights cast once per optimizer step
(`train.cast_weights = per_step`) equal autocast over fp32 weights within bf16 rounding, leave
fp32 masters (and fp32 gradients for the optimizer) after every step, and resume exactly."""

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.train import checkpointing as ckpt
from minimax01.train.metrics import read_metrics
from minimax01.train.precision import StepCastWeights
from minimax01.train.recompute import RECOMPUTE, apply_recompute
from minimax01.train.trainer import Trainer

from test_train_loop import config


def _grads_and_saved(policy):
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(ModelConfig.from_preset("debug", capacity_factor=1.0)).double()
    model.train()
    apply_recompute(model, policy)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 13, 24], dtype=torch.int32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        out = model(ids, labels=ids, cu_seqlens=cu)
    (out.loss + 0.01 * out.aux_loss).backward()
    return {n: p.grad for n, p in model.named_parameters()}, sum(saved), out.loss.detach()


def test_recompute_policies_equal_no_recompute_and_keep_less():
    ref, kept, loss = _grads_and_saved("none")
    sizes = {}
    for policy in RECOMPUTE[1:]:
        grads, sizes[policy], lo = _grads_and_saved(policy)
        assert torch.equal(lo, loss)
        for n, g in grads.items():
            torch.testing.assert_close(g, ref[n], rtol=1e-12, atol=1e-14, msg=f"{policy} {n}")
    assert sizes["full"] < min(sizes["attention"], sizes["moe"])
    assert max(sizes["attention"], sizes["moe"]) < kept
    with pytest.raises(ValueError, match="train.recompute must be one of"):
        apply_recompute(MiniMaxForCausalLM(ModelConfig.from_preset("debug")), "some")


def test_step_cast_weights_fold_grads_into_fp32_masters():
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(ModelConfig.from_preset("debug"))
    cast = StepCastWeights(model, torch.bfloat16)
    masters = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = {}
    for k in range(2):  # two micro-batches under per-use autocast: the reference
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids[k:k + 1], labels=ids[k:k + 1]).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    cast.begin()
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32  # lookups, not matmuls
    assert model.model.norm.weight.dtype == torch.float32
    for k in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids[k:k + 1], labels=ids[k:k + 1]).loss.backward()
    cast.end()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
        assert torch.equal(p.detach(), masters[n]), n  # the masters are untouched
        torch.testing.assert_close(p.grad, ref[n], rtol=0.05, atol=2e-3 * ref[n].abs().max())


def _losses(path):
    return [r["loss"] for r in read_metrics(path / "metrics.jsonl") if "loss" in r]


def test_per_step_cast_trains_like_autocast_and_resumes_exactly(tmp_path):
    common = dict(log_every=1, eval_every=0, grad_accum=2, dtype="bfloat16")
    flags = ["--optim.schedule", "constant", "--optim.warmup_steps", "0", "--optim.lr", "3e-3"]
    Trainer(config(tmp_path / "use", *flags, steps=2, **common)).fit()
    Trainer(config(tmp_path / "step", *flags, steps=2, cast_weights="per_step", **common)).fit()
    for a, b in zip(_losses(tmp_path / "use"), _losses(tmp_path / "step")):
        assert b == pytest.approx(a, rel=2e-2)
    half = tmp_path / "half"  # 1 step, saved, then resumed to 2: the same weights
    Trainer(config(half, *flags, steps=1, save_every=1, cast_weights="per_step", **common)).fit()
    trainer = Trainer(config(half, *flags, steps=2, save_every=2, cast_weights="per_step",
                             **common))
    assert trainer.resume_from is not None
    trainer.fit()
    models = []
    for run in (tmp_path / "step", half):
        model = trainer.build_model()
        ckpt.load_checkpoint(ckpt.latest_checkpoint(run), model, None, trainer.world)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        models.append(model)
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("args, message", [
    (dict(recompute="sometimes"), "train.recompute must be one of"),
    (dict(recompute="moe", activation_checkpointing=True), "contradicts train.recompute"),
    (dict(cast_weights="always"), "train.cast_weights must be one of"),
    (dict(cast_weights="per_step", dtype="float32"), "needs a low-precision train.dtype"),
])
def test_bad_mfu_options_name_the_field(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        Trainer(config(tmp_path / "bad", **args))
