"""Per-rank bodies of tests/distributed/test_progress.py (run through the worker pool)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from megagen.parallel.collectives import all_gather_along, all_reduce_sum
from megagen.parallel.comm import CommCounter, mesh_axis_groups
from megagen.parallel.progress import CollectiveProgress


def counts_match_the_comm_counter() -> dict:
    """FSDP2 forward + backward, megagen's functional collectives and a plain all-reduce on a 2x2
    (dp_shard, tp) mesh: the per-group sequence numbers advance by exactly the collectives issued."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    axes = mesh_axis_groups(mesh)
    progress = CollectiveProgress({**axes, "world": dist.group.WORLD})
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    for layer in model:
        fully_shard(layer, mesh=mesh["dp_shard"])
    fully_shard(model, mesh=mesh["dp_shard"])
    before = progress.sequence_numbers()
    with CommCounter(axes) as comm:
        model(torch.randn(3, 6)).sum().backward()
        all_gather_along(torch.ones(2, 3), 0, mesh.get_group("tp"))
        all_reduce_sum(torch.ones(4), mesh.get_group("tp"))
        dist.all_reduce(torch.ones(1))
    after = progress.sequence_numbers()
    calls = {axis: sum(k["calls"] for k in kinds.values()) for axis, kinds in comm.summary().items()}
    return {
        "after": {progress.axis_of[g]: n for g, n in after.items()},
        "delta": {progress.axis_of[g]: after[g] - before[g] for g in after},
        "calls": calls,
        "members": {progress.axis_of[g]: ranks for g, ranks in progress.members.items()},
        "pending": progress.pending(),
    }


def a_late_rank_has_a_lower_number() -> dict:
    """Rank 0 issues an all-reduce that rank 1 joins only after a barrier: meanwhile rank 0's number on
    that group is one ahead of rank 1's, which is how a report tells who has not reached a collective."""
    group = dist.new_group([0, 1])
    progress = CollectiveProgress({"pair": group})
    name = group.group_name
    rank = dist.get_rank()
    work = None
    if rank == 0:
        work = dist.all_reduce(torch.ones(2), group=group, async_op=True)
    during = progress.sequence_numbers()[name]
    dist.barrier()
    if rank == 1:
        dist.all_reduce(torch.ones(2), group=group)
    else:
        work.wait()
    return {"during": during, "after": progress.sequence_numbers()[name]}
