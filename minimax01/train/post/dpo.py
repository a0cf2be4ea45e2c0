"""The DPO loss (Rafailov et al. 2023) on per-sequence summed response log-probs, and the
per-sequence sum itself, correct when a sequence is split across context-parallel ranks.

    logits  = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    loss    = -(1 - eps) * log sigmoid(logits) - eps * log sigmoid(-logits)    (eps: label smoothing)
    rewards = beta * (pi - ref) for the chosen and the rejected response"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses [P] and per-pair metrics (detached [P] tensors): chosen_reward,
    rejected_reward, margin, accuracy (1 where the chosen reward is the larger)."""
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    return losses, {"chosen_reward": chosen, "rejected_reward": rejected,
                    "margin": chosen - rejected, "accuracy": (chosen > rejected).to(chosen.dtype)}


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
