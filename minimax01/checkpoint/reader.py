"""CheckpointReader: a HF-format checkpoint folder (config.json plus model.safetensors, or
shards with model.safetensors.index.json) opened lazily. Opening reads only the config and the
safetensors headers (names, shapes, dtypes) and checks that the files agree with each other;
tensors are read one at a time, memory-mapped, when asked for. Never unpickles anything, never
reads outside the folder (an index naming `../x` or `/etc/x` is refused), never writes.

A folder whose save was killed after its commit point (writer.py) holds `.minimax01-commit/`:
the reader then takes the files its manifest names, each from there while it is still there,
else from the folder, so it sees the new checkpoint whole."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..dtypes import name_of_code
from ..hf_config import config_dtype
from .dialects import config_dialect, detect_dialect
from .errors import CheckpointError, _names

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
STAGING_DIR = ".minimax01-staging"   # a save before its commit point: ignored
COMMIT_DIR = ".minimax01-commit"     # a save after its commit point: its manifest rules
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Entry:
    file: str                 # file name inside the checkpoint folder
    shape: tuple[int, ...]
    dtype: str                # safetensors dtype code: "BF16", "F32", ...


def _read_json(path: Path, what: str, shown: Path | None = None) -> dict:
    shown = shown or path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{shown}: cannot read {what}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{shown}: {what} must be a JSON object")
    return data


def plain_name(name: str) -> bool:
    """A file name that stays inside its folder: no path separator, not "." or "..", not
    absolute (so an index or manifest naming `../x` or `/etc/x` is refused)."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not Path(name).is_absolute())


def read_manifest(commit: Path) -> list[str] | None:
    """The file names of a save committed into `commit` (writer.py); None when there is no
    manifest (its roll-forward finished) or it is not one we wrote."""
    try:
        data = json.loads((commit / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(files, list) or not files
            or not all(isinstance(f, str) and plain_name(f) and not f.startswith(".")
                       for f in files)):
        return None
    return files


class CheckpointReader:
    """Open with `CheckpointReader(path)` (or as a context manager, which closes the files).

    Attributes: `config_dict` (config.json), `config` (ModelConfig), `files` (weight files in
    order), `entries` (tensor name -> Entry), `dialect` ("legacy" or "hf", from tensor names)."""

    def __init__(self, path: str | Path, parse_config=None):
        """`parse_config(config.json dict)` makes `config` (default ModelConfig.from_hf_config;
        MiniMax-VL-01 passes VLConfig.from_hf_config)."""
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no checkpoint at {self.path}")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a checkpoint folder (expected a folder with "
                                  f"{CONFIG_NAME} and safetensors weights)")
        self._committed = self._committed_files()
        config_path = self.path / CONFIG_NAME
        if not self._isfile(CONFIG_NAME):
            raise CheckpointError(f"{self.path} is not a checkpoint: it has no {CONFIG_NAME}")
        self.config_dict = _read_json(self._where(CONFIG_NAME), "the model config", config_path)
        try:
            self.config = (parse_config or ModelConfig.from_hf_config)(self.config_dict)
            stated = config_dtype(self.config_dict)
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
        self.stated_dtype = stated
        if stated is None:  # no dtype in config.json: the dtype the weights are stored in
            self.config = self.config.replace(dtype=self.stored_dtype())

    # ------------------------------------------------------------------ files
    def _committed_files(self) -> set[str] | None:
        """The manifest of a save killed after its commit point (None: no such save)."""
        commit = self.path / COMMIT_DIR
        files = read_manifest(commit) if commit.is_dir() else None
        return set(files) if files else None

    def _where(self, name: str) -> Path:
        """Where file `name` of this checkpoint is (the commit folder first, see above)."""
        if self._committed is not None and name in self._committed:
            staged = self.path / COMMIT_DIR / name
            if staged.is_file():
                return staged
        return self.path / name

    def _isfile(self, name: str) -> bool:
        if self._committed is not None and name not in self._committed:
            return False  # a file of the save being replaced
        return self._where(name).is_file()

    def stored_dtype(self) -> str:
        """The float dtype the weights are stored in: the embedding's, else the most common."""
        embed = self.entries.get("model.embed_tokens.weight")
        if embed is not None and name_of_code(embed.dtype):
            return name_of_code(embed.dtype)
        counts = Counter(e.dtype for e in self.entries.values() if name_of_code(e.dtype))
        return name_of_code(counts.most_common(1)[0][0]) if counts else "float32"

    # ------------------------------------------------------------------ opening
    def _weight_files(self) -> tuple[list[str], dict[str, str] | None]:
        index_path = self.path / INDEX_NAME
        if self._isfile(INDEX_NAME):
            index = _read_json(self._where(INDEX_NAME), "the shard index", index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index_path}: no 'weight_map' of tensor name -> file name")
            files = list(dict.fromkeys(weight_map.values()))
            outside = [f for f in files if not plain_name(f)]
            if outside:
                raise CheckpointError(f"{index_path} names {len(outside)} file(s) outside the "
                                      f"checkpoint folder: {_names(outside)}; shard names must "
                                      f"be plain file names")
            absent = [f for f in files if not self._isfile(f)]
            if absent:
                raise CheckpointError(f"{index_path} names {len(absent)} shard file(s) that do not "
                                      f"exist: {_names(absent)}")
            return files, weight_map
        if self._isfile(WEIGHTS_NAME):
            return [WEIGHTS_NAME], None
        shards = sorted(p.name for p in self.path.glob("*.safetensors") if self._isfile(p.name))
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
                handle = safe_open(str(self._where(file)), framework="pt", device="cpu")
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
        return sum(self._where(f).stat().st_size for f in self.files)

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
