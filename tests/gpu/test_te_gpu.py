"""Transformer Engine paths against torch on a GPU: FP8 linear vs F.linear, DotProductAttention vs SDPA.

Skipped without CUDA or without transformer_engine (run_checks.sh then reports "unverified (not installed)").
FP8 (E4M3 forward) keeps ~3 significant bits per element; a GEMM over K=1536 averages that to a few
percent, hence the 8e-2 bound on the linear.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagen import kernels as K
from megagen.kernels import backend as registry
from tests.gpu.test_kernels_gpu import compare

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not registry.installed("te"), reason="transformer_engine not installed"),
]


def test_fp8_linear_matches_torch_linear():
    K.configure("auto", "auto", fp8=True)
    try:
        lin = K.Linear(1536, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(2, 512, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        registry.reset_usage()
        compare(lin, lambda t: F.linear(t, lin.weight), [x], 8e-2, "fp8 linear")
        assert registry.usage().get(("linear", "te"), 0) >= 1, "the TE path did not run"
    finally:
        K.configure("auto", "auto", fp8=False)


@pytest.mark.parametrize("masked", [False, True])
def test_te_attention_matches_sdpa(masked):
    from megagen.kernels.te_ops import attention as te_attention

    q, k, v = (
        torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    mask = None
    if masked:
        mask = torch.ones(2, 256, dtype=torch.bool, device="cuda")
        mask[1, 100:] = False
    compare(te_attention, K.attention_math, [q, k, v, mask], 2e-2, "te attention")


def test_te_parallel_linear_holds_this_ranks_shard():
    full = torch.nn.Linear(64, 128, bias=False, device="cuda")
    te_lin = K.linear.te_parallel_linear(full, "column", None, 1, 0, False)
    assert te_lin is not None and torch.equal(te_lin.weight, full.weight)
