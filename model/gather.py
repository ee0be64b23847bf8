"""Gathering rows from every rank of a process group, with gradients routed back to their owner."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        rank, size = world(group)
        ctx.group, ctx.rank, ctx.rows = group, rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        # Every rank's loss used every gathered row, so the gradient of a row is the sum of the
        # gradients all ranks computed for it: all-reduce (sum), then keep this rank's slice.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All ranks' `tensor` rows concatenated in rank order; differentiable (see backward)."""
    if world(group)[1] == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, group)


def gather_no_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All ranks' `tensor` rows in rank order, for ids and other values that carry no gradient."""
    if world(group)[1] == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world(group)[1])]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def gather_padded(tensor: torch.Tensor, group: dist.ProcessGroup | None = None, pad: int = -1) -> torch.Tensor:
    """All ranks' 2-D `tensor` rows in rank order, padded with `pad` to the widest rank's width
    (ranks' history widths differ); no gradient."""
    if world(group)[1] == 1:
        return tensor
    width = torch.tensor([tensor.shape[1]], device=tensor.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
    padded = F.pad(tensor, (0, int(width) - tensor.shape[1]), value=pad)
    return gather_no_grad(padded, group)


def gather_ragged(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All ranks' rows of `tensor` in rank order, when ranks hold different numbers of rows; no gradient."""
    if world(group)[1] == 1:
        return tensor
    rows = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = gather_no_grad(rows, group).tolist()
    widest = max(counts)
    padded = F.pad(tensor, (*[0, 0] * (tensor.dim() - 1), 0, widest - tensor.shape[0]))
    parts = gather_no_grad(padded.contiguous(), group).split(widest)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])
