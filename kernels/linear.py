"""Linear layers with an FP8 path through Transformer Engine (`train.fp8=true`).

`Linear` is an `nn.Linear` (same parameters, names and init, so parallel plans, tensor parallelism, FSDP
and checkpoints see no difference). Its GEMM is a `Gemm`: with `train.fp8=true`, TE installed and a CUDA
input it runs in FP8 under TE's delayed-scaling recipe; otherwise it is `F.linear`. A missing TE is
reported once, when the config is applied (`backend.configure`), and training continues in the torch path.

Tensor parallelism: the engine's TP wrappers (parallel/tensor_parallel.py) replace a linear by one holding
its shard, and keep the replaced layer's `gemm` (any object with this call signature; a plain `nn.Linear`
has none and gets `F.linear`): the shard's GEMM then runs on the same backend, FP8 included, with the
FP8 amax reduced over the tp group (`amax_group`), so the shards of one weight share one scale as the
whole weight would on one GPU. TE's own TP/SP layer is available as `te_parallel_linear`; it holds exactly
the shard our `ColumnParallelLinear` / `RowParallelLinear` hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megagen.kernels import backend as registry


def fp8_usable(x: torch.Tensor) -> bool:
    return registry.settings().fp8 and x.is_cuda and registry.installed("te")


class Gemm:
    """y = x Wᵀ (+ b) for one linear layer: FP8 through TE when `train.fp8=true` allows it (CUDA input, TE
    installed, not inside torch.compile), else `F.linear`. Holds the layer's TE state (FP8 scales, amax
    history), so whoever computes the layer — the layer itself, or a TP wrapper on its shard — keeps it.

    `amax_group`: the process group over which the operands are sharded (tp), whose ranks must agree on
    one FP8 scale; None = this rank alone. Each call counts under `backend.usage()` as ("linear", path).
    """

    def __call__(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        amax_group=None,
    ) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if fp8_usable(x) and not compiling:
            from megagen.kernels.te_ops import fp8_gemm

            registry._usage[("linear", "te")] = registry._usage.get(("linear", "te"), 0) + 1
            return fp8_gemm(self, x, weight, bias, amax_group)
        if not compiling:
            registry._usage[("linear", "torch")] = registry._usage.get(("linear", "torch"), 0) + 1
        return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose GEMM runs in FP8 through Transformer Engine when `train.fp8=true` allows it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gemm = Gemm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x, self.weight, self.bias)


def te_parallel_linear(
    linear: nn.Linear, mode: str, tp_group, tp_size: int, tp_rank: int, sequence_parallel: bool
) -> nn.Module | None:
    """TE's column/row-parallel linear holding this rank's shard of `linear`; None (logged once by
    `backend.report_extras`) when Transformer Engine is not installed."""
    if not registry.installed("te"):
        return None
    from megagen.kernels.te_ops import parallel_linear

    return parallel_linear(linear, mode, tp_group, tp_size, tp_rank, sequence_parallel)
