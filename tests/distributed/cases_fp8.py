"""Worker side of test_fp8_wiring.py: which GEMM each linear runs under `train.fp8=true` with tp > 1.

There is no Transformer Engine on CPU, so TE's FP8 GEMM is replaced by a recorder (`F.linear` with a note
of the call: the weight shard's shape and the ranks of the amax group) and `fp8_usable` is forced true;
everything else — the model, the TP wrappers, FSDP, one training step — is the real engine.
"""

from __future__ import annotations

import sys
import types
from unittest import mock

import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed.cases_parity import config

LINEARS = ("Linear", "ColumnParallelLinear", "RowParallelLinear")


def gemm_paths(overrides: list[str]) -> dict:
    """{"paths": {module: {"type", "own_gemm", "fp8": [weight shape, amax ranks] or None}},
    "tp_ranks": this rank's tp group or None}."""
    from megagen.runtime_setup import distributed_runtime
    from megagen.train import train

    calls: dict[int, tuple] = {}

    def recording_fp8_gemm(owner, x, weight, bias=None, amax_group=None):
        ranks = None if amax_group is None else dist.get_process_group_ranks(amax_group)
        calls[id(owner)] = (list(weight.shape), ranks)
        return F.linear(x, weight, bias)

    fake_te = types.ModuleType("megagen.kernels.te_ops")
    fake_te.fp8_gemm = recording_fp8_gemm
    # only this one entry is swapped (patch.dict would also drop every module first imported meanwhile)
    real_te = sys.modules.get(fake_te.__name__)
    sys.modules[fake_te.__name__] = fake_te
    try:
        with mock.patch("megagen.kernels.linear.fp8_usable", lambda x: True):
            cfg = config([*overrides, "train.fp8=true", "train.steps=1"], "/tmp/megagen-fp8")
            runtime = distributed_runtime(cfg)
            model = train(cfg, runtime).model
    finally:
        if real_te is None:
            del sys.modules[fake_te.__name__]
        else:
            sys.modules[fake_te.__name__] = real_te
    paths = {}
    for name, module in model.named_modules():
        gemm = getattr(module, "gemm", None)
        if gemm is not None or type(module).__name__ in LINEARS:
            paths[name] = {
                "type": type(module).__name__,
                "own_gemm": gemm is not None,
                "fp8": calls.get(id(gemm)),
            }
    tp = runtime.mesh.group("tp") if runtime.dims.tp > 1 else None
    return {"paths": paths, "tp_ranks": None if tp is None else dist.get_process_group_ranks(tp)}
