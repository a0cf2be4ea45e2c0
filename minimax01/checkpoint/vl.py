"""MiniMax-VL-01 checkpoints in the released layout (VL01.md §7): `vision_tower.vision_model.*`,
`multi_modal_projector.linear_1/linear_2.*`, `image_newline`, and the language model under
`language_model.` in either weight dialect (the release is legacy: per-expert `block_sparse_moe`
tensors). The same machinery as the text model's: the model is built on the meta device and
filled one tensor at a time from memory-mapped safetensors (never unpickled), every mismatch is
reported at once (CheckpointError), and saves are atomic (writer.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..dtypes import FLOAT_DTYPES, dtype_name, resolve_dtype, torch_dtype
from ..vision.config import VLConfig
from .dialects import DIALECTS, pieces
from .errors import CheckpointError
from .hf import _materialize_buffers
from .match import match, param_shapes_of
from .reader import CheckpointReader
from .writer import Source, write_checkpoint

log = logging.getLogger("minimax01.checkpoint")


def save_vl(model: torch.nn.Module, path: str | Path, dialect: str = "legacy",
            max_shard_size: str | int = "2GB", tokenizer=None) -> list[str]:
    """config.json (model_type minimax_vl_01, the weights' dtype) and the weights."""
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be 'legacy' or 'hf', got {dialect!r}")
    config = model.config
    dtype = dtype_name(model.language_model.model.embed_tokens.weight.dtype)
    if dtype in FLOAT_DTYPES:
        config = config.replace(dtype=dtype)
    hf_config = config.to_hf_config(dialect)  # fails here, before anything is written
    state = model.state_dict()
    meta = [n for n, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot save tensors on the meta device: {', '.join(meta[:5])}")
    sources = [Source(p.name, p.shape, t.dtype, lambda t=t, index=p.index: t[index] if index else t)
               for param, t in state.items() for p in pieces(param, tuple(t.shape), dialect)]
    extras = tokenizer.save if tokenizer is not None else None
    return write_checkpoint(path, hf_config, sources, max_shard_size, extras=extras)


def load_vl(cls, path: str | Path, dtype: torch.dtype | str | None = None,
            device: torch.device | str | None = None):
    """`cls(config)` built on the meta device and filled from `path` (one file, or shards with
    model.safetensors.index.json). dtype: default the config's; device: default "cpu". Returned
    in eval mode; a CheckpointError (a ValueError) names every problem."""
    dtype = resolve_dtype(dtype)
    device = torch.device(device if device is not None else "cpu")
    start = time.perf_counter()
    with CheckpointReader(path, parse_config=VLConfig.from_hf_config) as reader:
        config = reader.config
        dtype = dtype or torch_dtype(config.dtype)
        config = config.replace(dtype=dtype_name(dtype))
        with torch.device("meta"):
            model = cls(config)
        m = match(reader, param_shapes_of(model))
        log.info("loading MiniMax-VL-01 %s (%s dialect, %d file(s)) as %s on %s", reader.path,
                 reader.dialect, len(reader.files), dtype_name(dtype), device)
        state = {p: m.read_param(p, dtype=dtype, device=device) for p in m.param_shapes}
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(model.language_model, device)  # the lightning slopes
    left = [n for n, t in model.named_parameters() if t.is_meta]
    if left:
        raise CheckpointError(f"after loading, tensors are still unset: {', '.join(left)}")
    log.info("loaded %s in %.1fs", reader.path, time.perf_counter() - start)
    return model.eval()
