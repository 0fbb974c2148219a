"""FSDP2 per block and at the root, HSDP over dp_replicate, mixed precision, explicit prefetch.

Gradients are reduced with a plain SUM (`grad_reduction.fsdp_sums`, where the gradient rule lives).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from megagen.parallel.grad_reduction import fsdp_sums

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    summed = all(fsdp_sums(m) for m in units)
    block_list = list(blocks)
    for i, block in enumerate(block_list):
        if i + 1 < len(block_list):
            block.set_modules_to_forward_prefetch([block_list[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([block_list[i - 1]])
    return summed


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter this micro-batch's gradients (True) or keep them unsharded for the next (False)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def held_gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients this rank holds now (numel × element size, each tensor once): the parameters'
    gradients, plus the unsharded ones FSDP2 keeps between micro-batches that skip gradient sync (in the
    reduce dtype) and the partial reductions it keeps for HSDP. Read from FSDP2's parameter groups, so the
    planner's gradient memory can be checked against what the engine really holds."""
    from torch.distributed.tensor import DTensor

    held: dict[int, torch.Tensor] = {}  # by identity; the dict keeps each tensor (and so its id) alive

    def add(t) -> None:
        if t is not None:
            held.setdefault(id(t), t)

    for p in model.parameters():
        add(p.grad)
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch before grouped fully_shard: one group per state
            groups = [g] if (g := getattr(state, "_fsdp_param_group", None)) is not None else []
        for group in groups:
            add(getattr(group, "_partial_reduce_output", None))
            for fp in group.fsdp_params:
                add(fp.unsharded_accumulated_grad)
                unsharded = getattr(fp, "_unsharded_param", None)
                add(None if unsharded is None else unsharded.grad)
    local = [t.to_local() if isinstance(t, DTensor) else t for t in held.values()]
    return sum(t.numel() * t.element_size() for t in local)
