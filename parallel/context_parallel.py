"""Context parallelism for bidirectional self-attention over the video-token sequence.

Tokens are split contiguously over cp (bidirectional attention needs no load balancing). Two ways to let
each rank's queries see every key, behind the attention-core interface `(q, k, v) → out` on (B, S, H, D):

- `allgather_kv` (Movie Gen / Llama 3): all-gather K and V over cp; their gradients are reduce-scattered.
- `ulysses`: all-to-all from sequence-sharded/all-heads to full-sequence/heads-sharded, attend, and back.

The engine also pads sequences to a multiple of the shard count; the model passes the mask of real keys
over the whole padded sequence (its `ParallelPlan.token_mask` input) to each core as `kv_valid`, so padded
keys are masked out of attention. Nothing is stored between calls.

With `overlap` on (parallel.overlap), `allgather_kv` runs parallel/cp_overlap.py (the gather hides under
the local chunk's attention, fused LSE kernels) and Ulysses sends q, k, v stacked, pipelined over head
groups (parallel/ulysses_pipeline.py; one stacked all-to-all when the group count is 1). With it off, both
are the original unoverlapped paths.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megagen.parallel.cp_overlap import overlapped_allgather_attention
from megagen.parallel.mappings import all_to_all, gather_along
from megagen.parallel.overlap_schedule import ulysses_head_chunks
from megagen.parallel.ulysses_pipeline import pipelined_ulysses

SEQ_DIM, HEAD_DIM = 1, 2


class ContextParallelAttention(nn.Module):
    """Wraps a model's attention core; `inner` still does the attention math (any kernel backend).

    `head_chunks` pins the Ulysses head-group count with overlap (tests); None asks
    `overlap_schedule.ulysses_head_chunks`, the rule the planner uses too."""

    def __init__(
        self,
        inner: nn.Module,
        kind: str,
        group: dist.ProcessGroup | None,
        overlap: bool = False,
        head_chunks: int | None = None,
    ):
        super().__init__()
        if kind not in ("allgather_kv", "ulysses"):
            raise ValueError(f"parallel.cp_kind: {kind!r}; allowed: allgather_kv, ulysses")
        self.inner, self.kind, self.group, self.overlap = inner, kind, group, overlap
        self.head_chunks = head_chunks

    def extra_repr(self) -> str:
        return f"kind={self.kind}, overlap={self.overlap}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid=None) -> torch.Tensor:
        """q, k, v: this rank's sequence chunk (B, S/shards, H, D); `kv_valid`: (padded S,) bool mask of
        real keys over the whole sequence, or None when nothing is padded."""
        mask = kv_valid
        if self.group is None:
            return self.inner(q, k, v, mask)
        if self.kind == "allgather_kv" and self.overlap:
            return overlapped_allgather_attention(q, k, v, mask, self.group)
        if self.kind == "allgather_kv":
            k = gather_along(k, SEQ_DIM, self.group, "cp")
            v = gather_along(v, SEQ_DIM, self.group, "cp")
            return self.inner(q, k, v, mask)
        if self.overlap:
            return pipelined_ulysses(self.inner, q, k, v, mask, self.group, self._chunks(q))
        q, k, v = (all_to_all(x, HEAD_DIM, SEQ_DIM, self.group, "cp") for x in (q, k, v))
        out = self.inner(q, k, v, mask)
        return all_to_all(out, SEQ_DIM, HEAD_DIM, self.group, "cp")

    def _chunks(self, q: torch.Tensor) -> int:
        if self.head_chunks is not None:
            return self.head_chunks
        _, tokens_local, heads, head_dim = q.shape
        cp = dist.get_world_size(self.group)
        return ulysses_head_chunks(heads, cp, tokens_local, head_dim, q.device.type)
