"""FSDP2 per block and at the root, HSDP over dp_replicate, mixed precision, explicit prefetch.

Gradients are reduced with a plain SUM: the loss is already normalised by the global count of valid
tokens, so summing over dp_shard × cp (× dp_replicate) reproduces the one-process gradient exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sum_reduction(module: FSDPModule) -> bool:
    """Ask FSDP2 to sum rather than average; False if this torch cannot (the caller rescales the loss)."""
    if not hasattr(module, "set_force_sum_reduction_for_comms"):
        return False
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)
    return True


def apply_fsdp(
    model: nn.Module,
    blocks: nn.ModuleList,
    mesh: DeviceMesh,
    param_dtype: str = "fp32",
    reduce_dtype: str = "fp32",
    reshard_after_forward: bool = True,
) -> bool:
    """Shard each block, then the root; returns True when gradients are summed (not averaged)."""
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    units = [*blocks, model]
    summed = all(_sum_reduction(m) for m in units)
    block_list = list(blocks)
    for i, block in enumerate(block_list):
        if i + 1 < len(block_list):
            block.set_modules_to_forward_prefetch([block_list[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([block_list[i - 1]])
    return summed


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip reduce-scatter on non-final micro-batches of gradient accumulation."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
