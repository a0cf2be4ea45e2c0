"""Cutting a data-parallel rank's batch into context-parallel slices, and counting targets.

Under CP, rank c of a CP group gets tokens [c*T/C, (c+1)*T/C) of every row. What each slice
cannot compute locally is prepared here from the whole row: next-token targets (the last token
of a slice predicts the first token of the next slice), global position ids (positions inside
each document, for RoPE and for the document structure LASP+ and ring attention read), and the
slice's own `cu_seqlens`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.model import IGNORE_INDEX, document_start_mask, positions_from_cu_seqlens


def next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The model's label shift: targets[t] = labels[t+1], ignored at the last position and where
    t+1 starts a new document."""
    targets = labels[:, 1:]
    if cu_seqlens is not None:
        starts = document_start_mask(cu_seqlens, labels.shape[1])[1:]
        targets = targets.masked_fill(starts[None], IGNORE_INDEX)
    return F.pad(targets, (0, 1), value=IGNORE_INDEX)


def local_cu_seqlens(cu_seqlens: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Document offsets of the slice [lo, hi) of a packed row, relative to lo."""
    inner = cu_seqlens[(cu_seqlens > lo) & (cu_seqlens < hi)] - lo
    edge = cu_seqlens.new_tensor([0])
    return torch.cat([edge, inner, edge + (hi - lo)]).to(torch.int32)


def cp_slice(batch: dict, rank: int, size: int) -> dict:
    """This CP rank's part of `batch` (keys of the model's forward: input_ids, labels,
    cu_seqlens, position_ids, attention_mask, shift_labels). Other keys pass through."""
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(ids.shape)}")
    rows, total = ids.shape
    if total % size:
        raise ValueError(f"sequence length {total} is not divisible by parallel.cp={size}")
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("padded batches (attention_mask with zeros) are not supported under "
                         "context parallelism; pack documents with cu_seqlens instead")
    cu = batch.get("cu_seqlens")
    pos = batch.get("position_ids")
    if pos is None:
        pos = (positions_from_cu_seqlens(cu, total)[None] if cu is not None
               else torch.arange(total, device=ids.device)[None])
    pos = pos.expand(rows, total) if pos.dim() == 2 else pos[None].expand(rows, total)
    n = total // size
    lo, hi = rank * n, (rank + 1) * n
    out = {k: v for k, v in batch.items() if k != "attention_mask"}
    out["input_ids"] = ids[:, lo:hi]
    out["position_ids"] = pos[:, lo:hi]
    if cu is not None:
        out["cu_seqlens"] = local_cu_seqlens(cu, lo, hi)
    labels = batch.get("labels")
    if labels is not None:
        targets = next_token_targets(labels, cu) if batch.get("shift_labels", True) else labels
        out["labels"] = targets[:, lo:hi]
        out["shift_labels"] = False
    return out
