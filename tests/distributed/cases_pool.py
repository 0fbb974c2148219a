"""Per-rank bodies of tests/distributed/test_pool.py."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def identity(value):
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "value": value,
        "rank_sum": total.item(),
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
        "tensor": torch.full((2,), float(dist.get_rank())),
    }


def fail_on(bad_rank: int):
    if dist.get_rank() == bad_rank:
        raise ValueError(f"deliberate failure on rank {bad_rank}")
    dist.all_reduce(torch.ones(1))  # the others block here: the failed rank never joins
    return "unreachable"


def die_on(bad_rank: int):
    if dist.get_rank() == bad_rank:
        os._exit(3)
    dist.all_reduce(torch.ones(1))
    return "unreachable"


def hang_on(bad_rank: int):
    """`bad_rank` waits in a collective nobody else issues: a hang only the call timeout can end."""
    if dist.get_rank() == bad_rank:
        dist.all_reduce(torch.ones(1))
    return "ok"
