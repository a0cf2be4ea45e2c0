"""Training checkpoints that survive a kill at any moment.

Layout: `out_dir/checkpoints/step_00000100/` holds the model and optimizer through
torch.distributed.checkpoint (DCP: every rank writes its own shards, and a resume may use another
number of ranks), `rng_rank{r}.json` per rank, and `trainer_state.json` (step, tokens, data
position, the config) written last. A checkpoint is written under a temporary name and renamed
once complete, so a directory called `step_*` is always whole; half-written ones are removed."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from ..parallel import checkpoint as dcp_checkpoint

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d{8,})$")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def _fsync_dir(path: Path) -> None:
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


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


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
    """Write checkpoint `step` (every rank calls this) and keep the newest `keep_last`."""
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    world.barrier()
    dcp_checkpoint.save(tmp, model, optimizer, sync_files=True)
    _write_json(tmp / f"rng_rank{world.rank}.json", rng_state(world.device))
    world.barrier()
    if world.is_main:
        _write_json(tmp / STATE_FILE, {**state, "world_size": world.world_size})
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run stopped at once)
            _remove(final)
        os.rename(tmp, final)
        _fsync_dir(root)
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
    """Remove checkpoints a kill left half-written; returns what was removed."""
    root = checkpoint_root(out_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".del-")) or (_NAME.match(p.name)
                                                          and not (p / STATE_FILE).is_file()):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def load_checkpoint(path: Path, model, optimizer, world) -> dict:
    """Restore model, optimizer and this rank's RNG from `path`; returns trainer_state.json."""
    dcp_checkpoint.load(path, model, optimizer)
    rng_file = path / f"rng_rank{world.rank}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()), world.device)
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
