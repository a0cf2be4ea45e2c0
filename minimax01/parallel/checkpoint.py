"""Checkpoints of a parallelized model: model and optimizer state, sharded, resharded on load.

Parameters and optimizer states are DTensors with global shapes (FSDP2 shards, experts split
over the EP mesh). torch.distributed.checkpoint.state_dict turns a model (and optimizer) of any
layout into a state dict of those DTensors, keyed by parameter name, and back; the files are
minimax01.checkpoint.sharded's (safetensors + JSON with a checksummed manifest), not DCP's
own, whose metadata is a pickle (resuming would run whatever a planted `.metadata` holds). A
checkpoint written by N ranks loads onto M ranks, or into one process without a process group.
The layout of the state is the trainer's: {"model": ..., "optim": ...}.

HF export: `export_hf` gathers the full weights from any layout (every rank calls it) and the
main rank writes an HF-format folder; `dcp_to_hf` does the same offline, in one process, from a
training checkpoint folder."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, sharded
from ..config import ModelConfig
from ..dtypes import FLOAT_DTYPES, dtype_name, torch_dtype


def _sd():
    from torch.distributed.checkpoint import state_dict as sd

    return sd


def _state(model, optimizer):
    """The {"model": ..., "optim": ...} state dict (this rank's DTensors / tensors)."""
    sd = _sd()
    if optimizer is None:
        return {"model": sd.get_model_state_dict(model)}
    model_sd, optim_sd = sd.get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(path: str | Path, model, optimizer=None, sync_files: bool = True) -> None:
    """Every rank writes its shards under `path` (created); then rank 0 writes the manifest.
    Files are always fsynced (`sync_files` is kept for callers of the earlier API)."""
    path = Path(path)
    rank, size = _rank()
    state = _state(model, optimizer)
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    sharded.write_shards(path, state, rank)
    _barrier()
    if rank == 0:
        sharded.write_manifest(path, size)
    _barrier()


def load(path: str | Path, model, optimizer=None, verify: bool = True) -> None:
    """Fill `model` (and `optimizer`) from a checkpoint written by any layout. `verify`
    checks every file against the manifest's checksums first (the trainer checks before, with
    the ranks sharing the reading, and passes False). Raises CheckpointError (a ValueError)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    if verify:
        try:
            sharded.verify(path)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
    state = _state(model, optimizer)
    try:
        sharded.load_state(path, state)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    sd = _sd()
    if optimizer is None:
        sd.set_model_state_dict(model, state["model"])
    else:
        sd.set_state_dict(model, optimizer, model_state_dict=state["model"],
                          optim_state_dict=state["optim"])


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, gathered from every rank (all ranks call it; the
    result is complete on rank 0, empty on the others)."""
    sd = _sd()
    options = sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return sd.get_model_state_dict(model, options=options)


def export_hf(model, path: str | Path, dialect: str = "legacy", dtype: torch.dtype | None = None,
              tokenizer=None) -> Path | None:
    """HF-format folder from a model in any layout. Every rank calls it; rank 0 writes (returns
    the path there, None elsewhere). `dtype` casts floating-point weights (default: as held)."""
    from ..checkpoint.hf import save_state_dict

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
    p.add_argument("dcp_dir", help="a training checkpoint folder (holds manifest.json and "
                                   "trainer_state.json)")
    p.add_argument("out_dir")
    p.add_argument("--dialect", default="legacy", choices=["legacy", "hf"])
    p.add_argument("--dtype", default=None, choices=list(FLOAT_DTYPES),
                   help="cast the weights (default: the model config's dtype)")
    args = p.parse_args(argv)
    state_file = Path(args.dcp_dir) / "trainer_state.json"
    if not state_file.is_file():
        print(f"error: {state_file} not found (is {args.dcp_dir} a training checkpoint?)",
              file=sys.stderr)
        return 2
    try:
        config = ModelConfig.from_dict(json.loads(state_file.read_text())["model_config"])
        dtype = torch_dtype(args.dtype or config.dtype)
        out = dcp_to_hf(args.dcp_dir, args.out_dir, config, args.dialect, dtype)
    except (ValueError, KeyError, TypeError, OSError) as e:
        print(f"error: {args.dcp_dir}: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.dcp_dir} to {out} ({args.dialect} dialect, {dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
