"""CheckpointReader: a HF-format checkpoint folder (config.json plus model.safetensors, or
shards with model.safetensors.index.json) opened lazily. Opening reads only the config and the
safetensors headers (names, shapes, dtypes) and checks that the files agree with each other;
tensors are read one at a time, memory-mapped, when asked for. Never unpickles anything."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from .dialects import config_dialect, detect_dialect
from .errors import CheckpointError, _names

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")


@dataclass(frozen=True)
class Entry:
    file: str                 # file name inside the checkpoint folder
    shape: tuple[int, ...]
    dtype: str                # safetensors dtype code: "BF16", "F32", ...


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return data


class CheckpointReader:
    """Open with `CheckpointReader(path)` (or as a context manager, which closes the files).

    Attributes: `config_dict` (config.json), `config` (ModelConfig), `files` (weight files in
    order), `entries` (tensor name -> Entry), `dialect` ("legacy" or "hf", from tensor names)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no checkpoint at {self.path}")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a checkpoint folder (expected a folder with "
                                  f"{CONFIG_NAME} and safetensors weights)")
        config_path = self.path / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"{self.path} is not a checkpoint: it has no {CONFIG_NAME}")
        self.config_dict = _read_json(config_path, "the model config")
        try:
            self.config = ModelConfig.from_hf_config(self.config_dict)
        except KeyError as e:
            raise CheckpointError(f"{config_path}: missing field {e.args[0]!r}") from None
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{config_path}: {e}") from None
        self._handles: dict[str, object] = {}
        try:
            self.files, weight_map = self._weight_files()
            self.entries = self._read_headers(weight_map)
        except BaseException:
            self.close()
            raise
        self.dialect = detect_dialect(self.entries, fallback=config_dialect(self.config_dict))

    # ------------------------------------------------------------------ opening
    def _weight_files(self) -> tuple[list[str], dict[str, str] | None]:
        index_path = self.path / INDEX_NAME
        if index_path.is_file():
            index = _read_json(index_path, "the shard index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index_path}: no 'weight_map' of tensor name -> file name")
            files = list(dict.fromkeys(weight_map.values()))
            absent = [f for f in files if not (self.path / f).is_file()]
            if absent:
                raise CheckpointError(f"{index_path} names {len(absent)} shard file(s) that do not "
                                      f"exist: {_names(absent)}")
            return files, weight_map
        if (self.path / WEIGHTS_NAME).is_file():
            return [WEIGHTS_NAME], None
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if shards:
            raise CheckpointError(f"{self.path} has safetensors shards ({_names(shards)}) but no "
                                  f"{INDEX_NAME} saying which tensor lives where")
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise CheckpointError(f"{self.path} holds only pickled PyTorch weights; minimax01 reads "
                                  f"safetensors only (it never unpickles)")
        raise CheckpointError(f"{self.path} has no weights ({WEIGHTS_NAME} or {INDEX_NAME})")

    def _open(self, file: str):
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(self.path / file), framework="pt", device="cpu")
            except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
                raise CheckpointError(f"{self.path / file}: not a readable safetensors file "
                                      f"({e})") from None
            self._handles[file] = handle
        return handle

    def _read_headers(self, weight_map: dict[str, str] | None) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        unlisted: list[str] = []
        for file in self.files:
            handle = self._open(file)
            for name in handle.keys():
                if weight_map is not None and weight_map.get(name) != file:
                    unlisted.append(f"{name} in {file}")
                    continue
                s = handle.get_slice(name)
                entries[name] = Entry(file, tuple(s.get_shape()), s.get_dtype())
        problems = []
        if weight_map is not None:
            lost = [f"{n} (in {f})" for n, f in weight_map.items() if n not in entries]
            if lost:
                problems.append(f"{len(lost)} tensor(s) listed in the index are not in their shard: "
                                f"{_names(lost)}")
        if unlisted:
            problems.append(f"{len(unlisted)} tensor(s) in shards are not listed there by the "
                            f"index: {_names(unlisted)}")
        if problems:
            raise CheckpointError(f"{self.path / INDEX_NAME}: " + "; ".join(problems))
        return entries

    # ------------------------------------------------------------------ reading
    def read(self, name: str, index: tuple = ()) -> torch.Tensor:
        """Tensor `name` (or the part `index` selects: ints and slices), on the CPU."""
        entry = self.entries[name]
        try:
            handle = self._open(entry.file)
            return handle.get_slice(name)[index] if index else handle.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path / entry.file}: cannot read tensor {name}: {e}") from None

    def total_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)

    def dtypes(self) -> dict[str, int]:
        """safetensors dtype code -> number of tensors stored in it."""
        out: dict[str, int] = {}
        for e in self.entries.values():
            out[e.dtype] = out.get(e.dtype, 0) + 1
        return out

    def close(self) -> None:
        for handle in self._handles.values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
