"""Exponential moving average of the weights (`train.ema_decay`), sharded exactly like the parameters.

The shadow copy of each parameter is a clone of it: a DTensor with the parameter's mesh and placements
under FSDP2 / tensor parallelism, a plain tensor otherwise. Updates run on the local shards only, so the
EMA costs no communication and one extra copy of this rank's parameter shard in memory; checkpoints
store it under `ema.<parameter name>` with the global layout, so it reshards like the model.

    ema_t = decay · ema_{t-1} + (1 − decay) · θ_t        (after every optimizer step)
"""

from __future__ import annotations

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    """Shadow weights of `model`'s trainable parameters; `update()` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        # Keep the parameter objects themselves: the optimizer updates them in place, and under FSDP2 they
        # are the sharded DTensors (named_parameters() could return unsharded views mid-step).
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay
        for name, p in self.params.items():
            _local(self.shadow[name]).lerp_(_local(p.detach()), 1.0 - d)

    @torch.no_grad()
    def reset_to_weights(self) -> None:
        """Restart the average from the current weights (e.g. after loading weights from another run)."""
        for name, p in self.params.items():
            _local(self.shadow[name]).copy_(_local(p.detach()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Name → shadow tensor (DTensor where the parameter is one); loading into it updates the EMA."""
        return dict(self.shadow)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s weights with the average (for evaluation or export of a live model)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                _local(p.detach()).copy_(_local(self.shadow[name]))
