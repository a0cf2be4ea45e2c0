"""Loss and gradient scaling: the one place that says why a distributed step's gradients equal
one process's on the concatenated batch.

Gradients. FSDP2 divides every reduced gradient by the world size W: the dense parameters are
reduced over all W ranks (dp_replicate x dp_shard x cp), and the experts, reduced over their
smaller expert-data-parallel mesh, get the same divide factor W explicitly, because the
all-to-all's backward has already summed the other EP ranks' contributions into each expert's
owner. So every gradient is the *mean over ranks* of the ranks' gradients, and each rank must
backpropagate W times its share of the step's loss (`rank_loss`):

  * lm loss: the mean over every target token of the global batch. A rank's share is its token
    sum over the global target count n_global: it backpropagates W * lm_sum / n_global.
  * aux loss: the MoE pipeline returns, per rank, its share of its router group's loss (the
    shares of a group's S ranks sum to the group's loss, ops/moe.py). The step's aux loss is the
    mean over the W / S router groups (like gradient-accumulation steps) of their losses, so a
    rank backpropagates W * share / (W / S) = S * share, divided by the number of micro-batches.

In one process W = S = 1 and this is the plain mean. `mean_aux` turns the all-reduced sum of the
ranks' shares back into the step's aux loss (for logs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossScale:
    world_size: int = 1   # W: ranks whose gradients FSDP averages
    router_size: int = 1  # S: ranks of one MoE router group

    @property
    def gradient_divide_factor(self) -> float:
        """What FSDP divides every reduced gradient by (every parameter group)."""
        return float(self.world_size)

    def rank_loss(self, lm_sum: torch.Tensor, n_global: torch.Tensor | float,
                  aux_share: torch.Tensor, micro: int = 1) -> torch.Tensor:
        """The loss this rank backpropagates for one of `micro` micro-batches: `lm_sum` is the
        token sum of its lm loss, `n_global` the step's global target count (all micro-batches,
        all ranks), `aux_share` the model's `aux_loss` on this rank."""
        return lm_sum * (self.world_size / n_global) + aux_share * (self.router_size / micro)

    def mean_aux(self, aux_share_sum: torch.Tensor) -> torch.Tensor:
        """The step's aux loss from the sum over all ranks of their aux shares."""
        return aux_share_sum * (self.router_size / self.world_size)
