"""The one module that knows ranks and process groups. Everything else asks it."""

from __future__ import annotations

import os

import torch.distributed as torch_dist


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    """Global rank: from the process group when there is one, else the launcher's RANK, else 0."""
    return torch_dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def all_gather_object(obj):
    """Every rank's ``obj`` as a list indexed by rank (``[obj]`` without a process group)."""
    if not is_initialized():
        return [obj]
    gathered = [None] * world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def all_gather(tensor):
    """Every rank's ``tensor`` (same shape everywhere) concatenated along dim 0 in rank order, without
    gradient (e.g. contrastive keys shared as negatives); ``tensor`` itself without a process group."""
    if not is_initialized():
        return tensor
    import torch

    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
