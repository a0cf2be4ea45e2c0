"""Log-probs of the sampled / given tokens, and their sums per packed sequence (DPO's sequence
log-probs, GRPO's per-sequence means), correct when a sequence is split across context-parallel
ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position ([..., V] logits, [...] targets; 0 where target is -100)."""
    valid = targets >= 0
    lp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                          targets.clamp(min=0).reshape(-1), reduction="none")
    return lp.view(targets.shape) * valid


def sequence_sums(values: torch.Tensor, seq_index: torch.Tensor, num_sequences: int,
                  cp_group=None) -> torch.Tensor:
    """[num_sequences] sums of `values` over the positions of each sequence (`seq_index` >= 0;
    -1 positions are skipped). With `cp_group` (the context-parallel group, whose ranks hold
    slices of the same rows) the value is the sum over every slice, and the gradient reaches
    each rank's own positions exactly once: the other ranks' parts enter as a constant."""
    keep = seq_index >= 0
    sums = values.new_zeros(num_sequences).index_add(0, seq_index[keep], values[keep])
    if cp_group is None:
        return sums
    import torch.distributed as dist

    total = sums.detach().clone()
    dist.all_reduce(total, group=cp_group)
    return sums + (total - sums.detach())


def batch_logprobs(model, batch: dict, chunk_size: int = 0):
    """(model output, flat [N] log-probs of `batch["labels"]`, next-token targets already):
    through the model's per-token loss, chunked when `chunk_size` > 0 (train.loss_chunk_size:
    no [N, V] logits are ever held)."""
    out = model(batch["input_ids"], labels=batch["labels"], cu_seqlens=batch.get("cu_seqlens"),
                position_ids=batch.get("position_ids"), shift_labels=False,
                loss_chunk_size=chunk_size, reduction="none")
    return out, -out.lm_loss.reshape(-1)
