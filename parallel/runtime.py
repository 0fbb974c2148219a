"""The trainer's one handle on parallelism: data slicing, sequence sharding, gradient sync, norms.

The training loop calls these hooks at fixed points; in a single process they are identities, and the
distributed runtime (built from the device mesh) implements the same interface.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LocalRuntime:
    """One process, no mesh: every hook is the identity."""

    world_size = 1
    rank = 0
    dp_rank = 0
    dp_size = 1
    is_logging_rank = True

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")

    def parallelize(self, model: nn.Module, plan, cfg) -> nn.Module:
        return model

    def sample_indices(self, micro: int, micro_batch: int) -> list[int]:
        """Global sample indices of this rank's micro-batch `micro` within a step."""
        start = (micro * self.dp_size + self.dp_rank) * micro_batch
        return list(range(start, start + micro_batch))

    def shard_targets(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return target, None

    def finish_grads(self, model: nn.Module) -> None:
        """Complete gradients after the last backward of a step (nothing to do in one process)."""

    def set_grad_sync(self, model: nn.Module, enabled: bool) -> None:
        """Allow skipping gradient reduction on non-final micro-batches."""

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def clip_grads(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Scale gradients so the global norm is at most `max_norm`; returns the norm before clipping."""
        norm = self.grad_norm(params)
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        value = float(norm)
        return value if math.isfinite(value) else float("nan")

    def global_loss(self, local_sum: torch.Tensor) -> float:
        """The step's loss over all ranks, already normalised by the global token count."""
        return float(local_sum)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass
