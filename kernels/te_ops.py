"""Transformer Engine implementations (CUDA only): attention and FP8 linear. Imported lazily.

Nothing here is imported unless TE is installed and a CUDA tensor asks for it (see `backend.installed`).
"""

from __future__ import annotations

import torch
import transformer_engine.pytorch as te
from torch import nn

_attention_modules: dict[tuple, nn.Module] = {}


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """DotProductAttention over (B, S, H, D) fp16/bf16 tensors with an optional key-padding mask."""
    b, sq, h, d = q.shape
    key = (h, d, q.device)
    core = _attention_modules.get(key)
    if core is None:
        core = te.DotProductAttention(
            num_attention_heads=h, kv_channels=d, attention_dropout=0.0, qkv_format="bshd"
        )
        _attention_modules[key] = core
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if kv_valid is None:
        out = core(q, k, v, attn_mask_type="no_mask")
    else:
        kv = kv_valid if kv_valid.dim() == 2 else kv_valid.expand(b, -1)
        # TE's padding masks are True where a position is masked OUT
        q_mask = torch.zeros(b, 1, 1, sq, dtype=torch.bool, device=q.device)
        kv_mask = (~kv).view(b, 1, 1, -1)
        out = core(q, k, v, attention_mask=(q_mask, kv_mask), attn_mask_type="padding")
    return out.view(b, sq, h, d)


def fp8_recipe():
    from transformer_engine.common.recipe import DelayedScaling, Format

    return DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=16, amax_compute_algo="max")


def _te_linear(owner, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The TE Linear of `owner` (a `linear.Gemm`), shaped like `weight`, computing with `weight` / `bias`.

    The tensors are borrowed on every call, not registered: FSDP swaps the Parameter objects between
    steps, and a TP shard is a fresh `to_local()` view each forward; autograd carries the gradient back.
    """
    out_features, in_features = weight.shape
    lin = owner.__dict__.get("_te_linear")
    if lin is None or (lin.in_features, lin.out_features) != (in_features, out_features):
        lin = te.Linear(
            in_features, out_features, bias=bias is not None, params_dtype=weight.dtype, device=weight.device
        )
        owner.__dict__["_te_linear"] = lin
    lin._parameters["weight"] = weight
    if bias is not None:
        lin._parameters["bias"] = bias
    return lin


def fp8_gemm(owner, x: torch.Tensor, weight: torch.Tensor, bias=None, amax_group=None) -> torch.Tensor:
    """y = x Wᵀ (+ b) with the GEMM in FP8 (HYBRID: E4M3 forward, E5M2 gradients), delayed scaling; the
    amaxes are all-reduced (max) over `amax_group` when one is given."""
    with te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe(), fp8_group=amax_group):
        return _te_linear(owner, weight, bias)(x)


def parallel_linear(
    linear: nn.Linear,
    mode: str,
    tp_group,
    tp_size: int,
    tp_rank: int,
    sequence_parallel: bool,
) -> nn.Module:
    """Transformer Engine's own TP/SP layout: a column- (split output features; all-gathers a sequence-
    sharded input under SP) or row-parallel (split input features; reduce-scatters under SP) te.Linear
    initialised from the full `linear`'s weight shard of this rank."""
    if mode not in ("column", "row"):
        raise ValueError(f"mode {mode!r}; expected column or row")
    w = linear.weight.detach()
    lin = te.Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        parallel_mode=mode,
        sequence_parallel=sequence_parallel,
        tp_group=tp_group,
        tp_size=tp_size,
        params_dtype=w.dtype,
        device=w.device,
    )
    dim = 0 if mode == "column" else 1
    with torch.no_grad():
        lin.weight.copy_(w.chunk(tp_size, dim=dim)[tp_rank])
        if linear.bias is not None:
            b = linear.bias.detach()
            lin.bias.copy_(b.chunk(tp_size)[tp_rank] if mode == "column" else b)
    return lin
