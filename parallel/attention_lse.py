"""Attention of queries against one K/V chunk that also returns the log-sum-exp, and its backward.

Why: chunked attention (the overlapped CP all-gather attends to the local chunk while the others arrive)
merges partial results by their log-sum-exp, so the kernel must return it; and the backward of a chunk,
given the *merged* out and lse, is exactly that chunk's share of the full softmax's gradient. torch's fused
SDPA kernels do both without materialising the scores; the reference math here is the spec they are
tested against and the path for devices or dtypes without such a kernel.

All tensors are (B, H, S, D); `bias` is an additive float mask broadcastable to (B, H, Sq, Sk), e.g.
(B, 1, 1, Sk) with −inf on padded keys, or None. Outputs are in q's dtype, lse (B, H, Sq) in fp32. A chunk
whose keys are all masked gives out 0 and lse −inf (weight 0 in the merge) on every path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ATEN = torch.ops.aten
LSE_ALIGN_CUDA = 32  # the efficient kernel's lse rows are padded to a multiple of this
BIAS_ALIGN_CUDA = 16  # and its bias rows must start on this many elements

BACKENDS = ("cpu_flash", "cuda_efficient", "reference")


def lse_backend(q: torch.Tensor) -> str:
    """The kernel `attention_with_lse` uses for q: CPU flash, CUDA memory-efficient, else reference.
    The CUDA path follows torch's own SDPA call of that kernel but has not run on a GPU here."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return "cpu_flash"
    if (
        q.device.type == "cuda"
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and q.shape[-1] % 8 == 0  # the kernel's head-dim alignment (SDPA pads; this call does not)
        and hasattr(_ATEN, "_scaled_dot_product_efficient_attention")
    ):
        return "cuda_efficient"
    return "reference"


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ/√d + bias) v and its log-sum-exp over the chunk's keys."""
    backend = backend or lse_backend(q)
    if backend == "cpu_flash":
        out, lse = _ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias)
    elif backend == "cuda_efficient":
        out, lse = _ATEN._scaled_dot_product_efficient_attention(q, k, v, _cuda_bias(bias, q, k), True)[:2]
        lse = lse[..., : q.shape[2]]
    elif backend == "reference":
        return reference_attention_with_lse(q, k, v, bias)
    else:
        raise ValueError(f"attention_with_lse backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    return _mark_dead_rows(out, lse.to(_math_dtype(q)), bias)


def attention_chunk_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one chunk; `out`, `lse` are the attention over *all* keys (the merged result), so
    the chunk's probabilities exp(s − lse) and the row term Σ dO·out are those of the full softmax."""
    backend = backend or lse_backend(q)
    out = out.to(q.dtype)
    if backend == "cpu_flash":
        return _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.to(q.dtype), q, k, v, out, lse.to(_math_dtype(q)), 0.0, False, attn_mask=bias
        )
    if backend == "cuda_efficient":
        lse_rows = F.pad(lse.float(), (0, -q.shape[2] % LSE_ALIGN_CUDA)).contiguous()
        no_rng = torch.empty(0, dtype=torch.int64, device=q.device)
        grads = _ATEN._scaled_dot_product_efficient_attention_backward(
            grad_out.to(q.dtype), q, k, v, _cuda_bias(bias, q, k), out, lse_rows, no_rng, no_rng,
            0.0, [True, True, True, False], False,
        )  # fmt: skip
        return grads[0], grads[1], grads[2]
    if backend == "reference":
        return reference_chunk_backward(grad_out, q, k, v, out, lse, bias)
    raise ValueError(f"attention_chunk_backward backend {backend!r}; allowed: {', '.join(BACKENDS)}")


def _cuda_bias(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The bias in q's dtype, copied into fresh storage whose rows start 16-aligned (a chunk's slice of the
    whole sequence's bias is not), expanded to (B, H, Sq, Sk) as torch's own SDPA call does."""
    if bias is None:
        return None
    sk = k.shape[2]
    aligned = F.pad(bias.to(q.dtype), (0, -sk % BIAS_ALIGN_CUDA)).contiguous()[..., :sk]
    return aligned.expand(q.shape[0], q.shape[1], q.shape[2], sk)


def _mark_dead_rows(
    out: torch.Tensor, lse: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose keys are all masked: the kernels leave lse 0 (CPU) or undefined; make it −inf, out 0."""
    if bias is None:
        return out, lse
    dead = torch.isneginf(bias).all(-1)  # broadcastable to (B, H, Sq)
    return out.masked_fill(dead.unsqueeze(-1), 0.0), lse.masked_fill(dead, float("-inf"))


# Reference math: fp32 (fp64 stays fp64), materialises the chunk's scores. The spec of the kernels above.


def _math_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def chunk_scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Scaled, masked scores (B, H, Sq, Sk) of q against one key chunk, in the math dtype."""
    dt = _math_dtype(q)
    s = q.to(dt) @ k.to(dt).transpose(-1, -2) * (q.shape[-1] ** -0.5)
    return s if bias is None else s + bias.to(dt)


def finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with −inf (all keys masked) replaced by 0, so exp(s − lse) stays 0 instead of NaN."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def reference_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula: lse = logsumexp(s), out = exp(s − lse) v."""
    s = chunk_scores(q, k, bias)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - finite(lse).unsqueeze(-1)) @ v.to(s.dtype)
    return out.to(q.dtype), lse if q.dtype == torch.float64 else lse.float()


def reference_chunk_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p = exp(s − lse); dv = pᵀ dO; ds = p (dO vᵀ − Σ dO·out) / √d; dq = ds k; dk = dsᵀ q."""
    s = chunk_scores(q, k, bias)
    dt = s.dtype
    g, o = grad_out.to(dt), out.to(dt)
    p = torch.exp(s - finite(lse.to(dt)).unsqueeze(-1))
    delta = (g * o).sum(-1, keepdim=True)
    d_s = p * (g @ v.to(dt).transpose(-1, -2) - delta) * (q.shape[-1] ** -0.5)
    d_q, d_k, d_v = d_s @ k.to(dt), d_s.transpose(-1, -2) @ q.to(dt), p.transpose(-1, -2) @ g
    return d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype)
