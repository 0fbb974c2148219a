"""Context-parallel attention whose K/V all-gather runs under attention of the local chunk.

Why: with `allgather_kv` the gather of the full K/V sits on the critical path before any attention starts.
Here one all-gather of the stacked K/V is launched asynchronously, the local queries attend to the local
K/V chunk meanwhile, then to each remote chunk once they arrive; the partial results are merged
exactly by their log-sum-exp (online softmax). In backward the remote chunks' gradients come first, so the
reduce-scatter of the stacked dK/dV is in flight while the local chunk's backward runs under it.

Attention per chunk is a fused kernel that returns the log-sum-exp (parallel/attention_lse.py) in q's
dtype; the lse and the merge are fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megagen.parallel.attention_lse import attention_chunk_backward, attention_with_lse
from megagen.parallel.collectives import _F, _name, _wait, issue_all_gather
from megagen.parallel.comm import comm_axis

AXIS = "cp"  # counted (and timed) as cp traffic even where cp shares its group with dp_shard_cp


def key_bias(kv_valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, S) or (S,) bool mask of real keys → additive bias broadcastable to (B, H, Sq, S)."""
    if kv_valid is None:
        return None
    mask = kv_valid if kv_valid.dim() == 2 else kv_valid.unsqueeze(0)
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, float("-inf"))[:, None, None, :]


def merge_chunks(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge in fp32 (fp64 stays fp64): with m = max_i lse_i and w_i = exp(lse_i − m),
    out = Σ w_i·out_i / Σ w_i and lse = m + log Σ w_i. Normalising by Σ w_i (rather than weighing by
    exp(lse_i − lse)) keeps the weights summing to 1 to rounding, as accurate as one kernel over all keys.
    A chunk with lse −inf weighs 0; out comes back in the chunks' dtype."""
    stacked = torch.stack(lses)
    top = stacked.max(0).values
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(stacked - top)
    total = weights.sum(0)
    out = sum(w.unsqueeze(-1) * o.to(w.dtype) for w, o in zip(weights, outs))
    out = out / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    return out.to(outs[0].dtype), top + torch.log(total)


def _chunk_biases(kv_valid: torch.Tensor | None, n: int, chunk: int, dtype: torch.dtype) -> list:
    """The key bias of each rank's chunk, in rank order (all None when nothing is padded)."""
    bias = key_bias(kv_valid, dtype)
    if bias is None:
        return [None] * n
    return [bias[..., j * chunk : (j + 1) * chunk] for j in range(n)]


class _OverlappedGatherAttention(torch.autograd.Function):
    """q, k, v: (B, H, S_local, D) in the compute dtype. Output (B, H, S_local, D). Each remote chunk is
    attended (and differentiated) on its own slice of the gathered buffer, so nothing is copied out of it."""

    @staticmethod
    def forward(ctx, q, k, v, kv_valid, group):
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        kv = torch.stack([k, v]).contiguous()
        with comm_axis(AXIS):  # runs while the local chunk attends
            pending = issue_all_gather(kv, n, group)
        biases = _chunk_biases(kv_valid, n, k.shape[2], q.dtype)
        parts = [attention_with_lse(q, k, v, biases[rank])]
        with comm_axis(AXIS):
            gathered = _wait(pending).view(n, *kv.shape)
        parts += [attention_with_lse(q, *gathered[j], biases[j]) for j in range(n) if j != rank]
        out, lse = merge_chunks(*zip(*parts))
        # The collective's own output is saved, not the waited view of it: torch.compile cannot save a
        # tensor that aliases another out of an autograd.Function's forward.
        ctx.save_for_backward(q, pending, out, lse, kv_valid if kv_valid is not None else torch.empty(0))
        ctx.kv_shape = kv.shape
        ctx.has_mask, ctx.group = kv_valid is not None, group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, pending_kv, out, lse, kv_valid = ctx.saved_tensors
        group, rank = ctx.group, dist.get_rank(ctx.group)
        gathered = pending_kv.view(-1, *ctx.kv_shape)
        n = gathered.shape[0]
        biases = _chunk_biases(kv_valid if ctx.has_mask else None, n, q.shape[2], q.dtype)
        d_q = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)  # dQ summed over chunks in fp32
        slots = []  # reduce-scatter input: (dK, dV) of chunk j in slot j; this rank's own slot zero
        for j in range(n):
            if j == rank:
                slots.append(torch.zeros_like(gathered[j]))
                continue
            dq_j, dk_j, dv_j = attention_chunk_backward(grad_out, q, *gathered[j], out, lse, biases[j])
            d_q += dq_j
            slots.append(torch.stack([dk_j, dv_j]))
        with comm_axis(AXIS):  # in flight while the local chunk's backward runs
            pending = _F.reduce_scatter_tensor(torch.stack(slots).flatten(0, 1), "sum", n, _name(group))
        dq_l, dk_l, dv_l = attention_chunk_backward(grad_out, q, *gathered[rank], out, lse, biases[rank])
        with comm_axis(AXIS):
            dk_sum, dv_sum = _wait(pending).view(2, *dk_l.shape)
        return (d_q + dq_l).to(q.dtype), dk_sum + dk_l, dv_sum + dv_l, None, None


def overlapped_allgather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid, group: dist.ProcessGroup
) -> torch.Tensor:
    """The `allgather_kv` core with overlap, on (B, S_local, H, D); runs in q's dtype."""
    to_bhsd = [x.transpose(1, 2) for x in (q, k, v)]
    out = _OverlappedGatherAttention.apply(*to_bhsd, kv_valid, group)
    return out.transpose(1, 2)
