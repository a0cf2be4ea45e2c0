"""Sharded checkpoints of (possibly distributed) state dicts, in safetensors and JSON only.

Why not torch.distributed.checkpoint's files: its metadata (`.metadata`) and every non-tensor
value are pickles, so resuming from a folder someone could write to runs their code. Here a
checkpoint folder holds nothing that is unpickled, and every file is named in a manifest with
its size and SHA-256, so damage (a truncated, zeroed or bit-flipped file, a missing one, garbage
JSON) is found before anything is loaded.

    shard-RRRRR-KKKKK.safetensors   rank R's tensor pieces (K: files of at most MAX_FILE_BYTES)
    shard-RRRRR.json                rank R's index: for each tensor piece its file, its offset in
                                    the global tensor and the global shape; rank 0's also holds
                                    the non-tensor values (optimizer hyper-parameters) as JSON
    manifest.json                   written last: format, version, every file with size + sha256

A state dict is a nested dict of tensors, DTensors (FSDP2 / expert-parallel shards with global
shapes) and JSON-able values. Each rank writes the pieces it owns (a piece replicated over some
mesh dimensions is written once, by the rank at coordinate 0 there); loading copies, for each
tensor of the target state dict, the overlap of every saved piece with the part this rank holds:
a checkpoint written by N ranks loads onto M ranks, or into one process. Keys are joined with
"/" (parameter names use "."). This module does no communication: parallel/checkpoint.py
orders the ranks' writes around barriers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .reader import plain_name
from .writer import file_mode, fsync_dir, fsync_file, standalone, write_text

FORMAT, VERSION = "minimax01-sharded", 1
MANIFEST = "manifest.json"
MAX_FILE_BYTES = 2 * 10**9
_RANK_INDEX = re.compile(r"shard-(\d{5})\.json")
_CHUNK = 1 << 24


# ---------------------------------------------------------------------- helpers
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def flatten(state: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"a.b": t}} -> {"model/a.b": t}; a non-dict (or empty dict) is a leaf."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if not isinstance(k, str) or not k or "/" in k:
            raise ValueError(f"state dict key {k!r} under {prefix or 'the top'}: keys must be "
                             f"non-empty strings without '/'")
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _jsonable(value: Any, key: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key}: cannot save the non-finite value {value}")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, key) for k, v in value.items()}
    raise ValueError(f"{key}: cannot save a value of type {type(value).__name__} (only tensors "
                     f"and JSON values)")


def _like(saved: Any, template: Any) -> Any:
    """A JSON value with the container types of `template` (tuples come back as tuples)."""
    if isinstance(template, tuple) and isinstance(saved, list):
        return tuple(_like(s, t) for s, t in zip(saved, template)) if len(saved) == len(template) \
            else tuple(saved)
    if isinstance(template, list) and isinstance(saved, list) and len(saved) == len(template):
        return [_like(s, t) for s, t in zip(saved, template)]
    if isinstance(template, dict) and isinstance(saved, dict):
        return {k: _like(v, template[k]) if k in template else v for k, v in saved.items()}
    return saved


def _piece(t: torch.Tensor, rank: int) -> tuple[list, list[int], bool]:
    """([(local data, offsets in the global tensor)] -- one box, or several for a strided
    shard --, global shape, whether this rank writes it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        coords = t.device_mesh.get_coordinate() or []
        owner = all(c == 0 for c, p in zip(coords, t.placements) if p.is_replicate())
        return _boxes(t, coords), list(t.shape), owner
    return [(t, [0] * t.dim())], list(t.shape), rank == 0


def _boxes(t, coords) -> list:
    """A DTensor's local data as boxes of its global tensor. A `_StridedShard(d, k)` alone on
    dim d (expert tensor parallel: gate_up_proj's [w1; w3] halves split alike) makes k runs
    along d; with other shards of d (FSDP2's own strided form over EP) torch's chunk is one
    box already."""
    from torch.distributed.tensor.placement_types import _StridedShard

    chunk = t.__create_chunk_list__()[0]
    local = t.to_local()
    runs = [[(o, 0, n)] for o, n in zip(chunk.offsets, chunk.sizes)]  # (global, local, length)
    for mesh_dim, p in enumerate(t.placements):
        if not isinstance(p, _StridedShard):
            continue
        d, k, n = p.dim, p.split_factor, t.device_mesh.size(mesh_dim)
        if any(q.is_shard(d) for q in t.placements if q is not p):
            continue
        if t.shape[d] % (k * n):
            raise CheckpointError(f"unsupported sharding {t.placements} of shape "
                                  f"{tuple(t.shape)}")
        size = t.shape[d] // (k * n)
        runs[d] = [(j * t.shape[d] // k + coords[mesh_dim] * size, j * size, size)
                   for j in range(k)]
    boxes = [((), [])]
    for dim_runs in runs:
        boxes = [(sl + (slice(lo, lo + n),), off + [g]) for sl, off in boxes
                 for g, lo, n in dim_runs]
    if len(boxes) == 1:
        return [(local, boxes[0][1])]
    return [(local[sl], off) for sl, off in boxes]


def _standalone(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU tensors safetensors accepts (contiguous, each owning its storage), copying only
    what needs it: device tensors, views, and a second tensor on storage already used."""
    out, storages = [], set()
    for t in tensors:
        t = standalone(t)
        if t.untyped_storage().data_ptr() in storages and t.numel():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out.append(t)
    return out


# ---------------------------------------------------------------------- writing
def write_shards(folder: str | Path, state: dict, rank: int,
                 max_file_bytes: int = MAX_FILE_BYTES) -> None:
    """Rank `rank`'s part of `state`: its safetensors files and its index (fsynced)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    flat = flatten(state)
    pieces, values = [], {}
    for key, v in flat.items():
        if isinstance(v, torch.Tensor):
            boxes, shape, owner = _piece(v, rank)
            if owner:  # box j > 0 is stored as "KEY@j"
                pieces += [(key if j == 0 else f"{key}@{j}", local, offsets, shape)
                           for j, (local, offsets) in enumerate(boxes)]
        elif rank == 0:
            values[key] = _jsonable(v, key)
    groups: list[list] = [[]]
    size = 0
    for p in pieces:
        nbytes = p[1].numel() * p[1].element_size()
        if groups[-1] and size + nbytes > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += nbytes
    files, chunks = {}, {}
    mode = file_mode()
    for k, group in enumerate(groups):
        if not group:
            continue
        name = f"shard-{rank:05d}-{k:05d}.safetensors"
        target = folder / name
        tensors = _standalone([local for _, local, _, _ in group])
        save_file({key: t for (key, _, _, _), t in zip(group, tensors)}, str(target),
                  metadata={"format": "pt"})
        del tensors
        os.chmod(target, mode)
        fsync_file(target)
        files[name] = {"size": target.stat().st_size, "sha256": sha256_of(target)}
        for key, _, offsets, shape in group:
            chunks[key] = {"file": name, "offsets": offsets, "shape": shape}
            if "@" in key:
                chunks[key]["key"] = key.rsplit("@", 1)[0]
    index = {"format": FORMAT, "version": VERSION, "rank": rank, "files": files,
             "chunks": chunks, "values": values}
    write_text(folder / f"shard-{rank:05d}.json", json.dumps(index) + "\n")


def write_manifest(folder: str | Path, world_size: int) -> None:
    """After every rank wrote (and every other file of the checkpoint is in place): the
    manifest naming every file in `folder` with its size and SHA-256 (shard hashes come from
    the ranks' indexes, so the big files are not read twice)."""
    folder = Path(folder)
    known: dict[str, dict] = {}
    shards = sorted(p.name for p in folder.iterdir() if _RANK_INDEX.fullmatch(p.name))
    if len(shards) != world_size:
        raise CheckpointError(f"{folder}: {len(shards)} rank indexes for {world_size} ranks")
    for name in shards:
        known.update(json.loads((folder / name).read_text(encoding="utf-8"))["files"])
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST or not p.is_file():
            continue
        files[p.name] = known.get(p.name) or {"size": p.stat().st_size, "sha256": sha256_of(p)}
    manifest = {"format": FORMAT, "version": VERSION, "world_size": world_size,
                "shards": shards, "files": files}
    write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    fsync_dir(folder)


# ---------------------------------------------------------------------- checking
def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: {what} must be a JSON object")
    return data


def read_manifest(folder: str | Path) -> dict:
    """The manifest, checked for shape (CheckpointError naming what is wrong)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() and (folder / ".metadata").exists():
        raise CheckpointError("no manifest.json: a torch.distributed.checkpoint folder (older "
                              "minimax01), which is not read because its metadata is a pickle")
    m = _read_json(folder / MANIFEST, "the manifest")
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise CheckpointError(f"manifest.json: not a {FORMAT} v{VERSION} manifest")
    files, shards = m.get("files"), m.get("shards")
    if not isinstance(files, dict) or not isinstance(shards, list):
        raise CheckpointError("manifest.json: no 'files' / 'shards'")
    for name, entry in files.items():
        if not plain_name(name):
            raise CheckpointError(f"manifest.json names {name!r}, which is outside the folder")
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int)
                or not isinstance(entry.get("sha256"), str)):
            raise CheckpointError(f"manifest.json: bad entry for {name}")
    for name in shards:
        if not isinstance(name, str) or not _RANK_INDEX.fullmatch(name) or name not in files:
            raise CheckpointError(f"manifest.json: bad rank index {name!r}")
    return m


def verify(folder: str | Path, part: int = 0, parts: int = 1) -> None:
    """Raise CheckpointError naming the first problem: a bad manifest, a missing file, a file
    of the wrong size, or (for the files this `part` of `parts` checks, so that ranks can
    share the reading) a SHA-256 mismatch."""
    folder = Path(folder)
    m = read_manifest(folder)
    for i, (name, entry) in enumerate(sorted(m["files"].items())):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{name} has {size} bytes, the manifest says {entry['size']}")
        if i % parts == part and sha256_of(path) != entry["sha256"]:
            raise CheckpointError(f"{name} does not match its checksum")


def _read_indexes(folder: Path, manifest: dict) -> tuple[dict[str, list], dict[str, Any]]:
    """key -> saved pieces [(file, offsets, global shape, name in the file)], and key -> JSON
    value."""
    pieces: dict[str, list] = {}
    values: dict[str, Any] = {}
    for name in manifest["shards"]:
        index = _read_json(folder / name, "a rank index")
        chunks, vals, files = index.get("chunks"), index.get("values"), index.get("files")
        if not (isinstance(chunks, dict) and isinstance(vals, dict) and isinstance(files, dict)):
            raise CheckpointError(f"{name}: not a rank index")
        for key, c in chunks.items():
            ok = (isinstance(c, dict) and c.get("file") in files and c.get("file") in manifest["files"]
                  and isinstance(c.get("offsets"), list) and isinstance(c.get("shape"), list)
                  and len(c["offsets"]) == len(c["shape"])
                  and all(isinstance(x, int) and x >= 0 for x in c["offsets"] + c["shape"])
                  and isinstance(c.get("key", key), str))
            if not ok:
                raise CheckpointError(f"{name}: bad entry for {key}")
            pieces.setdefault(c.get("key", key), []).append(
                (c["file"], c["offsets"], c["shape"], key))
        values.update(vals)
    return pieces, values


# ---------------------------------------------------------------------- loading
class _Files:
    def __init__(self, folder: Path):
        self.folder, self.handles = folder, {}

    def get(self, name: str):
        if name not in self.handles:
            from safetensors import safe_open

            try:
                self.handles[name] = safe_open(str(self.folder / name), framework="pt",
                                               device="cpu")
            except Exception as e:
                raise CheckpointError(f"{name}: not a readable safetensors file ({e})") from None
        return self.handles[name]


def _fill(target: torch.Tensor, key: str, saved: list, files: _Files) -> None:
    boxes, shape, _ = _piece(target, 0)
    covered = 0
    for local, offsets in boxes:
        covered += _fill_box(local, offsets, shape, key, saved, files)
    if covered != sum(local.numel() for local, _ in boxes):
        raise CheckpointError(f"{key}: the checkpoint's pieces cover {covered} of the "
                              f"{sum(b.numel() for b, _ in boxes)} values this rank needs")


def _fill_box(local: torch.Tensor, offsets: list[int], shape: list[int], key: str, saved: list,
              files: _Files) -> int:
    """Copy the overlap of every saved piece into `local` (at `offsets`); values copied."""
    seen = set()
    covered = 0
    for file, s_off, s_shape, name in saved:
        if list(s_shape) != shape:
            raise CheckpointError(f"{key} has shape {s_shape} in the checkpoint, {shape} in the "
                                  f"model")
        handle = files.get(file)
        if name not in handle.keys():
            raise CheckpointError(f"{file} lacks {name}")
        sl = handle.get_slice(name)
        s_local = list(sl.get_shape())
        if tuple(s_off) in seen:  # a replica written twice
            continue
        seen.add(tuple(s_off))
        if local.dim() == 0:
            local.copy_(handle.get_tensor(name))
            covered += 1
            continue
        lo = [max(a, b) for a, b in zip(offsets, s_off)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, local.shape, s_off, s_local)]
        if any(h <= lo_ for lo_, h in zip(lo, hi)):
            continue
        src = sl[tuple(slice(a - b, h - b) for a, h, b in zip(lo, hi, s_off))]
        local[tuple(slice(a - b, h - b) for a, h, b in zip(lo, hi, offsets))].copy_(src)
        covered += math.prod(h - a for a, h in zip(lo, hi))
    return covered


def load_state(folder: str | Path, target: dict) -> dict:
    """Fill `target` (a nested state dict of this rank's tensors / DTensors) from the
    checkpoint in place; non-tensor values are replaced by the saved ones. Returns `target`.
    Every key of `target` must be in the checkpoint (extra saved keys are ignored)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    pieces, values = _read_indexes(folder, manifest)
    files = _Files(folder)
    flat = flatten(target)
    missing = [k for k, v in flat.items()
               if (k not in pieces if isinstance(v, torch.Tensor) else k not in values)]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{len(missing)} entries of the model / optimizer are not in the "
                              f"checkpoint: {shown}")
    with torch.no_grad():
        for key, v in flat.items():
            if isinstance(v, torch.Tensor):
                _fill(v, key, pieces[key], files)
            else:
                _set(target, key, _like(values[key], v))
    return target


def _set(state: dict, key: str, value: Any) -> None:
    *path, last = key.split("/")
    for k in path:
        state = state[k]
    state[last] = value
