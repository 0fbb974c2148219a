"""CP overlap on vs off, side by side: one self-attention's forward+backward on cp=2 (gloo, CPU).

For each sequence length both CP kinds run with `overlap` off (the SDPA path: gathered K/V, or three
all-to-alls) and on (fused LSE-kernel attention under the K/V all-gather, parallel/cp_overlap.py; Ulysses
pipelined over head groups, parallel/ulysses_pipeline.py) in this one invocation. The table shows the median
time per forward+backward, the ratio on/off, and the Ulysses head-group count the shared rule
(parallel/overlap_schedule.py) picks. The flag is set on the `ContextParallelAttention` wrapper directly.

    python benchmarks/overlap_cp.py [--tokens 1024 2048 4096] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megagen.kernels.attention import AttentionCore
from megagen.parallel.context_parallel import ContextParallelAttention
from megagen.parallel.overlap_schedule import ulysses_head_chunks

HEADS, HEAD_DIM, BATCH, CP = 8, 64, 1, 2


def time_case(kind: str, overlap: bool, tokens: int, repeat: int) -> float:
    """Median seconds of forward+backward on this rank's half of `tokens`."""
    core = ContextParallelAttention(AttentionCore(), kind, dist.group.WORLD, overlap)
    gen = torch.Generator().manual_seed(dist.get_rank())
    shape = (BATCH, tokens // CP, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=gen, requires_grad=True) for _ in range(3))
    times = []
    for _ in range(repeat + 1):  # the first call warms up
        dist.barrier()
        start = time.perf_counter()
        core(q, k, v).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def worker(rank: int, tokens: list[int], repeat: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29513")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=CP)
    if rank == 0:
        print(f"{'tokens':>7s} {'kind':>13s} {'off ms':>8s} {'on ms':>8s} {'on/off':>7s} {'groups':>7s}")
    for n in tokens:
        for kind in ("allgather_kv", "ulysses"):
            off, on = (time_case(kind, flag, n, repeat) for flag in (False, True))
            groups = ulysses_head_chunks(HEADS, CP, n // CP, HEAD_DIM) if kind == "ulysses" else "-"
            if rank == 0:
                print(f"{n:7d} {kind:>13s} {off * 1e3:8.1f} {on * 1e3:8.1f} {on / off:7.2f} {groups:>7}")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per case (after one warm-up)")
    args = ap.parse_args()
    mp.spawn(worker, args=(args.tokens, args.repeat), nprocs=CP)


if __name__ == "__main__":
    main()
