"""SwiGLU activation: the reference, and dispatch through the backend registry."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megagen.kernels.backend import dispatch, lazy, register


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up — the Llama-3 MLP nonlinearity."""
    return F.silu(gate) * up


register("swiglu", "torch", swiglu_reference)
register("swiglu", "triton", lazy("triton_ops", "swiglu"))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up through the configured backend."""
    return dispatch("swiglu", gate, up)
