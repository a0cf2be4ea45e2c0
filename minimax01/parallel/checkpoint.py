"""Checkpoints of a parallelized model with torch.distributed.checkpoint (DCP).

Parameters and optimizer states are DTensors with global shapes (FSDP2 shards, experts split
over the EP mesh), so DCP writes every shard with its global offsets and a load reshards onto
whatever layout the loading job has: N ranks -> M ranks, or one process without a process group.
The layout of the files is the trainer's: {"model": ..., "optim": ...}.

HF export: `export_hf` gathers the full weights from any layout (every rank calls it) and the
main rank writes an HF-format folder; `dcp_to_hf` does the same offline, in one process, from a
DCP checkpoint folder."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ModelConfig


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    return dcp, sd


def _state(model, optimizer):
    """The {"model": ..., "optim": ...} dict DCP saves into and loads into."""
    _, sd = _dcp()
    if optimizer is None:
        return {"model": sd.get_model_state_dict(model)}
    model_sd, optim_sd = sd.get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save(path: str | Path, model, optimizer=None, sync_files: bool = False) -> None:
    """Every rank writes its own shards under `path` (fsynced with `sync_files`)."""
    dcp, _ = _dcp()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(_state(model, optimizer),
                 storage_writer=dcp.FileSystemWriter(str(path), sync_files=sync_files))


def load(path: str | Path, model, optimizer=None) -> None:
    """Fill `model` (and `optimizer`) from a DCP checkpoint written by any layout."""
    dcp, sd = _dcp()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no DCP checkpoint folder at {path}")
    state = _state(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
    if optimizer is None:
        sd.set_model_state_dict(model, state["model"])
    else:
        sd.set_state_dict(model, optimizer, model_state_dict=state["model"],
                          optim_state_dict=state["optim"])


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, gathered from every rank (all ranks call it; the
    result is complete on rank 0, empty on the others)."""
    _, sd = _dcp()
    options = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return sd.get_model_state_dict(model, options=options)


def export_hf(model, path: str | Path, dialect: str = "legacy", dtype: torch.dtype | None = None,
              tokenizer=None) -> Path | None:
    """HF-format folder from a model in any layout. Every rank calls it; rank 0 writes (returns
    the path there, None elsewhere). `dtype` casts floating-point weights (default: as held)."""
    from ..checkpoint.hf import dtype_name, save_state_dict

    state = full_state_dict(model)
    written = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        config = model.config
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            config = config.replace(dtype=dtype_name(dtype))
        save_state_dict(state, config, path, dialect, tokenizer=tokenizer)
        written = Path(path)
    if dist.is_initialized():
        dist.barrier()
    return written


def dcp_to_hf(dcp_path: str | Path, out: str | Path, config: ModelConfig,
              dialect: str = "legacy", dtype: torch.dtype | None = None) -> Path:
    """Offline export (one process, no process group) of a DCP checkpoint's model weights."""
    from ..model.model import MiniMaxForCausalLM

    model = MiniMaxForCausalLM.from_config_on_meta(config).to_empty(device="cpu")
    load(dcp_path, model)
    written = export_hf(model, out, dialect, dtype)
    return written if written is not None else Path(out)


def main(argv=None) -> int:
    """`python -m minimax01.parallel.checkpoint DCP_DIR OUT_DIR [--dialect D] [--dtype T]`:
    export a training checkpoint (any layout) to an HF-format folder, in one process."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m minimax01.parallel.checkpoint",
                                description=main.__doc__.split("\n")[0].strip(" `"))
    p.add_argument("dcp_dir", help="a checkpoint folder (holds .metadata and trainer_state.json)")
    p.add_argument("out_dir")
    p.add_argument("--dialect", default="legacy", choices=["legacy", "hf"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the weights (default: the model config's dtype)")
    args = p.parse_args(argv)
    state_file = Path(args.dcp_dir) / "trainer_state.json"
    if not state_file.is_file():
        print(f"error: {state_file} not found (is {args.dcp_dir} a training checkpoint?)",
              file=sys.stderr)
        return 2
    config = ModelConfig.from_dict(json.loads(state_file.read_text())["model_config"])
    dtype = getattr(torch, args.dtype or config.dtype)
    out = dcp_to_hf(args.dcp_dir, args.out_dir, config, args.dialect, dtype)
    print(f"exported {args.dcp_dir} to {out} ({args.dialect} dialect, {dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
