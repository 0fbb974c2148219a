"""How finely the engine pipelines its overlapped collectives: one pure rule per overlap.

Why a separate file: the planner's overlap model and the engine must agree on the chunk counts, so both
import these functions instead of each keeping its own copy of the rule. Nothing here touches torch.
"""

from __future__ import annotations

# A head group's all-to-all smaller than this (elements of one of q/k/v, per rank) is latency-bound: splitting
# it further adds a collective's fixed cost without hiding more bytes. 2^16 fp32 elements = 256 KiB.
MIN_GROUP_ELEMENTS = 1 << 16
# Beyond a few groups only the first group's all-to-all and the last's return stay exposed anyway; more
# groups mean more, smaller kernels and collectives for a shrinking gain.
MAX_HEAD_CHUNKS = 4
# Devices whose all-to-all is carried out by the same cores that run attention (gloo on CPU): splitting the
# heads only adds collectives there, since nothing travels while the cores compute. Measured on the 2-core
# CPU (benchmarks/overlap.py, cp2 ulysses, 5 steps, separate runs): 4 head groups exposed 54 ms per step at
# 1K and 60 ms at 2K, the one stacked all-to-all 32 ms and 48 ms; at 4K the runs differed by more than the
# two settings did.
NO_PIPELINE_DEVICES = frozenset({"cpu"})


def overlap_on(setting: bool | str, device: str) -> bool:
    """Whether `parallel.overlap` (true, false or auto) turns the overlaps on for a run on `device` (a type).

    auto is on where the collectives travel beside the compute (NCCL has its own engines), off on
    `NO_PIPELINE_DEVICES`: on the 2-core CPU the overlapped paths lowered exposed communication but never
    the step time (docs/benchmarking.md "Overlap on vs off"), because gloo's sends run on the same cores.
    """
    if setting == "auto":
        return device not in NO_PIPELINE_DEVICES
    return bool(setting)


def ulysses_head_chunks(
    local_heads: int, cp: int, tokens_local: int, head_dim: int, device: str = "cuda"
) -> int:
    """Number of head groups Ulysses pipelines (all-to-all of group i+1 under attention of group i).

    `local_heads`: attention heads on this rank before the all-to-all (after tp); `cp`: the context-parallel
    size; `tokens_local`: this rank's sequence chunk; `head_dim`: per-head width; `device`: the device type
    ("cuda", "cpu"; the planner passes its cluster's). Rule: 1 on `NO_PIPELINE_DEVICES`; else the largest
    h ≤ MAX_HEAD_CHUNKS such that every group still splits its heads evenly over cp (h divides
    local_heads / cp) and one group's q (or k, or v) message holds at least MIN_GROUP_ELEMENTS elements;
    1 (one stacked all-to-all, no pipelining) when no h > 1 qualifies, e.g. few heads or tiny messages.
    """
    if cp <= 1 or local_heads % cp or device in NO_PIPELINE_DEVICES:
        return 1
    heads_per_rank = local_heads // cp
    for chunks in range(min(MAX_HEAD_CHUNKS, heads_per_rank), 1, -1):
        group_elements = tokens_local * (local_heads // chunks) * head_dim
        if heads_per_rank % chunks == 0 and group_elements >= MIN_GROUP_ELEMENTS:
            return chunks
    return 1
