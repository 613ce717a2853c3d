"""The pretext stages under ``torch.distributed`` (nnU-Net's DDP): every rank runs the stage on its share of the
batch, gradients are averaged over ranks before clipping, statistics that steer the stage (DINO's centre, the
head's running input statistics) are pooled over ranks, and only rank 0 writes files.

Without an initialised process group every function here is the single-process case (rank 0 of 1).
"""
from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on the rank that writes files (rank 0, or the only process)."""
    return world()[0] == 0


def barrier() -> None:
    """Waits for every rank (nothing without a process group)."""
    if world()[1] > 1:
        torch.distributed.barrier()


def shard(batch_size: int, rank: int, world_size: int) -> list[int]:
    """The sample indices of the global batch that ``rank`` computes: nnU-Net's and nnssl's split (each rank
    ``ceil(batch / world)`` samples, the last ranks fewer).

    Raises:
        ValueError: a batch smaller than the number of ranks (a rank would get no sample).
    """
    if batch_size < world_size:
        raise ValueError(f"the pretext batch ({batch_size}) must be at least the number of processes "
                         f"({world_size}): each rank computes part of it")
    per = -(-batch_size // world_size)
    return list(range(rank * per, min(batch_size, (rank + 1) * per)))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over ranks in place (returns it)."""
    if world()[1] > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def average_gradients(params) -> None:
    """Replaces each parameter's gradient by its mean over ranks (what DDP does; a parameter without a gradient on
    this rank counts as zero). Nothing without a process group."""
    _, size = world()
    if size == 1:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad)
        param.grad.div_(size)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Makes every rank's ``tensor`` rank ``src``'s (in place)."""
    if world()[1] > 1:
        torch.distributed.broadcast(tensor, src)
    return tensor


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Makes every parameter and buffer of ``module`` rank ``src``'s (a fresh head is initialised from each rank's
    own random stream; DDP does the same for the network it wraps)."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(tensor.data, src)
