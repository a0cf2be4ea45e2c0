"""Writing a HF-format checkpoint folder: safetensors shards of at most `max_shard_size`
(`model.safetensors` when one shard is enough, else `model-0000k-of-0000n.safetensors` plus
`model.safetensors.index.json`), then `config.json`. Tensors are produced lazily, one shard in
memory at a time. All shards are first written under temporary names (a failure removes them and
leaves the folder as it was), then renamed into place; weight files of an earlier save that the
new one does not use are removed at the end."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .reader import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME

log = logging.getLogger("minimax01.checkpoint")

_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass
class Source:
    """One tensor to write: its checkpoint name, shape and dtype, and how to produce it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def parse_size(size: str | int) -> int:
    """"2GB" (10^9 bytes), "500MiB" (2^20), or a byte count."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), re.IGNORECASE)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"max_shard_size: cannot read {size!r}; use e.g. '2GB', '500MiB' or "
                             f"a byte count")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def plan_shards(sources: list[Source], max_bytes: int) -> list[list[Source]]:
    """Greedy in order; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list[Source]] = []
    size = 0
    for s in sources:
        if not shards or (size + s.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards or [[]]


def shard_file_names(n: int) -> list[str]:
    return [WEIGHTS_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage (safetensors refuses shared memory)."""
    t = t.detach().to("cpu")
    if (not t.is_contiguous() or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        t = t.contiguous().clone()
    return t


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_checkpoint(path: str | Path, config: dict, sources: list[Source],
                     max_shard_size: str | int = "2GB") -> list[str]:
    """Write the weights of `sources` and `config` as a checkpoint folder; returns the weight
    file names."""
    from safetensors.torch import save_file

    path = Path(path)
    max_bytes = parse_size(max_shard_size)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError("two tensors to save share a name")
    path.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(sources, max_bytes)
    files = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    start = time.perf_counter()
    written: list[Path] = []
    try:  # every shard under a temporary name first: a failed save leaves the folder as it was
        for k, (file, shard) in enumerate(zip(files, shards)):
            tensors = {}
            for s in shard:
                t = s.load()
                if tuple(t.shape) != tuple(s.shape):
                    raise ValueError(f"tensor {s.name} has shape {list(t.shape)}, expected "
                                     f"{list(s.shape)}")
                tensors[s.name] = _standalone(t.to(s.dtype))
                weight_map[s.name] = file
            tmp = path / (file + ".tmp")
            written.append(tmp)
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            del tensors
            log.info("wrote %s (%d/%d, %.1fs)", file, k + 1, len(files), time.perf_counter() - start)
    except BaseException:
        for tmp in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, file in zip(written, files):
        os.replace(tmp, path / file)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in sources)}, "weight_map": weight_map}
        _write_text(path / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    _write_text(path / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    for old in path.iterdir():  # weight files of an earlier save into the same folder
        stale = old.name == WEIGHTS_NAME or old.name == INDEX_NAME or _SHARD.fullmatch(old.name)
        if stale and old.name not in files and not (old.name == INDEX_NAME and len(files) > 1):
            old.unlink()
    return files
