"""Per-rank body of tests/distributed/test_inflight_collectives.py: a stream of issued-but-not-waited
collectives on one group, the way the overlapped paths leave them, every result checked."""

from __future__ import annotations

import random

import torch
import torch.distributed as dist

from megagen.parallel.collectives import _F, _name, _wait, issue_all_gather
from megagen.parallel.comm import CommCounter

SHAPES = ((2, 8, 64), (4, 8, 64), (2, 32, 64))


def _issue(kind: str, i: int, shape, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(pending result, expected result) of op i; every rank's input is filled with i + its rank."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    value = float(i % 97)
    if kind == "all_gather":
        x = torch.full(shape, value + rank)
        want = torch.cat([torch.full(shape, value + r) for r in range(n)])
        return issue_all_gather(x, n, group), want
    x = torch.full((shape[0] * n, *shape[1:]), value + rank)
    summed = float(sum(value + r for r in range(n)))
    if kind == "reduce_scatter":
        return _F.reduce_scatter_tensor(x, "sum", n, _name(group)), torch.full(shape, summed)
    return _F.all_reduce(x, "sum", _name(group)), torch.full(x.shape, summed)


def sliding_window(ops: int, window: int, kinds: list[str]) -> dict:
    """Issue `ops` collectives keeping up to `window` in flight, waiting them in a random order (the same
    on every rank); returns the number of wrong results and the accounting's all_gather count."""
    group = dist.new_group(list(range(dist.get_world_size())))
    rng = random.Random(0)
    wrong, pending = 0, []
    with CommCounter(keep_records=False) as counter:
        for i in range(ops):
            kind = kinds[i % len(kinds)]
            pending.append(_issue(kind, i, SHAPES[rng.randrange(len(SHAPES))], group))
            while len(pending) > rng.randint(0, window):
                got, want = pending.pop(rng.randrange(len(pending)))
                wrong += not torch.equal(_wait(got), want)
        for got, want in pending:
            wrong += not torch.equal(_wait(got), want)
    gathers = [kinds["all_gather"] for kinds in counter.summary().values() if "all_gather" in kinds]
    dist.destroy_process_group(group)
    return {"wrong": wrong, "all_gathers": gathers}
