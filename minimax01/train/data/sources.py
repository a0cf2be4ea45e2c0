"""Document sources, read as a stream: nothing here loads a whole corpus into memory.

A source is a list of shards (files, or one synthetic stream). A shard yields `Unit`s - a whole
document (a JSONL line, a parquet / Arrow row, a synthetic example) or a piece of one (text files
are read in ~4 KiB pieces cut at line ends). Every unit carries `pos`, the place to reopen the
shard at that unit, which makes the stream resumable and gives the held-out split a stable key.

Input is hostile by default: a malformed JSONL line (bad JSON, not UTF-8, no text field) is
skipped with a warning naming the file and line and a running count (`strict=True`,
`--data.strict true`, makes it an error); a text file that is not UTF-8, an unreadable parquet /
Arrow file, a dangling symlink or a symlink loop in a data folder is an error naming the path."""

from __future__ import annotations

import json
import os
import sys
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
WARN_LINES = 10            # bad JSONL lines warned about one by one, per file
PARQUET_SUFFIXES = {".parquet"}
ARROW_SUFFIXES = {".arrow"}


@dataclass(frozen=True)
class Unit:
    text: str
    pos: int          # reopen the shard here to read this unit again
    new_doc: bool     # first piece of a document
    ends_doc: bool    # last piece of a document
    tokens: tuple | None = None   # already tokenized (a chat conversation): these ids ...
    learn: tuple | None = None    # ... and which of them are targets (train/data/chat.py)


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
                try:
                    text = piece.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{self.path}: not UTF-8 text (byte {pos + e.start}); "
                                     f"convert it to UTF-8 or leave it out of data.source") from None
                yield Unit(text, pos, pos == 0, ends)
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
    """One JSON object per line; its `text_field` is a document (pos = byte offset). A bad line
    is skipped with a counted warning (each line once per process), or an error if `strict`."""

    def __init__(self, path: Path, name: str, text_field: str, strict: bool = False):
        self.path, self.name, self.field, self.strict = path, name, text_field, strict
        self.bad: dict[int, str] = {}  # line number -> why it was skipped

    def units(self, start: int = 0) -> Iterator[Unit]:
        with open(self.path, "rb") as f:
            lineno = _count_lines(f, start) if start else 0
            f.seek(start)
            pos = start
            for line in iter(f.readline, b""):
                here, pos = pos, pos + len(line)
                lineno += 1
                if not line.strip():
                    continue
                unit, why = self._unit(line, here)
                if why is not None:
                    self._bad_line(lineno, why)
                    continue
                yield unit

    def _unit(self, line: bytes, pos: int) -> tuple[Unit | None, str | None]:
        """The line's unit, or why it has none."""
        text, why = self._text(line)
        return (Unit(text, pos, True, True) if why is None else None), why

    def _text(self, line: bytes) -> tuple[str | None, str | None]:
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            return None, f"not UTF-8 (byte {e.start} of the line)"
        except (json.JSONDecodeError, RecursionError) as e:
            return None, f"not valid JSON ({e})"
        text = obj.get(self.field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            return None, f"no string field {self.field!r} (set data.text_field)"
        return text, None

    def _bad_line(self, lineno: int, why: str) -> None:
        where = f"{self.path} line {lineno}"
        if self.strict:
            raise ValueError(f"{where}: {why} (data.strict is true)")
        if lineno in self.bad:
            return
        self.bad[lineno] = why
        n = len(self.bad)
        if n <= WARN_LINES:
            more = "; further bad lines of this file are skipped without a warning each" \
                if n == WARN_LINES else ""
            print(f"warning: {where}: {why}; skipped ({n} bad line(s) in this file so far; "
                  f"--data.strict true makes this an error){more}", file=sys.stderr, flush=True)


def _count_lines(f, end: int) -> int:
    """Newlines in the first `end` bytes of open file `f` (the line number at byte `end`)."""
    f.seek(0)
    n, left = 0, end
    while left > 0:
        block = f.read(min(left, 1 << 20))
        if not block:
            break
        n += block.count(b"\n")
        left -= len(block)
    return n


def _arrow_errors():
    pa = _pyarrow()
    return (pa.ArrowException, OSError, UnicodeDecodeError)


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
        try:
            yield from self._units(start)
        except _arrow_errors() as e:
            raise ValueError(f"{self.path}: cannot read this parquet file ({e})") from None

    def _units(self, start: int) -> Iterator[Unit]:
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
        try:
            yield from self._units(start)
        except _arrow_errors() as e:
            raise ValueError(f"{self.path}: cannot read this Arrow file ({e})") from None

    def _units(self, start: int) -> Iterator[Unit]:
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


def _file_shard(path: Path, name: str, fmt: str, text_field: str, strict: bool = False,
                chat_shard=None):
    if fmt == "chat":  # every file is JSONL of conversations
        return chat_shard(path, name, strict)
    suffix = path.suffix.lower()
    if fmt == "auto":
        fmt = ("jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES
               else "arrow" if suffix in ARROW_SUFFIXES else "text" if suffix in TEXT_SUFFIXES
               else None)
    if fmt == "jsonl":
        return JsonlFile(path, name, text_field, strict)
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
        splits = _json_object(folder / "dataset_dict.json").get("splits") or []
        if not isinstance(splits, list) or not splits or not all(
                isinstance(s, str) and _plain(s) for s in splits):
            raise ValueError(f"{folder}/dataset_dict.json lists no splits")
        split = "train" if "train" in splits else splits[0]
        return hf_saved_dataset(folder / split, text_field)
    state = folder / "state.json"
    if not state.is_file():
        return None
    entries = _json_object(state).get("_data_files", [])
    files = [f.get("filename") if isinstance(f, dict) else None for f in entries] \
        if isinstance(entries, list) else [None]
    if not all(isinstance(f, str) and _plain(f) for f in files):
        raise ValueError(f"{state}: _data_files must name files inside {folder}")
    if not files:
        files = sorted(p.name for p in folder.glob("*.arrow"))
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: state.json names {missing[0]}, which is missing")
    return [ArrowFile(folder / f, f, text_field) for f in files]


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def _plain(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _walk(root: Path, source: str) -> Iterator[Path]:
    """Files under `root` in sorted order, following symlinked folders; a symlink loop, a
    dangling symlink or an unreadable entry is an error naming it. A folder reached twice
    (two links to it) is read once. Hidden files and folders are left out."""
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path, ancestors: tuple[tuple[int, int], ...]) -> Iterator[Path]:
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as e:
            raise ValueError(f"data.source {source}: cannot list {folder} ({e.strerror})") from None
        for p in entries:
            if p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except OSError as e:
                why = "a symlink loop" if e.errno == 40 else \
                    "a dangling symlink" if p.is_symlink() else e.strerror
                raise ValueError(f"data.source {source}: {p} is {why}") from None
            if p.is_dir():
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    raise ValueError(f"data.source {source}: symlink loop: {p} leads back to "
                                     f"{p.resolve()}")
                if key in seen:
                    continue
                seen.add(key)
                yield from walk(p, ancestors + (key,))
            elif st.st_size > 0:
                yield p

    st = root.stat()
    seen.add((st.st_dev, st.st_ino))
    yield from walk(root, ((st.st_dev, st.st_ino),))


def open_source(source: str, fmt: str = "auto", text_field: str = "text",
                synthetic_tasks=TASKS, synthetic_length: int = 2048, seed: int = 0,
                strict: bool = False, chat_shard=None) -> list:
    """The shards of `source`: "stdlib", "synthetic", a file, or a folder (a `save_to_disk`
    dataset, or a tree of text / JSONL / parquet / Arrow files). Raises a one-line error for a
    missing or empty path. `strict`: a malformed JSONL line is an error (default: skipped).
    fmt "chat": every file is JSONL of conversations, read by `chat_shard(path, name, strict)`
    (chat_data.ChatJsonlFile with its renderer)."""
    if fmt == "chat" and chat_shard is None:
        raise ValueError("data.format chat needs a chat renderer (TrainData makes one)")
    if fmt == "chat" and source in ("stdlib", "synthetic"):
        raise ValueError(f"data.format chat reads JSONL files of conversations; data.source "
                         f"{source!r} has none")
    if source == "stdlib":
        return stdlib_shards()
    if source == "synthetic":
        return [Synthetic(list(synthetic_tasks), synthetic_length, seed)]
    path = Path(source).expanduser()
    try:
        path.stat()
    except OSError as e:
        if path.is_symlink():
            raise ValueError(f"data.source {source} is a dangling symlink or a symlink loop") \
                from None
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"data.source: no such file or folder: {source}") from None
        raise ValueError(f"data.source {source}: {e.strerror}") from None
    if path.is_file():
        shard = _file_shard(path, path.name, "text" if fmt == "auto" and not path.suffix else fmt,
                            text_field, strict, chat_shard)
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
    for p in _walk(path, source):
        shard = _file_shard(p, p.relative_to(path).as_posix(), fmt, text_field, strict, chat_shard)
        if shard is not None:
            shards.append(shard)
    if not shards:
        raise ValueError(f"data.source {source}: no non-empty data files in this folder "
                         f"(looked for text, .jsonl, .parquet and .arrow files)")
    return shards
