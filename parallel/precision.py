"""Mixed precision where FSDP2 does not provide it (one device, or a mesh without data-parallel sharding).

FSDP2's `MixedPrecisionPolicy` casts parameters to `parallel.param_dtype` for compute while the optimizer
keeps fp32 masters. Without FSDP the same config key must still mean bf16 compute, so the model becomes an
`Autocast<Model>` (`class_swap.py`) whose forward runs under `torch.autocast`: matmuls and attention in
bf16, parameters, gradients and optimizer state in fp32, the loss (computed outside the forward) in fp32.
Parameter names are unchanged; `print(model)` shows the compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from megagen.parallel.class_swap import swap_in
from megagen.parallel.fsdp import DTYPES


class Autocast:
    """Model wrapper (swapped in as a subclass): the model's forward under `torch.autocast`."""

    prefix = "Autocast"
    autocast_device_type = "cpu"
    autocast_dtype = torch.bfloat16

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type=self.autocast_device_type, dtype=self.autocast_dtype):
            return super().forward(*args, **kwargs)

    def extra_repr(self) -> str:
        inner = super().extra_repr()
        dtype = str(self.autocast_dtype).removeprefix("torch.")
        return f"autocast={dtype}" + (f", {inner}" if inner else "")


def autocast_forward(model: nn.Module, param_dtype: str, device: torch.device) -> bool:
    """Run `model`'s forward under autocast to `param_dtype` (no-op for fp32). Returns whether it applied."""
    dtype = DTYPES[param_dtype]
    if dtype == torch.float32:
        return False
    swap_in(model, Autocast)
    model.autocast_device_type, model.autocast_dtype = device.type, dtype
    return True
