"""FLOP counting: what one sample costs a transformer spec, forward and backward.

Counted: every matmul (2·m·n·k) and both attention products (QKᵀ and AV: 4·Sq·Skv·d over all heads),
bidirectional — no causal halving — for self- and cross-attention. Not counted: elementwise ops, norms,
softmax (a few % of a block at these sizes, and not what MFU measures).

- model FLOPs = forward + backward: what MFU divides by. Backward is 2 × forward, less the input-gradient
  matmuls of layers that read the data directly (their inputs need no gradient).
- hardware FLOPs additionally count recomputation: full recompute re-runs each block's forward;
  selective recompute re-runs only the attention products (matmul outputs are kept).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlopCount:
    """FLOPs for one sample."""

    forward: float
    model: float
    hardware: float


def linear(tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def attention_products(q_tokens: int, kv_tokens: int, width: int) -> float:
    """QKᵀ and AV over all heads (width = heads × head_dim)."""
    return 4.0 * q_tokens * kv_tokens * width


def combine(
    outside_blocks: float,
    block_matmuls: float,
    block_attention: float,
    layers: int,
    recompute: str,
    input_layers: float = 0.0,
) -> FlopCount:
    """Forward/model/hardware FLOPs from per-block matmul and attention-product counts.

    `input_layers` is the forward FLOPs of the layers applied to the data itself (patch embedding, text
    projections): their backward computes weight gradients only.
    """
    blocks = layers * (block_matmuls + block_attention)
    forward = outside_blocks + blocks
    model = 3.0 * forward - input_layers
    if recompute == "full":
        hardware = model + blocks
    elif recompute == "selective":
        hardware = model + layers * block_attention
    else:
        hardware = model
    return FlopCount(forward, model, hardware)
