"""DCP checkpoints of a parallelized model: saved on 4 ranks (FSDP x CP x EP), resumed on 2 ranks
(another layout) and in one process, model and optimizer state identical; HF export from a
sharded layout and offline from the DCP folder loads back as the same weights."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from minimax01.config import ModelConfig
from minimax01.model.model import MiniMaxForCausalLM
from minimax01.parallel import checkpoint as pckpt
from minimax01.parallel.world import ParallelConfig, make_world

from dist_utils import run_workers


def _model(seed):
    torch.manual_seed(seed)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug", capacity_factor=1.25))


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _full_optim(model, opt):
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))


def _train_step(model, opt, world):
    g = torch.Generator().manual_seed(5 + world.dp_rank)
    ids = torch.randint(0, 256, (1, 16), generator=g)
    cu = torch.tensor([0, 6, 16], dtype=torch.int32)
    out = model(**world.shard_batch(dict(input_ids=ids, labels=ids, cu_seqlens=cu)))
    out.loss.backward()
    opt.step()
    opt.zero_grad()


def _save_worker(rank, size, folder):
    world = make_world(ParallelConfig(dp_shard=2, cp=2, ep=2))
    model = world.parallelize(_model(0))
    opt = _optimizer(model)
    _train_step(model, opt, world)
    pckpt.save(f"{folder}/dcp", model, opt)
    full, optim = pckpt.full_state_dict(model), _full_optim(model, opt)
    if rank == 0:
        torch.save({"model": full, "optim": optim}, f"{folder}/reference.pt")
    dist.barrier()


def _check_same(model_sd, optim_sd, ref):
    assert model_sd.keys() == ref["model"].keys()
    for k, v in ref["model"].items():
        torch.testing.assert_close(model_sd[k], v, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    assert optim_sd["state"].keys() == ref["optim"]["state"].keys()
    for k, st in ref["optim"]["state"].items():
        for name, v in st.items():
            torch.testing.assert_close(torch.as_tensor(optim_sd["state"][k][name]),
                                       torch.as_tensor(v), rtol=0, atol=0)


def _load_worker(rank, size, folder):
    world = make_world(ParallelConfig(ep=2))
    model = world.parallelize(_model(1))  # different weights until loaded
    opt = _optimizer(model)
    pckpt.load(f"{folder}/dcp", model, opt)
    full, optim = pckpt.full_state_dict(model), _full_optim(model, opt)
    ref = torch.load(f"{folder}/reference.pt")
    if rank == 0:  # the full state dicts are gathered on rank 0
        _check_same(full, optim, ref)
    pckpt.export_hf(model, f"{folder}/hf", dialect="legacy")
    if rank == 0:
        loaded = MiniMaxForCausalLM.from_pretrained(f"{folder}/hf")
        for k, v in loaded.state_dict().items():
            torch.testing.assert_close(v, ref["model"][k], rtol=0, atol=0)


def test_checkpoint_reshard_and_export(tmp_path):
    run_workers(_save_worker, 4, str(tmp_path))
    run_workers(_load_worker, 2, str(tmp_path))
    ref = torch.load(tmp_path / "reference.pt")
    # one process, no process group
    model = _model(2)
    opt = _optimizer(model)
    pckpt.load(tmp_path / "dcp", model, opt)
    _check_same(model.state_dict(), _full_optim(model, opt), ref)
    # offline export through the command line (reads the model config the trainer stored)
    (tmp_path / "dcp" / "trainer_state.json").write_text(json.dumps(
        {"model_config": model.config.to_dict()}))
    assert pckpt.main([str(tmp_path / "dcp"), str(tmp_path / "hf_offline"), "--dialect", "hf"]) == 0
    loaded = MiniMaxForCausalLM.from_pretrained(tmp_path / "hf_offline")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, ref["model"][k], rtol=0, atol=0)
    assert pckpt.main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
