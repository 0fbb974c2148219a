"""Mixed precision where FSDP2 does not provide it (one device, or a mesh without data-parallel sharding).

FSDP2's `MixedPrecisionPolicy` casts parameters to `parallel.param_dtype` for compute while the optimizer
keeps fp32 masters. Without FSDP the same config key must still mean bf16 compute, so the model's forward
runs under `torch.autocast`: matmuls and attention in bf16, parameters, gradients and optimizer state in
fp32, the loss (computed outside the forward) in fp32.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from megagen.parallel.fsdp import DTYPES


def autocast_forward(model: nn.Module, param_dtype: str, device: torch.device) -> bool:
    """Run `model.forward` under autocast to `param_dtype` (no-op for fp32). Returns whether it applied."""
    dtype = DTYPES[param_dtype]
    if dtype == torch.float32:
        return False
    forward = model.forward

    @functools.wraps(forward)
    def forward_in_low_precision(*args, **kwargs):
        with torch.autocast(device_type=device.type, dtype=dtype):
            return forward(*args, **kwargs)

    model.forward = forward_in_low_precision
    return True
