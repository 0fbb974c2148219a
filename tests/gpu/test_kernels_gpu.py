"""Each fast kernel path against its reference on a GPU: forward values and every input gradient.

fp32 within 1e-5 relative (‖a−b‖/‖b‖), bf16 within 2e-2 (the fast paths keep fp32 in registers where the
reference rounds intermediates to bf16). Skipped without CUDA, except that the Triton cases also run on
CPU in Triton's interpreter under TRITON_INTERPRET=1; Triton cases are skipped without Triton.
"""

from __future__ import annotations

import os

import pytest
import torch

from megagen import kernels as K
from megagen.kernels import backend as registry
from megagen.kernels.attention import attention_sdpa
from tests.norms import rel_diff

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""TRITON_INTERPRET=1 (with triton importable) runs the Triton cases on CPU in Triton's interpreter."""
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(
    not registry.installed("triton") or not (torch.cuda.is_available() or INTERPRET),
    reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1)",
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


def compare(fast, ref, inputs, tol, name):
    """Forward and backward of `fast` vs `ref` on the same inputs and the same output gradient."""
    leaves_f = [
        t.detach().clone().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t for t in inputs
    ]
    leaves_r = [
        t.detach().clone().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t for t in inputs
    ]
    out_f, out_r = fast(*leaves_f), ref(*leaves_r)
    assert out_f.dtype == out_r.dtype and out_f.shape == out_r.shape, name
    assert rel_diff(out_f, out_r) <= tol, f"{name}: forward rel {rel_diff(out_f, out_r):.2e}"
    dy = torch.randn_like(out_r)
    out_f.backward(dy)
    out_r.backward(dy)
    for i, (a, b) in enumerate(zip(leaves_f, leaves_r)):
        if torch.is_tensor(b) and b.requires_grad:
            assert rel_diff(a.grad, b.grad) <= tol, (
                f"{name}: grad of input {i} rel {rel_diff(a.grad, b.grad):.2e}"
            )


def _t(*shape, dtype, grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1536, 1000])
def test_triton_rms_norm(dtype, d):
    from megagen.kernels import triton_ops as T

    x, w = _t(2, 333, d, dtype=dtype), _t(d, dtype=torch.float32)
    compare(T.rms_norm, K.rms_norm_reference, [x, w, 1e-6], TOL[dtype], "rms_norm")
    compare(T.rms_norm, K.rms_norm_reference, [x, None, 1e-6], TOL[dtype], "rms_norm (no weight)")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rms_norm_modulate(dtype):
    from megagen.kernels import triton_ops as T

    d = 1536
    x, w = _t(3, 257, d, dtype=dtype), _t(d, dtype=torch.float32)
    shift, scale = _t(3, d, dtype=dtype), _t(3, d, dtype=dtype)
    compare(
        T.rms_norm_modulate, K.rms_norm_modulate_reference, [x, w, 1e-6, shift, scale], TOL[dtype], "norm+mod"
    )


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_swiglu(dtype):
    from megagen.kernels import triton_ops as T

    compare(T.swiglu, K.swiglu_reference, [_t(2, 300, 4096, dtype=dtype), _t(2, 300, 4096, dtype=dtype)],
            TOL[dtype], "swiglu")  # fmt: skip


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gated_residual(dtype):
    from megagen.kernels import triton_ops as T

    x, y, gate = _t(2, 515, 1536, dtype=dtype), _t(2, 515, 1536, dtype=dtype), _t(2, 1536, dtype=dtype)
    compare(T.gated_residual, K.gated_residual_reference, [x, gate, y], TOL[dtype], "gated_residual")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_factorized_position(dtype):
    from megagen.kernels import triton_ops as T

    grid = torch.meshgrid(torch.arange(8), torch.arange(16), torch.arange(12), indexing="ij")
    ids = torch.stack(grid, -1).reshape(1, -1, 3).to(DEVICE)
    tables = [_t(n, 1536, dtype=dtype) for n in (32, 48, 48)]
    # atomics sum in another order than index_put's accumulation: fp32 tolerance still holds
    compare(T.factorized_position, K.factorized_position_reference, [ids, *tables], TOL[dtype], "position")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rotary(dtype):
    from megagen.kernels import triton_ops as T

    x = _t(2, 200, 16, 96, dtype=dtype)
    cos, sin = K.rotary_frequencies(torch.arange(200, device=DEVICE), 96)
    compare(T.rotary, K.rotary_reference, [x, cos, sin], TOL[dtype], "rotary")


@needs_cuda
@needs_triton
def test_registry_picks_triton_on_cuda_and_the_model_uses_it():
    K.configure("auto")
    for op in ("rms_norm", "swiglu", "rms_norm_modulate", "gated_residual"):
        assert registry.resolve(op, torch.device("cuda"))[0] == "triton", op
    from megagen.config import load_config
    from tests.unit.test_kernels_backend import EXAMPLE, _tiny_forward

    model, inputs = _tiny_forward(load_config(EXAMPLE))
    model = model.cuda()
    inputs = {
        k: ({n: t.cuda() for n, t in v.items()} if isinstance(v, dict) else v.cuda())
        for k, v in inputs.items()
    }
    registry.reset_usage()
    with torch.no_grad():
        fast = model(**inputs)
    assert registry.usage()[("rms_norm", "triton")] > 0 and registry.usage()[("swiglu", "triton")] > 0
    K.configure("torch")
    assert registry.resolve("rms_norm", torch.device("cuda"))[0] == "torch"
    with torch.no_grad():
        assert torch.allclose(model(**inputs), fast, rtol=1e-4, atol=1e-5)
    K.configure("auto")


@needs_cuda
@pytest.mark.parametrize("kind", ["auto", "flash", "cudnn", "efficient", "math"])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_backends_match_the_explicit_formula(kind, masked):
    q, k, v = (_t(2, 256, 8, 64, dtype=torch.bfloat16) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(2, 256, dtype=torch.bool, device=DEVICE)
        mask[0, 200:] = False
    try:
        fast = lambda *a: attention_sdpa(*a, kind=kind)  # noqa: E731
        compare(fast, K.attention_math, [q, k, v, mask], 2e-2, f"sdpa {kind}")
    except RuntimeError as exc:
        if "No available kernel" in str(exc) or "not supported" in str(exc).lower():
            pytest.skip(f"SDPA {kind} unavailable here: {exc}")
        raise
