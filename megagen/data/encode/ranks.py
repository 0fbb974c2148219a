"""This process's place in an encode job: rank, world size, and the two collectives the job needs.

Under torchrun (WORLD_SIZE > 1) a gloo process group is started for a barrier and for gathering the
summaries; nothing else crosses ranks — each rank decodes, encodes and writes its own shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """End the process group `ranks_from_env` started (torch warns about one left open at exit)."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def ranks_from_env() -> Ranks:
    """Ranks of a torchrun job (process group started here if needed), else a one-process job."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())
