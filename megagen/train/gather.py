"""Full CPU copies of sharded tensors: what tests and `capture_grads` compare across meshes."""

from __future__ import annotations

import torch


def full_tensors(named: list[tuple[str, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """Gather sharded tensors to full CPU copies (a collective for DTensors: call on every rank)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in named:
        if t is None:
            continue
        t = t.full_tensor() if isinstance(t, DTensor) else t
        out[name] = t.detach().to("cpu", copy=True)
    return out
