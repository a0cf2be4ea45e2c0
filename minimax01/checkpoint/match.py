"""Matching a checkpoint's tensors to a model's parameters: every problem found at once (missing,
unexpected, wrong shape or dtype), before a single tensor is read; then reading one model
parameter at a time, assembled from its checkpoint pieces (legacy per-expert tensors) or cut out
of a stacked tensor (hf), without materialising anything else."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dialects import DERIVED, Piece, layout
from .errors import CheckpointError
from ..dtypes import FLOAT_CODES, from_safetensors_code
from .reader import CheckpointReader

TIED_HEAD = "lm_head.weight"


@dataclass
class Match:
    reader: CheckpointReader
    param_shapes: dict[str, tuple[int, ...]]  # model parameter -> shape, in model order
    by_param: dict[str, list[Piece]]
    tied: bool                                # lm_head shares the embedding

    @property
    def dialect(self) -> str:
        return self.reader.dialect

    def read_param(self, param: str, index: tuple = (), dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """Model parameter `param` (or its part `index`), in `dtype` (default: as stored) on `device`."""
        parts = self.by_param[param]
        if len(parts) == 1 and parts[0].index == ():
            t = self.reader.read(parts[0].name, index)
        else:
            exact = [p for p in parts if p.index == index] if index else []
            if exact:
                t = self.reader.read(exact[0].name)
            else:
                stored = from_safetensors_code(self.reader.entries[parts[0].name].dtype)
                t = torch.empty(self.param_shapes[param], dtype=dtype or stored, device=device)
                for p in parts:
                    t[p.index].copy_(self.reader.read(p.name))
                t = t[index] if index else t
        return t.to(device=device, dtype=dtype)

    def check_tied_head(self) -> None:
        """A tied checkpoint that still stores lm_head.weight must store the embedding there."""
        if self.tied and TIED_HEAD in self.reader.entries:
            if not torch.equal(self.reader.read(TIED_HEAD),
                               self.reader.read("model.embed_tokens.weight")):
                raise CheckpointError(f"{self.reader.path}: the config ties the embeddings "
                                      f"(tie_word_embeddings) but {TIED_HEAD} differs from "
                                      f"model.embed_tokens.weight")


def param_shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Persistent tensors of a (meta) model, the tied lm_head left out."""
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        shapes.pop(TIED_HEAD, None)
    return shapes


def match(reader: CheckpointReader, param_shapes: dict[str, tuple[int, ...]],
          tied: bool = False) -> Match:
    """Pair the checkpoint's tensors with the model's; raise one CheckpointError naming every
    missing, unexpected and mis-shaped tensor. Derived decay buffers that transformers stores
    are accepted and ignored."""
    expected = layout(param_shapes, reader.dialect)
    found = reader.entries
    missing = [n for n in expected if n not in found]
    unexpected, mismatched = [], {}
    for name, entry in found.items():
        piece = expected.get(name)
        if piece is None:
            if DERIVED.fullmatch(name):
                continue
            if tied and name == TIED_HEAD:
                want = param_shapes.get("model.embed_tokens.weight")
                if entry.shape != want:
                    mismatched[name] = f"shape {list(entry.shape)}, expected {list(want)}"
                continue
            unexpected.append(name)
        elif entry.shape != piece.shape:
            mismatched[name] = f"shape {list(entry.shape)}, expected {list(piece.shape)}"
        elif entry.dtype not in FLOAT_CODES:
            mismatched[name] = f"dtype {entry.dtype}, expected a float type"
    if missing or unexpected or mismatched:
        raise CheckpointError.from_problems(
            f"checkpoint {reader.path} ({reader.dialect} dialect) does not match its config",
            missing, unexpected, mismatched)
    by_param: dict[str, list[Piece]] = {p: [] for p in param_shapes}
    for piece in expected.values():
        by_param[piece.param].append(piece)
    return Match(reader, dict(param_shapes), by_param, tied)
