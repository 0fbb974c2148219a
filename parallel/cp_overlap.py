"""Context-parallel attention whose K/V all-gather runs under attention of the local chunk.

Why: with `allgather_kv` the gather of the full K/V sits on the critical path before any attention starts.
Here one all-gather of the stacked K/V is launched asynchronously, the local queries attend to the local
K/V chunk meanwhile, then to the remote chunks once they arrive; the two partial results are merged
exactly by their log-sum-exp (online softmax). In backward the reduce-scatter of dK/dV is launched before
dQ is computed, so dQ hides it.

The math is plain PyTorch in fp32 (reference path; no fused kernel backend), which is what CPU runs use.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

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


def chunk_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Scaled, masked scores (B, H, Sq, Sk) of q (B, H, Sq, D) against one key chunk k (B, H, Sk, D)."""
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)
    return s if bias is None else s + bias


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against one K/V chunk, fp32, with its log-sum-exp (B, H, Sq); a chunk whose keys are
    all masked gives out 0 and lse −inf, which the merge then weighs by 0."""
    s = chunk_scores(q, k, bias)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - _finite(lse).unsqueeze(-1))
    return p @ v, lse


def merge_chunks(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge: lse = logsumexp_i(lse_i), out = Σ_i exp(lse_i − lse) · out_i."""
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    safe = _finite(lse)
    out = sum(torch.exp(li - safe).unsqueeze(-1) * oi for oi, li in zip(outs, lses))
    return out, lse


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


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


class _OverlappedGatherAttention(torch.autograd.Function):
    """q, k, v: (B, H, S_local, D) fp32. Output (B, H, S_local, D)."""

    @staticmethod
    def forward(ctx, q, k, v, kv_valid, group):
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        chunk = k.shape[2]
        kv = torch.stack([k, v]).contiguous()
        with comm_axis(AXIS):  # runs while the local chunk attends
            pending = _F.all_gather_into_tensor(kv, n, _name(group))
        b_local, b_remote = _bias_slices(kv_valid, rank, chunk, q.dtype)
        out_l, lse_l = chunk_attention(q, k, v, b_local)
        with comm_axis(AXIS):
            gathered = _wait(pending).view(n, *kv.shape)
        rk, rv = _remote(gathered, rank)
        out_r, lse_r = chunk_attention(q, rk, rv, b_remote)
        out, lse = merge_chunks([out_l, out_r], [lse_l, lse_r])
        ctx.save_for_backward(q, gathered, out, lse, kv_valid if kv_valid is not None else torch.empty(0))
        ctx.has_mask, ctx.group = kv_valid is not None, group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, gathered, out, lse, kv_valid = ctx.saved_tensors
        group, n = ctx.group, gathered.shape[0]
        k_all = gathered[:, 0].permute(1, 2, 0, 3, 4).flatten(2, 3)  # (B, H, n·S, D) in rank order
        v_all = gathered[:, 1].permute(1, 2, 0, 3, 4).flatten(2, 3)
        bias = key_bias(kv_valid, q.dtype) if ctx.has_mask else None
        p = torch.exp(chunk_scores(q, k_all, bias) - _finite(lse).unsqueeze(-1))
        d_v = p.transpose(-1, -2) @ grad_out
        delta = (grad_out * out).sum(-1, keepdim=True)
        d_s = p * (grad_out @ v_all.transpose(-1, -2) - delta) * (q.shape[-1] ** -0.5)
        d_k = d_s.transpose(-1, -2) @ q
        d_kv = torch.stack([d_k, d_v]).unflatten(3, (n, -1)).permute(3, 0, 1, 2, 4, 5).contiguous()
        with comm_axis(AXIS):
            pending = _F.reduce_scatter_tensor(d_kv.flatten(0, 1), "sum", n, _name(group))
        d_q = d_s @ k_all  # computed while the reduce-scatter runs
        with comm_axis(AXIS):
            d_k_local, d_v_local = _wait(pending).view(2, *d_kv.shape[2:])
        return d_q, d_k_local, d_v_local, None, None


def overlapped_allgather_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid, group: dist.ProcessGroup
) -> torch.Tensor:
    """The `allgather_kv` core with overlap, on (B, S_local, H, D); fp32 math, result in q's dtype."""
    to_bhsd = [x.transpose(1, 2).float() for x in (q, k, v)]
    out = _OverlappedGatherAttention.apply(*to_bhsd, kv_valid, group)
    return out.transpose(1, 2).to(q.dtype)
