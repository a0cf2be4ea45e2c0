"""The DPO loss (Rafailov et al. 2023) on per-sequence summed response log-probs
(logprobs.py sums them, also across context-parallel ranks).

    logits  = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    loss    = -(1 - eps) * log sigmoid(logits) - eps * log sigmoid(-logits)   (eps: smoothing)
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
