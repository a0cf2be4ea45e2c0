"""Starting a run from a released HF-format checkpoint (`train --train.init_from DIR`).

The model is built on the meta device, parallelized there (EP -> CP -> FSDP, parallel/
parallelize.py), given empty storage for the part each rank holds, and filled from the
checkpoint's safetensors with checkpoint/sliced.py's SlicedReader: every rank reads only the rows
of its own shards (an FSDP shard, its EP experts), in either weight dialect (legacy, hf; M1 too).
No rank ever holds the whole model, on the host or the device.

The architecture comes from the checkpoint's config.json. A run config that also names model
fields must agree with it (`check_model_fields` names every difference); only the training-time
knobs in TRAINING_FIELDS may differ."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.errors import CheckpointError
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.sliced import Slice, SlicedReader
from ..config import ModelConfig
from ..model import MiniMaxForCausalLM
from ..model.layers import LightningAttention
from ..ops.lightning import lightning_slopes

# fields a fine-tuning run may set differently from the checkpoint: they change the training
# computation, not the weights' shapes or meaning
TRAINING_FIELDS = ("router_aux_loss_coef", "capacity_factor", "dtype", "max_position_embeddings")
# what a preset says that is not the architecture (a released config may say otherwise)
PRESET_UNCOMPARED = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The model config of a checkpoint folder (from its headers; no weights read)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"train.init_from: no checkpoint folder at {path}")
    with CheckpointReader(path) as reader:
        from ..checkpoint.quant_layout import stored_quantization

        if stored_quantization(reader.config_dict) is not None:
            raise ValueError(f"train.init_from: {path} holds 8-bit weights; fine-tune from the "
                             f"16-bit checkpoint (or convert it first)")
        return reader.config


def check_model_fields(ckpt: ModelConfig, preset: str, fields: dict, default_preset: str = "demo"
                       ) -> ModelConfig:
    """The run's model config: the checkpoint's, with the TRAINING_FIELDS the run sets. Every
    other field the run names (and a non-default preset) must agree with the checkpoint."""
    given = dict(fields)
    if preset and preset != default_preset:  # its shapes (token ids, init scale: not compared)
        preset_cfg = ModelConfig.from_preset(preset).replace(**fields).to_dict()
        given = {**{k: v for k, v in preset_cfg.items()
                    if k not in TRAINING_FIELDS + PRESET_UNCOMPARED}, **given}
    have = ckpt.to_dict()
    diffs = [f"model.{k} = {v!r} but the checkpoint has {have[k]!r}" for k, v in given.items()
             if k not in TRAINING_FIELDS and k in have and _norm(have[k]) != _norm(v)]
    unknown = [k for k in given if k not in have]
    if unknown:
        diffs.append(f"unknown model field(s) {', '.join(unknown)}")
    if diffs:
        where = f"model.preset {preset!r}: " if preset and preset != default_preset else ""
        raise ValueError(f"train.init_from: the run's model config disagrees with the "
                         f"checkpoint's ({where}{'; '.join(diffs[:4])}"
                         f"{' ...' if len(diffs) > 4 else ''}); drop those model settings")
    return ckpt.replace(**{k: v for k, v in fields.items() if k in TRAINING_FIELDS})


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def local_slices(param: torch.Tensor) -> tuple[tuple[Slice, ...], torch.Tensor] | None:
    """(the slices of the global tensor this rank holds, the local tensor to fill); None when
    this rank holds nothing of it."""
    if not hasattr(param, "to_local"):
        return (), param.data
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
    local = param.to_local()
    if any(n == 0 for n in shape):
        return None
    slices = tuple(Slice.range(d, o, o + n) for d, (o, n, full) in
                   enumerate(zip(offset, shape, param.shape)) if n != full)
    return slices, local


@torch.no_grad()
def fill_from_checkpoint(model: MiniMaxForCausalLM, path: str | Path,
                         device: torch.device | str | None = None,
                         skip: tuple[str, ...] = ("lora_",)) -> int:
    """Give a (possibly parallelized) model on the meta device storage on `device` and fill
    every parameter this rank holds from the checkpoint. Parameters whose name contains one of
    `skip` (adapters) are left to their owner to initialise. Returns the bytes read."""
    device = torch.device(device if device is not None else "cpu")
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        model.to_empty(device=device)
    with SlicedReader(path) as reader:
        plan, targets = {}, {}
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            got = local_slices(p)
            if got is None:
                continue
            plan[name], targets[name] = got
        reader.check(plan)  # every problem named before a byte is read
        for name, slices in plan.items():
            local = targets[name]
            local.copy_(reader.read(name, slices, dtype=local.dtype, device=local.device))
        read = reader.bytes_read
    layers = model.config.num_hidden_layers
    for module in model.modules():  # non-persistent buffers: recomputed
        if isinstance(module, LightningAttention):
            module.slope = lightning_slopes(module.num_heads, module.layer_idx, layers).to(device)
    return read


def load_model(path: str | Path, world=None, parallel=None, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None, trainable: bool = True,
               config: ModelConfig | None = None, prepare=None) -> MiniMaxForCausalLM:
    """A checkpoint's model in this world's layout (one process without `world`).

    dtype: of the weights held (fp32 master weights for training, bf16 for a frozen reference
    model). trainable=False: no gradients, eval mode (a DPO reference or a GRPO old policy).
    config: the model config to build (default the checkpoint's; see check_model_fields).
    prepare(model): runs on the meta model before parallelizing (LoRA adapters, checkpointing)."""
    config = config or checkpoint_config(path)
    with torch.device("meta"):
        model = MiniMaxForCausalLM(config)
    model.to(dtype)
    if prepare is not None:
        prepare(model)
    if not trainable:
        model.requires_grad_(False)
    if world is not None:
        from ..parallel.parallelize import parallelize

        model = parallelize(model, world, parallel)
        device = world.device if device is None else device
    fill_from_checkpoint(model, path, device)
    return model if trainable else model.eval()


__all__ = ["load_model", "fill_from_checkpoint", "checkpoint_config", "check_model_fields",
           "TRAINING_FIELDS", "CheckpointError"]
