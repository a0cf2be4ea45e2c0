"""Autograd-aware collectives used by LASP+, ring attention and expert parallelism.

Thin wrappers over torch's functional collectives (asynchronous: the result is waited for on
first use, which lets an all-to-all overlap the compute issued after it), plus point-to-point
helpers for the ring. Names of the functional ops moved between torch releases; this file is
the one place that knows."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as fc

_all_gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
_reduce_scatter = (getattr(fc, "reduce_scatter_single_autograd", None)
                   or fc.reduce_scatter_tensor_autograd)
_all_gather_plain = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _ContiguousGrad(torch.autograd.Function):
    """Materialise a gathered tensor, and hand a contiguous gradient back to the collective.

    Forward: a copy, which waits for the functional collective and returns a plain tensor.
    Without it, view ops on the AsyncCollectiveTensor (e.g. `states[j]`) stay unwaited
    wrappers with no storage of their own, and a Triton kernel given one reads a bad pointer
    (illegal memory access on GPU). Backward: NCCL's reduce-scatter (all-gather's adjoint)
    rejects the strided gradients that slicing produces (gloo accepts them)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's `x` along a new leading dim: [G, *x.shape]. Backward is a
    reduce-scatter (each rank gets the sum over ranks of the gradient of its own piece)."""
    return wait(all_gather_async(x, group))


def all_gather_async(x: torch.Tensor, group) -> torch.Tensor:
    """`all_gather` issued but not waited for: pass the result to `wait` before use (the
    compute issued in between overlaps the collective)."""
    return _all_gather(x.contiguous().unsqueeze(0), 0, group)


def wait(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a functional collective's result (see _ContiguousGrad)."""
    return _ContiguousGrad.apply(x)


def reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """x [G, *s] on every rank -> [*s]: block r of the sum over ranks, on rank r.
    Differentiable (backward: all-gather); returns without waiting."""
    return _reduce_scatter(x.contiguous(), "sum", 0, group)[0]


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows `in_splits[j]` of x go to rank j; rows from rank j arrive in block `out_splits[j]`.
    Differentiable (backward is the reverse all-to-all); returns without waiting."""
    return fc.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


def all_gather_nograd(x: torch.Tensor, group) -> torch.Tensor:
    """[G, *x.shape] without autograd (counts, positions, flags)."""
    size = dist.get_world_size(group)
    x = x.contiguous().unsqueeze(0)
    out = x.new_empty((size,) + tuple(x.shape[1:]))
    _all_gather_plain(out, x, group=group)
    return out


def ring_exchange(send: torch.Tensor, group) -> tuple[torch.Tensor, list]:
    """Start sending `send` to the next rank of the ring and receiving the previous rank's
    tensor of the same shape. Returns (receive buffer, requests to wait on)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send.contiguous(), nxt, group),
           dist.P2POp(dist.irecv, recv, prv, group)]
    if rank % 2:  # odd ranks receive first: keeps rendezvous-style backends from deadlocking
        ops.reverse()
    return recv, dist.batch_isend_irecv(ops)


def wait_all(requests) -> None:
    for req in requests or ():
        req.wait()
