"""Writing a HF-format checkpoint folder: safetensors shards of at most `max_shard_size`
(`model.safetensors` when one shard is enough, else `model-0000k-of-0000n.safetensors` plus
`model.safetensors.index.json`), `config.json`, and any extra files (the tokenizer's). Tensors
are produced lazily, one shard in memory at a time.

A save over an existing checkpoint may be killed at any moment and the folder still loads as
the old checkpoint or the new one, never a mix (docs/checkpoints.md, "How a save commits"):

1. everything is written, fsynced, into `DIR/.minimax01-staging/` (readers ignore it; a save
   that fails removes it, one that is killed leaves it for the next save to remove), with a
   `manifest.json` listing the new checkpoint's files;
2. the commit point: one rename of that folder to `DIR/.minimax01-commit/`. From here on a
   reader takes the manifest's files, each from the commit folder while it is still there, else
   from DIR; weight files the manifest does not name are ignored;
3. roll forward: each file is renamed from the commit folder into DIR (atomic, one at a time),
   weight files of the old save that the new one does not use are removed, then the manifest
   and the commit folder. A save killed during this step is finished by the next save.

The files are created with the usual permissions (0666 less the umask), which safetensors alone
does not do (it writes 0600)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .reader import (COMMIT_DIR, CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, STAGING_DIR, WEIGHTS_NAME,
                     plain_name, read_manifest)

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


def standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage (safetensors refuses shared memory)."""
    t = t.detach().to("cpu")
    if (not t.is_contiguous() or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        t = t.contiguous().clone()
    return t


def file_mode() -> int:
    """0666 less the process umask: the mode `open()` gives a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def is_weight_file(name: str) -> bool:
    """Files a save owns in a checkpoint folder (and may remove when a new save replaces them)."""
    return name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD.fullmatch(name) is not None


def write_checkpoint(path: str | Path, config: dict, sources: list[Source],
                     max_shard_size: str | int = "2GB",
                     extras: Callable[[Path], object] | None = None) -> list[str]:
    """Write the weights of `sources` and `config` (and whatever `extras(folder)` writes into
    the folder it is given) as the checkpoint in folder `path`, replacing the one there; returns
    the weight file names. See the module docstring for why a kill never leaves a mix."""
    from safetensors import torch as st

    path = Path(path)
    max_bytes = parse_size(max_shard_size)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError("two tensors to save share a name")
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot save a checkpoint to {path}: it exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    finish_save(path)  # a save that was killed after its commit point
    staging = path / STAGING_DIR
    if staging.exists():  # a save that was killed before its commit point
        shutil.rmtree(staging)
    shards = plan_shards(sources, max_bytes)
    files = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    start = time.perf_counter()
    mode = file_mode()
    os.mkdir(staging)
    try:
        for k, (file, shard) in enumerate(zip(files, shards)):
            tensors = {}
            for s in shard:
                t = s.load()
                if tuple(t.shape) != tuple(s.shape):
                    raise ValueError(f"tensor {s.name} has shape {list(t.shape)}, expected "
                                     f"{list(s.shape)}")
                tensors[s.name] = standalone(t.to(s.dtype))
                weight_map[s.name] = file
            target = staging / file
            st.save_file(tensors, str(target), metadata={"format": "pt"})
            del tensors
            os.chmod(target, mode)
            fsync_file(target)
            log.info("wrote %s (%d/%d, %.1fs)", file, k + 1, len(files), time.perf_counter() - start)
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in sources)},
                     "weight_map": weight_map}
            write_text(staging / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        write_text(staging / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        if extras is not None:
            extras(staging)
        contents = sorted(p.name for p in staging.iterdir() if p.is_file() and plain_name(p.name)
                          and not p.name.startswith("."))
        for name in contents:
            if name not in files and name not in (INDEX_NAME, CONFIG_NAME):
                fsync_file(staging / name)
        manifest = {"format": 1, "files": contents}
        write_text(staging / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
        fsync_dir(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, path / COMMIT_DIR)  # the commit point
    fsync_dir(path)
    finish_save(path)
    return files


def finish_save(path: Path) -> None:
    """Roll a committed save forward (step 3 of the module docstring); idempotent."""
    commit = path / COMMIT_DIR
    if not commit.is_dir():
        return
    files = read_manifest(commit)
    if files is not None:
        for name in files:
            if (commit / name).exists():
                os.replace(commit / name, path / name)
        fsync_dir(path)
        for old in sorted(path.iterdir()):
            if is_weight_file(old.name) and old.name not in files and old.is_file():
                os.unlink(old)
        os.unlink(commit / MANIFEST_NAME)
    shutil.rmtree(commit)
    fsync_dir(path)
