"""train.init_from on 2 gloo ranks (FSDP, and EP x FSDP): every rank's shards equal the
single-process model's slices, each rank reads about half the checkpoint, and LoRA gradients
under FSDP equal one process's (also with the frozen matrices in bf16 under autocast)."""

from __future__ import annotations

import pytest
import torch

from minimax01 import MiniMaxForCausalLM
from minimax01.config import ModelConfig
from minimax01.parallel.world import ParallelConfig, make_world
from minimax01.train.init_from import (checkpoint_config, fill_from_checkpoint, load_model,
                                       local_slices)
from minimax01.train.lora import apply_lora, cast_frozen, reset_lora

from dist_utils import run_workers

TARGETS = ["qkv_proj", "output_gate", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 259, (1, 16), generator=g)
    return dict(input_ids=ids, labels=ids, cu_seqlens=torch.tensor([0, 7, 16], dtype=torch.int32))


def _prepare(bf16: bool):
    """LoRA adapters; with `bf16` the frozen matrices in bf16, as the trainer holds them (FSDP
    groups of mixed dtypes)."""
    def prepare(model):
        apply_lora(model, 4, 8.0, TARGETS)
        if bf16:
            cast_frozen(model, torch.bfloat16)
    return prepare


def _lora_grads(model, bf16=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**_batch())
    out.lm_loss.backward()  # (the aux loss is a per-rank share under the global router)
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
            for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, size, path, par, ref_file):
    ref = torch.load(ref_file, weights_only=True)
    par = dict(par)
    bf16 = par.pop("bf16", False)
    world = make_world(ParallelConfig(**par))
    with torch.device("meta"):
        model = MiniMaxForCausalLM(checkpoint_config(path))
    model = world.parallelize(model)
    read = fill_from_checkpoint(model, path, world.device)
    total = sum(t.numel() * t.element_size() for t in ref["state"].values())
    assert 0.4 * total < read < 0.6 * total, (read, total)  # about half each
    for name, p in model.named_parameters():
        got = local_slices(p)
        if got is None:
            continue
        slices, local = got
        want = ref["state"][name]
        for s in slices:
            (a, b), = s.ranges
            want = want.narrow(s.dim, a, b - a)
        torch.testing.assert_close(local, want, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    # LoRA under this layout: the same gradients as one process on the same batch
    lora = load_model(path, world=world, parallel=world.cfg, prepare=_prepare(bf16))
    reset_lora(lora, 0)
    grads = _lora_grads(lora, bf16)
    assert grads.keys() == ref["grads"].keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref["grads"][n], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("par", [dict(dp_shard=2), dict(dp_shard=2, ep=2),
                                 dict(dp_shard=2, ep=2, bf16=True)], ids=["fsdp", "ep", "ep-bf16"])
def test_init_from_sharded_equals_one_process(tmp_path, par):
    torch.manual_seed(0)
    base = MiniMaxForCausalLM(ModelConfig.from_preset("debug", vocab_size=259)).float()
    base.save_pretrained(tmp_path / "ckpt", dialect="hf")
    bf16 = par.get("bf16", False)
    one = load_model(tmp_path / "ckpt", prepare=_prepare(bf16))
    reset_lora(one, 0)
    torch.save({"state": base.state_dict(), "grads": _lora_grads(one, bf16)}, tmp_path / "ref.pt")
    run_workers(_worker, 2, str(tmp_path / "ckpt"), par, str(tmp_path / "ref.pt"))
