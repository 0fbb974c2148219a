"""`data.verify` at training start-up, shared over the ranks: each checks 1/world of the shards.

Every rank of a job reads the same dataset, so checking every shard on every rank multiplies the file
system's work by the world size (and, with `checksum`, reads the whole dataset world times). Here rank r
checks every world-th shard from the r-th (stat + header; with `checksum` also its sha256), and one
all-gather of each rank's finding (a count and the first problem's file and reason: plain strings) lets
every rank raise the same one-line `DataError`: the first problem of the lowest rank that found any, with
the total count. A shard another rank checked has its header read here lazily, when it is first read.
"""

from __future__ import annotations

import torch.distributed as dist

from megagen.data.format import DataError, first_problem
from megagen.data.shard_reader import ShardReader


def verify_on_ranks(reader: ShardReader, mode: str, rank: int = 0, world: int = 1) -> None:
    """Check this rank's share of `reader`'s shards as `mode` ("none", "size", "checksum") says; raise the
    job's first problem on every rank (a collective when `world` > 1: every rank must call it)."""
    if mode == "none":
        return
    problems = reader.shard_problems(mode, rank, world)
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        if problems:
            raise first_problem(problems, len(problems), reader.path)
        return
    mine = (len(problems), problems[0].reason, problems[0].file) if problems else None
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    found = [(r, f) for r, f in enumerate(every) if f is not None]
    if not found:
        return
    total = sum(f[0] for _, f in found)
    by, (_, reason, file) = found[0]
    error = first_problem([DataError(f"{reason} (found by rank {by})", file=file)], total, reader.path)
    error.rank_local = False  # every rank raises the same error: reported once for the job
    raise error
