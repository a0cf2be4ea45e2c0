"""Document sources, read as a stream: nothing here loads a whole corpus into memory.

A source is a list of shards (files, or one synthetic stream). A shard yields `Unit`s - a whole
document (a JSONL line, a parquet / Arrow row, a synthetic example) or a piece of one (text files
are read in ~4 KiB pieces cut at line ends). Every unit carries `pos`, the place to reopen the
shard at that unit, which makes the stream resumable and gives the held-out split a stable key."""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .synthetic import TASKS, make_example

PIECE_BYTES = 4096         # text files are streamed in pieces of about this size ...
MAX_LINE_BYTES = 1 << 16   # ... and a line longer than this is cut (at a UTF-8 boundary)
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".js",
                 ".ts", ".java", ".go", ".rs", ".tex", ".html", ".css", ".sh", ".toml", ".yaml",
                 ".yml"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
ARROW_SUFFIXES = {".arrow"}


@dataclass(frozen=True)
class Unit:
    text: str
    pos: int          # reopen the shard here to read this unit again
    new_doc: bool     # first piece of a document
    ends_doc: bool    # last piece of a document


class TextFile:
    """A text file is one document, streamed in pieces cut at line ends (pos = byte offset)."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def units(self, start: int = 0) -> Iterator[Unit]:
        with open(self.path, "rb") as f:
            f.seek(start)
            pos = start
            while True:
                piece = bytearray()
                while len(piece) < PIECE_BYTES:
                    line = f.readline(MAX_LINE_BYTES)
                    if not line:
                        break
                    if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
                        keep = _utf8_boundary(line)
                        f.seek(keep - len(line), os.SEEK_CUR)
                        line = line[:keep]
                    piece += line
                if not piece:
                    return
                end = f.tell()
                ends = not f.read(1)
                f.seek(end)
                yield Unit(piece.decode("utf-8", errors="replace"), pos, pos == 0, ends)
                pos = end


def _utf8_boundary(data: bytes) -> int:
    """Largest cut <= len(data) that does not split a UTF-8 character."""
    cut = len(data)
    while cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
        cut -= 1
    if cut > 0 and data[cut - 1] >= 0xC0:  # a lead byte whose continuation got cut off
        cut -= 1
    return cut or len(data)


class JsonlFile:
    """One JSON object per line; its `text_field` is a document (pos = byte offset)."""

    def __init__(self, path: Path, name: str, text_field: str):
        self.path, self.name, self.field = path, name, text_field

    def units(self, start: int = 0) -> Iterator[Unit]:
        with open(self.path, "rb") as f:
            f.seek(start)
            pos = start
            for line in iter(f.readline, b""):
                here, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}: bad JSON at byte {here}: {e}") from None
                text = obj.get(self.field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{self.path}: the line at byte {here} has no string field "
                                     f"{self.field!r} (set data.text_field)")
                yield Unit(text, here, True, True)


def _pyarrow():
    try:
        import pyarrow
    except ImportError:
        raise ValueError("reading parquet / Arrow data needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _text_column(schema, field: str, path: Path) -> int:
    names = list(schema.names)
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(names)}); "
                         f"set data.text_field")
    return names.index(field)


def _batch_units(batches, column: int, start: int) -> Iterator[Unit]:
    """Rows of record batches (row i of the shard at pos i), from row `start`."""
    row = 0
    for batch in batches:
        n = batch.num_rows
        if row + n <= start:
            row += n
            continue
        texts = batch.column(column).to_pylist()
        for i in range(max(start - row, 0), n):
            text = texts[i]
            if text is not None:
                yield Unit(text, row + i, True, True)
        row += n


class ParquetFile:
    """One document per row (pos = row index); row groups before `start` are never read."""

    def __init__(self, path: Path, name: str, text_field: str):
        self.path, self.name, self.field = path, name, text_field

    def units(self, start: int = 0) -> Iterator[Unit]:
        _pyarrow()
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.path)
        _text_column(pf.schema_arrow, self.field, self.path)
        first, row = 0, 0
        meta = pf.metadata
        while first < meta.num_row_groups and row + meta.row_group(first).num_rows <= start:
            row += meta.row_group(first).num_rows
            first += 1
        groups = list(range(first, meta.num_row_groups))
        if not groups:
            return
        batches = pf.iter_batches(row_groups=groups, columns=[self.field], batch_size=1024)
        for u in _batch_units(batches, 0, start - row):
            yield Unit(u.text, u.pos + row, True, True)


class ArrowFile:
    """An Arrow IPC file as `datasets.save_to_disk` writes it (stream format; the random-access
    file format is read too). Memory-mapped; one document per row (pos = row index)."""

    def __init__(self, path: Path, name: str, text_field: str):
        self.path, self.name, self.field = path, name, text_field

    def units(self, start: int = 0) -> Iterator[Unit]:
        pa = _pyarrow()
        source = pa.memory_map(str(self.path))
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        column = _text_column(reader.schema, self.field, self.path)
        yield from _batch_units(batches, column, start)


class Synthetic:
    """An endless stream of synthetic task examples, cycling through `tasks` (pos = index)."""

    name = "synthetic"

    def __init__(self, tasks: list[str], length: int, seed: int):
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"data.synthetic_tasks: unknown task {bad[0] if bad else None!r}; "
                             f"choose from {', '.join(TASKS)}")
        self.tasks, self.length, self.seed = list(tasks), length, seed

    def units(self, start: int = 0) -> Iterator[Unit]:
        i = start
        while True:
            task = self.tasks[i % len(self.tasks)]
            yield Unit(make_example(task, i, self.seed, self.length).text, i, True, True)
            i += 1


def stdlib_dir() -> Path:
    """This Python's standard library sources (real text on every machine)."""
    path = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    return Path(path)


def stdlib_shards() -> list[TextFile]:
    """Every `.py` file of the standard library, its test suites and site-packages left out."""
    root = stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "dist-packages", "test", "tests",
                                          "__pycache__", "idle_test") and not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith(".py"):
                p = Path(dirpath, f)
                files.append(TextFile(p, p.relative_to(root).as_posix()))
    if not files:
        raise FileNotFoundError(f"data.source 'stdlib': no .py files under {root}")
    return files


def _file_shard(path: Path, name: str, fmt: str, text_field: str):
    suffix = path.suffix.lower()
    if fmt == "auto":
        fmt = ("jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES
               else "arrow" if suffix in ARROW_SUFFIXES else "text" if suffix in TEXT_SUFFIXES
               else None)
    if fmt == "jsonl":
        return JsonlFile(path, name, text_field)
    if fmt == "parquet":
        return ParquetFile(path, name, text_field)
    if fmt == "arrow":
        return ArrowFile(path, name, text_field)
    if fmt == "text":
        return TextFile(path, name)
    return None


def hf_saved_dataset(folder: Path, text_field: str) -> list[ArrowFile] | None:
    """The Arrow files of a `datasets` `save_to_disk` folder, in order; a DatasetDict folder
    gives its "train" split (else its first). None if `folder` is not such a folder."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits") or []
        if not splits:
            raise ValueError(f"{folder}/dataset_dict.json lists no splits")
        split = "train" if "train" in splits else splits[0]
        return hf_saved_dataset(folder / split, text_field)
    state = folder / "state.json"
    if not state.is_file():
        return None
    files = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    if not files:
        files = sorted(p.name for p in folder.glob("*.arrow"))
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: state.json names {missing[0]}, which is missing")
    return [ArrowFile(folder / f, f, text_field) for f in files]


def open_source(source: str, fmt: str = "auto", text_field: str = "text",
                synthetic_tasks=TASKS, synthetic_length: int = 2048, seed: int = 0) -> list:
    """The shards of `source`: "stdlib", "synthetic", a file, or a folder (a `save_to_disk`
    dataset, or a tree of text / JSONL / parquet / Arrow files). Raises a one-line error for a
    missing or empty path."""
    if source == "stdlib":
        return stdlib_shards()
    if source == "synthetic":
        return [Synthetic(list(synthetic_tasks), synthetic_length, seed)]
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.source: no such file or folder: {source}")
    if path.is_file():
        shard = _file_shard(path, path.name, "text" if fmt == "auto" and not path.suffix else fmt,
                            text_field)
        if shard is None:
            raise ValueError(f"data.source {source}: unknown file type {path.suffix!r}; set "
                             f"data.format to text, jsonl, parquet or arrow")
        if path.stat().st_size == 0:
            raise ValueError(f"data.source {source} is empty")
        return [shard]
    if fmt in ("auto", "arrow"):
        saved = hf_saved_dataset(path, text_field)
        if saved is not None:
            return saved
    shards = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            p = Path(dirpath, f)
            if f.startswith(".") or p.stat().st_size == 0:
                continue
            shard = _file_shard(p, p.relative_to(path).as_posix(), fmt, text_field)
            if shard is not None:
                shards.append(shard)
    if not shards:
        raise ValueError(f"data.source {source}: no non-empty data files in this folder "
                         f"(looked for text, .jsonl, .parquet and .arrow files)")
    return shards
