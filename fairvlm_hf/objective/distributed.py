"""Cross-process helpers: rank, world size and an all-gather that carries gradients.

The contrastive loss uses the global batch as negatives and the group regulariser compares
distributions over the global batch, so per-rank tensors must be concatenated over processes.
``torch.distributed.all_gather`` cuts the graph, and ``torch.distributed.nn.all_gather`` is not
available on every backend (gloo), hence the small autograd function below.

Gradient bookkeeping. If every rank ``r`` minimises
``J_r = mean_{i local}(w_i l_i) + lambda * R(all_gather_with_grad(l))`` and the optimiser
averages gradients over the ``W`` ranks (as DDP does), the update is exactly the gradient of
``mean_{global}(w l) + lambda * R``: the backward of the gather sums the gradient that every rank
sends to a local row (``W`` identical copies for ``R``), and the DDP average divides by ``W``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if _is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if _is_distributed() else 0


def _check_same_shape(x: Tensor, name: str) -> None:
    """Raise a clear error when ranks hold tensors of different shapes (all_gather would fail)."""
    if not 1 <= x.dim() <= 8:
        raise ValueError(
            f"{name}: expected a tensor of 1 to 8 dimensions, got shape {tuple(x.shape)}"
        )
    shape = torch.tensor([x.dim(), *x.shape, *([0] * (8 - x.dim()))], device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        per_rank = [tuple(s[1 : 1 + int(s[0])].tolist()) for s in shapes]
        raise ValueError(
            f"{name}: every rank must pass a tensor of the same shape, got {per_rank} "
            "(rank order); pad the last batch or drop it (accelerate's even_batches does this)"
        )


def _gather(x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate over ranks along dim 0; backward sums the gradient over ranks, keeps the slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rank = rank()
        ctx.rows = x.shape[0]
        return _gather(x.contiguous())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return total[start : start + ctx.rows]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` over ranks along dim 0, differentiably.

    Every rank must pass a tensor of the same shape (checked; a mismatch raises ValueError).
    Rows ``[r * B, (r + 1) * B)`` of the result come from rank ``r``. The backward pass
    all-reduces (sums) the incoming gradient and returns this rank's slice, so each local row
    receives the gradient that every rank's objective sends to it. Identity when the world size
    is 1. All ranks must call it the same number of times, in the same order (it is a collective).
    """
    if world_size() == 1:
        return x
    _check_same_shape(x, "all_gather_with_grad")
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` over ranks along dim 0 without a graph (ids, attributes, detached values).

    Same shape on every rank required (checked). Identity when the world size is 1.
    """
    if world_size() == 1:
        return x.detach()
    _check_same_shape(x, "all_gather_no_grad")
    return _gather(x.detach().contiguous())
