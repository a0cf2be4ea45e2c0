"""HF-format checkpoints: `save_pretrained`, `load_pretrained` and `convert_checkpoint`, in either
weight dialect (see dialects.py). Loading builds the model on the meta device and fills it one
tensor at a time from memory-mapped safetensors, so a model never needs twice its memory; every
mismatch between checkpoint and config is reported at once, before anything is read."""

from __future__ import annotations

import fnmatch
import logging
import shutil
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..dtypes import FLOAT_DTYPES, dtype_name, from_safetensors_code, resolve_dtype, torch_dtype
from ..model import MiniMaxForCausalLM
from ..model.layers import LightningAttention
from ..ops.lightning import lightning_slopes
from .dialects import DIALECTS, pieces
from .errors import CheckpointError
from .match import TIED_HEAD, match, param_shapes_of
from .reader import CheckpointReader
from .writer import Source, parse_size, write_checkpoint

log = logging.getLogger("minimax01.checkpoint")

TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                   "merges.txt", "chat_template*", "generation_config.json")


def _check_dialect(dialect: str) -> None:
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be 'legacy' or 'hf', got {dialect!r}")


# ---------------------------------------------------------------------- saving
def save_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, path: str | Path,
                    dialect: str = "legacy", max_shard_size: str | int = "2GB",
                    tokenizer=None) -> list[str]:
    """Write a (full, unsharded) state dict with our parameter names as a checkpoint folder.
    For code that holds weights outside a model object (a trainer gathering FSDP shards)."""
    _check_dialect(dialect)
    hf_config = config.to_hf_config(dialect)  # fails here, before anything is written
    meta = [n for n, t in state_dict.items() if t.is_meta]
    if meta:
        raise ValueError(f"cannot save tensors on the meta device: {', '.join(meta[:5])}")
    sources = []
    for param, t in state_dict.items():
        if config.tie_word_embeddings and param == TIED_HEAD:
            continue  # stored once, as the embedding
        for p in pieces(param, tuple(t.shape), dialect):
            sources.append(Source(p.name, p.shape, t.dtype,
                                  lambda t=t, index=p.index: t[index] if index else t))
    extras = tokenizer.save if tokenizer is not None else None  # saved with the weights, atomically
    return write_checkpoint(path, hf_config, sources, max_shard_size, extras=extras)


def save_pretrained(model: torch.nn.Module, path: str | Path, dialect: str = "legacy",
                    max_shard_size: str | int = "2GB", tokenizer=None) -> list[str]:
    """config.json (with `dtype` set to the weights' dtype) and the weights in `dialect`; also
    the tokenizer files when `tokenizer` (anything with `.save(folder)`) is given."""
    dtype = dtype_name(model.model.embed_tokens.weight.dtype)
    config = model.config
    if dtype in FLOAT_DTYPES:
        config = config.replace(dtype=dtype)
    return save_state_dict(model.state_dict(), config, path, dialect, max_shard_size, tokenizer)


# ---------------------------------------------------------------------- loading
def _materialize_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Non-persistent buffers are not in checkpoints: recompute them on `device`."""
    layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, LightningAttention):
            module.slope = lightning_slopes(module.num_heads, module.layer_idx, layers).to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"after loading, tensors are still unset: {', '.join(left)}")


def load_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None):
    """Build `cls(config)` on the meta device and fill it from the checkpoint at `path`.

    dtype: default the config's `dtype` (what the checkpoint was saved in), or, for a
    config.json that states none, the dtype the weights are stored in; the lightning decay
    slopes stay fp32 whatever the dtype. device: default "cpu". The model is returned in eval
    mode. Raises CheckpointError (a ValueError) naming every problem; nothing is returned
    half-loaded."""
    dtype = resolve_dtype(dtype)
    device = torch.device(device if device is not None else "cpu")
    start = time.perf_counter()
    with CheckpointReader(path) as reader:
        config = reader.config
        dtype = dtype or torch_dtype(config.dtype)
        config = config.replace(dtype=dtype_name(dtype))
        with torch.device("meta"):
            model = cls(config)
        m = match(reader, param_shapes_of(model), config.tie_word_embeddings)
        m.check_tied_head()
        order = {f: k for k, f in enumerate(reader.files)}
        params = sorted(m.param_shapes, key=lambda p: order[reader.entries[m.by_param[p][0].name].file])
        log.info("loading %s (%s dialect, %d file(s)) as %s on %s", reader.path, reader.dialect,
                 len(reader.files), dtype_name(dtype), device)
        state = {p: m.read_param(p, dtype=dtype, device=device) for p in params}
    if config.tie_word_embeddings:
        state[TIED_HEAD] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_buffers(model, device)
    log.info("loaded %s in %.1fs", reader.path, time.perf_counter() - start)
    return model.eval()


# ---------------------------------------------------------------------- conversion
def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer (and generation config) files from one checkpoint folder to another."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if (f.is_file() and not f.name.startswith(".")
                and any(fnmatch.fnmatch(f.name, p) for p in TOKENIZER_FILES)):
            shutil.copyfile(f, Path(dst, f.name))
            copied.append(f.name)
    return copied


def convert_checkpoint(src: str | Path, dst: str | Path, dialect: str,
                       max_shard_size: str | int = "2GB", dtype: torch.dtype | str | None = None,
                       overwrite: bool = False) -> list[str]:
    """Rewrite checkpoint `src` as `dst` in `dialect` (optionally cast to `dtype`), streaming one
    shard at a time: the model is only built on the meta device (for its parameter shapes).
    Tokenizer files are copied with the weights. Returns the weight files written."""
    _check_dialect(dialect)
    dtype = resolve_dtype(dtype)
    parse_size(max_shard_size)  # bad sizes fail before any work
    src, dst = Path(src), Path(dst)
    if dst.exists():
        if src.exists() and dst.resolve() == src.resolve():
            raise ValueError(f"convert: the destination {dst} is the source; choose another folder")
        if not dst.is_dir():
            raise ValueError(f"convert: the destination {dst} exists and is not a folder")
        if any(dst.iterdir()) and not overwrite:
            raise ValueError(f"convert: the destination {dst} is not empty (pass overwrite=True, "
                             f"or --overwrite, to write into it)")
    with CheckpointReader(src) as reader:
        config = reader.config if dtype is None else reader.config.replace(dtype=dtype_name(dtype))
        hf_config = config.to_hf_config(dialect)
        with torch.device("meta"):
            model = MiniMaxForCausalLM(config)
        m = match(reader, param_shapes_of(model), config.tie_word_embeddings)
        m.check_tied_head()
        sources = []
        for param, shape in m.param_shapes.items():
            stored = from_safetensors_code(reader.entries[m.by_param[param][0].name].dtype)
            for p in pieces(param, shape, dialect):
                sources.append(Source(p.name, p.shape, dtype or stored,
                                      lambda param=param, index=p.index: m.read_param(param, index)))
        log.info("converting %s (%s) -> %s (%s)", src, reader.dialect, dst, dialect)
        return write_checkpoint(dst, hf_config, sources, max_shard_size,
                                extras=lambda folder: copy_tokenizer_files(src, folder))


def describe_checkpoint(path: str | Path, parse_config=None) -> dict:
    """What is in a checkpoint folder, from its headers only (for `info`); `parse_config` as
    CheckpointReader's (MiniMax-VL-01's config)."""
    with CheckpointReader(path, parse_config=parse_config) as reader:
        return {"path": str(reader.path), "dialect": reader.dialect, "files": len(reader.files),
                "tensors": len(reader.entries), "bytes": reader.total_bytes(),
                "dtypes": reader.dtypes(), "config": reader.config}
