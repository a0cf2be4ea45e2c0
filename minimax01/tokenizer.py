"""Tokenizers behind one small interface: a byte-level tokenizer (the default, needs no files) and
HF `tokenizer.json` files through the `tokenizers` library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

BYTE_TOKENIZER_NAME = "minimax01-byte"


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; 256 = <bos>, 257 = <eos>, 258 = <pad>. Lossless for any text."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258
    name = BYTE_TOKENIZER_NAME

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> None:
        Path(directory, "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": BYTE_TOKENIZER_NAME, "bos_token_id": self.bos_id,
                        "eos_token_id": self.eos_id, "pad_token_id": self.pad_id}, indent=2))


class HFTokenizer:
    """A `tokenizer.json` (BPE, Unigram, ...) with special tokens from `tokenizer_config.json`
    beside it when present."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        self.path = path
        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_path = path.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template = config.get("chat_template")

        def special(name: str, guesses: tuple[str, ...]) -> int | None:
            token = config.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            for t in ((token,) if token else ()) + guesses:
                tid = self._tok.token_to_id(t)
                if tid is not None:
                    return tid
            return None

        self.bos_id = special("bos_token", ("<s>", "<|begin_of_text|>", "<bos>"))
        self.eos_id = special("eos_token", ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"))
        self.pad_id = special("pad_token", ("<pad>", "<|pad|>"))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        import shutil

        shutil.copyfile(self.path, Path(directory, "tokenizer.json"))
        src = self.path.parent / "tokenizer_config.json"
        if src.is_file():
            shutil.copyfile(src, Path(directory, "tokenizer_config.json"))


def load_tokenizer(spec: str | Path | None = None):
    """`None` or "byte": the byte tokenizer; a `tokenizer.json` file, or a folder holding one (a
    checkpoint): that tokenizer; a folder whose tokenizer_config.json names the byte tokenizer, or
    that has no tokenizer at all: the byte tokenizer."""
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path / "tokenizer.json")
        return ByteTokenizer()
    if path.is_file():
        return HFTokenizer(path)
    raise FileNotFoundError(f"no tokenizer at {path} (give 'byte', a tokenizer.json, or a folder)")
