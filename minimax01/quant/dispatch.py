"""An inference MoE dispatcher for quantised experts with no host synchronisation (CUDA graphs):
`infer.moe_dispatch.sync_free_dispatch` with the expert matmuls left to `moe.experts(x, counts)`
(which for QuantizedExperts takes device counts and never syncs). The serving engine installs it
for models whose experts name it as their `inference_dispatcher`."""

from __future__ import annotations

import torch

from ..ops.moe import combine


def quantized_dispatch(moe, flat: torch.Tensor, routing):
    n, k = routing.experts.shape
    assignments = routing.experts.reshape(-1)  # token-major: token * k + choice
    order = torch.argsort(assignments, stable=True)
    counts = torch.zeros(moe.num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, assignments, torch.ones_like(assignments, dtype=torch.int32))
    y = moe.experts(flat[order // k], counts)
    out = combine(y, order, routing.weights, n)
    return out.to(flat.dtype), flat.new_zeros((), dtype=torch.float32), None
