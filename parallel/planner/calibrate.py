"""`megagen plan --calibrate`: measure this machine's matmul rate and gloo/NCCL collective bandwidth."""

from __future__ import annotations

import time

import torch

from megagen.parallel.planner.cluster import Cluster


def _allreduce_gbps(nbytes: int = 8 << 20, repeats: int = 5) -> tuple[float, float]:
    """(bus GB/s, latency µs) of all-reduce on the current group, or loopback gloo with 1 rank if none."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 1.5, 50.0  # one process: nothing to measure; the cpu preset's loopback figures
    n = dist.get_world_size()
    x = torch.ones(nbytes // 4)
    small = torch.ones(1)
    dist.all_reduce(x)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(x)
    big = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(small)
    lat = (time.perf_counter() - t0) / repeats
    return nbytes * 2 * (n - 1) / n / big / 1e9, lat * 1e6 / max(1, n - 1)


def calibrate(peak_flops: float) -> Cluster:
    """A cluster file for this machine: the caller's measured fp32 matmul rate (`peak_flops`, FLOP/s; the
    CLI measures it with `megagen.metrics.peak`) and the collective bandwidth measured here."""
    peak = peak_flops
    gbps, lat_us = _allreduce_gbps()
    return Cluster(
        name="calibrated-cpu",
        device="cpu",
        peak_flops=peak,
        dtype="fp32",
        matmul_efficiency=1.0,
        attention_efficiency=0.5,
        memory_gb=24,
        gpus_per_node=2,
        intra_node_gbps=gbps,
        inter_node_gbps=gbps,
        intra_node_latency_us=lat_us,
        inter_node_latency_us=lat_us,
        memory_reserved_gb=2,
    )
