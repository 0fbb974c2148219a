"""Context-parallel attention whose K/V all-gather runs under attention of the local chunk.

Why: with `allgather_kv` the gather of the full K/V sits on the critical path before any attention starts.
Here one all-gather of the stacked K/V is launched asynchronously, the local queries attend to the local
K/V chunk meanwhile, then to the remote chunks once they arrive; the two partial results are merged
exactly by their log-sum-exp (online softmax). In backward the remote chunks' gradients come first, so the
reduce-scatter of the stacked dK/dV is in flight while the local chunk's backward runs under it.

Attention per chunk is a fused kernel that returns the log-sum-exp (parallel/attention_lse.py) in q's
dtype; the lse and the merge are fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megagen.parallel.attention_lse import attention_chunk_backward, attention_with_lse
from megagen.parallel.collectives import _F, _name, _wait
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


def _bias_slices(
    kv_valid: torch.Tensor | None, rank: int, chunk: int, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Bias of the local key chunk and of the remote ones (in rank order, local left out)."""
    bias = key_bias(kv_valid, dtype)
    if bias is None:
        return None, None
    local = bias[..., rank * chunk : (rank + 1) * chunk]
    remote = torch.cat([bias[..., : rank * chunk], bias[..., (rank + 1) * chunk :]], dim=-1)
    return local, remote


def _remote(gathered: torch.Tensor, rank: int) -> torch.Tensor:
    """(n, 2, B, H, S, D) gathered K/V → (2, B, H, (n−1)·S, D), the other ranks' chunks in rank order."""
    others = torch.cat([gathered[:rank], gathered[rank + 1 :]])
    return others.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)


def _stack_remote_grads(d_k: torch.Tensor, d_v: torch.Tensor, rank: int, chunk: int) -> torch.Tensor:
    """Remote chunks' (B, H, (n−1)·chunk, D) dK, dV → reduce-scatter input (n·2, B, H, chunk, D) in rank
    order, this rank's own slot zero (its local gradient is added after the reduce-scatter)."""
    remote = torch.stack([d_k, d_v]).unflatten(3, (-1, chunk)).permute(3, 0, 1, 2, 4, 5)
    slots = list(remote.unbind(0))
    slots.insert(rank, torch.zeros_like(slots[0]))
    return torch.stack(slots).flatten(0, 1)


class _OverlappedGatherAttention(torch.autograd.Function):
    """q, k, v: (B, H, S_local, D) in the compute dtype. Output (B, H, S_local, D)."""

    @staticmethod
    def forward(ctx, q, k, v, kv_valid, group):
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        kv = torch.stack([k, v]).contiguous()
        with comm_axis(AXIS):  # runs while the local chunk attends
            pending = _F.all_gather_into_tensor(kv, n, _name(group))
        b_local, b_remote = _bias_slices(kv_valid, rank, k.shape[2], q.dtype)
        out_l, lse_l = attention_with_lse(q, k, v, b_local)
        with comm_axis(AXIS):
            gathered = _wait(pending).view(n, *kv.shape)
        rk, rv = _remote(gathered, rank)
        out_r, lse_r = attention_with_lse(q, rk, rv, b_remote)
        out, lse = merge_chunks([out_l, out_r], [lse_l, lse_r])
        ctx.save_for_backward(q, gathered, out, lse, kv_valid if kv_valid is not None else torch.empty(0))
        ctx.has_mask, ctx.group = kv_valid is not None, group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, gathered, out, lse, kv_valid = ctx.saved_tensors
        group, n, rank = ctx.group, gathered.shape[0], dist.get_rank(ctx.group)
        b_local, b_remote = _bias_slices(kv_valid if ctx.has_mask else None, rank, q.shape[2], q.dtype)
        rk, rv = _remote(gathered, rank)
        dq_r, dk_r, dv_r = attention_chunk_backward(grad_out, q, rk, rv, out, lse, b_remote)
        d_kv = _stack_remote_grads(dk_r, dv_r, rank, q.shape[2])
        with comm_axis(AXIS):  # in flight while the local chunk's backward runs
            pending = _F.reduce_scatter_tensor(d_kv, "sum", n, _name(group))
        k_l, v_l = gathered[rank]
        dq_l, dk_l, dv_l = attention_chunk_backward(grad_out, q, k_l, v_l, out, lse, b_local)
        with comm_axis(AXIS):
            dk_sum, dv_sum = _wait(pending).view(2, *dk_l.shape)
        return dq_l + dq_r, dk_sum + dk_l, dv_sum + dv_l, None, None


def overlapped_allgather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid, group: dist.ProcessGroup
) -> torch.Tensor:
    """The `allgather_kv` core with overlap, on (B, S_local, H, D); runs in q's dtype."""
    to_bhsd = [x.transpose(1, 2) for x in (q, k, v)]
    out = _OverlappedGatherAttention.apply(*to_bhsd, kv_valid, group)
    return out.transpose(1, 2)
