"""Training checkpoints that survive a kill at any moment, and damage on disk.

Layout: `out_dir/checkpoints/step_00000100/` holds the model and optimizer state
(parallel/checkpoint.py: safetensors shards written by every rank, a resume may use another
number of ranks), `rng_rank{r}.json` per rank, `trainer_state.json` (step, tokens, data position,
metrics position, the config) and, written last, `manifest.json` with every file's size and
SHA-256. Nothing is ever unpickled. A checkpoint is written under a temporary name and renamed
once complete, so a kill never leaves a `step_*` folder that is not whole.

Resuming takes the newest checkpoint that verifies (manifest, sizes, checksums: the ranks share
the hashing; trainer_state.json's fields). A damaged one is named in a warning and moved aside
to `damaged-step_*`; if every checkpoint is damaged the run stops with an error rather than
start again from step 0. A model or optimizer state that is not finite is never saved."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, sharded
from ..checkpoint.writer import fsync_dir, write_text
from ..parallel import checkpoint as dcp_checkpoint

STATE_FILE = "trainer_state.json"
DAMAGED = "damaged-"
_NAME = re.compile(r"^step_(\d{8,})$")
_STATE_FIELDS = {"step": int, "tokens": int, "data": dict, "config": dict, "model_config": dict}


class NonFiniteState(RuntimeError):
    """The model or optimizer holds NaN or inf values: such a state is never saved."""


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Every `step_*` checkpoint folder, oldest first (`verify` says whether one is intact)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint that has a manifest (not verified: see find_resumable)."""
    found = [p for _, p in list_checkpoints(out_dir) if (p / sharded.MANIFEST).is_file()]
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    """trainer_state.json, its fields checked (CheckpointError naming what is wrong)."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{STATE_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{STATE_FILE} is not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{STATE_FILE} is not a JSON object")
    for key, typ in _STATE_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, typ) or isinstance(value, bool) or (typ is int and value < 0):
            raise CheckpointError(f"{STATE_FILE}: {key!r} is missing or not a valid {typ.__name__}")
    return state


def verify(path: Path, part: int = 0, parts: int = 1) -> str | None:
    """Why checkpoint `path` cannot be resumed from (None: it verifies). `part` of `parts`:
    which share of the checksums this caller computes."""
    try:
        sharded.verify(path, part, parts)
        if STATE_FILE not in sharded.read_manifest(path)["files"]:
            raise CheckpointError(f"the manifest does not list {STATE_FILE}")
        read_state(path)
    except CheckpointError as e:
        return str(e)
    except OSError as e:
        return f"cannot be read ({e})"
    return None


def find_resumable(out_dir: str | Path, world) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint every rank finds intact, and the damaged ones newer than it
    (path, why). Every rank calls it: they share the checksum work and agree on the result.
    Raises ValueError when there are checkpoints but none is intact."""
    damaged: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(out_dir)):
        reason = verify(path, world.rank, world.world_size)
        flag = torch.tensor(0.0 if reason is None else 1.0)
        if world.world_size > 1:
            flag = world.all_reduce(flag, "max")
        if float(flag) == 0.0:
            return path, damaged
        damaged.append((path, reason or "a file does not match its checksum (found by another "
                                         "rank)"))
    if damaged:
        listed = "; ".join(f"{p.name}: {why}" for p, why in damaged[:3])
        raise ValueError(f"no intact checkpoint in {checkpoint_root(out_dir)} to resume from "
                         f"({listed}{' ...' if len(damaged) > 3 else ''}); move the "
                         f"checkpoints away to start again from step 0")
    return None, []


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the `step_*` namespace (kept, never pruned)."""
    target = path.with_name(DAMAGED + path.name)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{DAMAGED}{path.name}.{n}")
    os.rename(path, target)
    return target


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def all_finite(model, optimizer, world) -> bool:
    """Whether every floating-point value of the model and optimizer state is finite (this
    rank's shards, then agreed over all ranks). One host sync."""
    from torch.distributed.tensor import DTensor

    tensors = list(model.parameters()) + list(model.buffers())
    if optimizer is not None:
        tensors += [v for st in optimizer.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor)]
    flags = []
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_floating_point() and local.numel():
            flags.append((~torch.isfinite(local.detach())).any().to(world.device))
    bad = torch.stack(flags).any().float() if flags else torch.zeros((), device=world.device)
    if world.world_size > 1:
        bad = world.all_reduce(bad, "max")
    return not bool(bad)


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1))


def rng_state(device: torch.device) -> dict:
    state = {"python": _jsonable(random.getstate()),
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
        state["cuda"] = base64.b64encode(cuda.numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]), device)


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, state: dict, world,
                    keep_last: int) -> Path:
    """Write checkpoint `step` (every rank calls this) and keep the newest `keep_last`. Raises
    NonFiniteState, before anything is written, if the model or optimizer is not finite."""
    if not all_finite(model, optimizer, world):
        raise NonFiniteState(f"the model or optimizer state holds NaN or inf at step {step}")
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    world.barrier()
    _write_json(tmp / f"rng_rank{world.rank}.json", rng_state(world.device))
    if world.is_main:
        _write_json(tmp / STATE_FILE, {**state, "world_size": world.world_size})
    dcp_checkpoint.save(tmp, model, optimizer)  # barriers, then the manifest, written last
    if world.is_main:
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run stopped at once)
            _remove(final)
        os.rename(tmp, final)
        fsync_dir(root)
        prune(out_dir, keep_last)
    world.barrier()
    return final


def _remove(path: Path) -> None:
    """Rename away first, so an interrupted delete never leaves a `step_*` that looks whole."""
    doomed = path.with_name(f".del-{path.name}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(out_dir: str | Path, keep_last: int) -> None:
    for _, path in list_checkpoints(out_dir)[:-keep_last]:
        _remove(path)
    for leftover in checkpoint_root(out_dir).glob(".del-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def clean_partial(out_dir: str | Path) -> list[Path]:
    """Remove what a kill left half-written (`.tmp-*`, `.del-*`); returns what was removed."""
    root = checkpoint_root(out_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".del-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def load_checkpoint(path: Path, model, optimizer, world, verified: bool = False) -> dict:
    """Restore model, optimizer and this rank's RNG from `path`; returns trainer_state.json.
    `verified`: find_resumable already checked the checksums (else they are checked here)."""
    dcp_checkpoint.load(path, model, optimizer, verify=not verified)
    rng_file = path / f"rng_rank{world.rank}.json"
    if rng_file.is_file():
        try:
            set_rng_state(json.loads(rng_file.read_text(encoding="utf-8")), world.device)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{rng_file}: not an RNG state ({e})") from None
    return read_state(path)


# ---------------------------------------------------------------------- compatibility
def incompatibilities(saved: dict, current: dict) -> list[str]:
    """What makes a checkpoint's run different from the current config in ways a resume cannot
    follow: the model, the data, the sequence length or the seed. Other keys (steps, LR,
    logging, batch size, parallel layout) may change."""
    diffs = []
    s_model, c_model = saved.get("model_config", {}), current.get("model_config", {})
    for key in sorted(set(s_model) | set(c_model)):
        if s_model.get(key) != c_model.get(key):
            diffs.append(f"model.{key} (checkpoint {s_model.get(key)!r}, now {c_model.get(key)!r})")
    s_cfg, c_cfg = saved.get("config", {}), current.get("config", {})
    s_data, c_data = s_cfg.get("data", {}), c_cfg.get("data", {})
    for key in sorted(set(s_data) | set(c_data)):
        if s_data.get(key) != c_data.get(key):
            diffs.append(f"data.{key} (checkpoint {s_data.get(key)!r}, now {c_data.get(key)!r})")
    for key in ("seq_len", "seed"):
        a, b = s_cfg.get("train", {}).get(key), c_cfg.get("train", {}).get(key)
        if a != b:
            diffs.append(f"train.{key} (checkpoint {a!r}, now {b!r})")
    return diffs
