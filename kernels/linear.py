"""Linear layers with an FP8 path through Transformer Engine (`train.fp8=true`).

`Linear` is an `nn.Linear` (same parameters, names and init, so parallel plans, tensor parallelism, FSDP
and checkpoints see no difference). With `train.fp8=true`, TE installed and a CUDA input, its GEMM runs in
FP8 under TE's delayed-scaling recipe; otherwise it is `F.linear`. A missing TE is reported once, when the
config is applied (`backend.configure`), and training continues in the torch path.

Tensor parallelism: the engine's TP/SP layout (column = output features split, row = input features
split, the SP all-gather / reduce-scatter inside the layer) is available as `te_parallel_linear`; our own
TP wrappers keep the same shard layout, so a TE layer built from a full linear holds exactly the shard our
`ColumnParallelLinear` / `RowParallelLinear` hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megagen.kernels import backend as registry


def fp8_usable(x: torch.Tensor) -> bool:
    return registry.settings().fp8 and x.is_cuda and registry.installed("te")


class Linear(nn.Linear):
    """nn.Linear whose GEMM runs in FP8 through Transformer Engine when `train.fp8=true` allows it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fp8_usable(x) and not torch.compiler.is_compiling():
            from megagen.kernels.te_ops import fp8_linear

            registry._usage[("linear", "te")] = registry._usage.get(("linear", "te"), 0) + 1
            return fp8_linear(self, x)
        return F.linear(x, self.weight, self.bias)


def te_parallel_linear(
    linear: nn.Linear, mode: str, tp_group, tp_size: int, tp_rank: int, sequence_parallel: bool
) -> nn.Module | None:
    """TE's column/row-parallel linear holding this rank's shard of `linear`; None (logged once by
    `backend.report_extras`) when Transformer Engine is not installed."""
    if not registry.installed("te"):
        return None
    from megagen.kernels.te_ops import parallel_linear

    return parallel_linear(linear, mode, tp_group, tp_size, tp_rank, sequence_parallel)
