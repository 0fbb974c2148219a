"""SwiGLU activation: the plain-PyTorch reference."""

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up — the Llama-3 MLP nonlinearity."""
    return F.silu(gate) * up


swiglu = swiglu_reference
