"""Every kernel's reference path on CPU: each op against an independent formula, values and gradients.

The fast paths (Triton, Transformer Engine, pinned SDPA backends) are checked against these same
references on a GPU by tests/gpu/.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagen import kernels as K
from tests.norms import rel_diff


@pytest.fixture(autouse=True)
def _torch_backend():
    K.configure("auto", "auto", False)
    yield
    K.configure("auto", "auto", False)


def test_rms_norm_reference_matches_the_formula_and_the_dispatched_op():
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    assert rel_diff(K.rms_norm_reference(x, w, 1e-6), want) < 1e-6  # the reference computes in fp32
    assert rel_diff(K.rms_norm(x, w, 1e-6), want) < 1e-12
    assert rel_diff(K.rms_norm_reference(x, None, 1e-6), want / w) < 1e-6
    xb = x.to(torch.bfloat16)
    assert K.rms_norm_reference(xb, w.float(), 1e-6).dtype == torch.bfloat16


def test_rms_norm_modulate_is_norm_then_modulate_values_and_grads():
    torch.manual_seed(1)
    x = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    norm = K.RMSNorm(32).double()
    with torch.no_grad():
        norm.weight.copy_(w)
    want = K.modulate(norm(x), shift, scale)
    for got in (
        K.rms_norm_modulate_reference(x, w, 1e-6, shift, scale),
        K.rms_norm_modulate(x, w, 1e-6, shift, scale),
        norm.modulated(x, shift, scale),
    ):
        assert rel_diff(got, want) < 1e-6
    assert torch.autograd.gradcheck(
        lambda *a: K.rms_norm_modulate(a[0], a[1], 1e-6, a[2], a[3]),
        (x[:, :2, :8], w[:8], shift[:, :8], scale[:, :8]),
    )


def test_modulate_and_gated_residual_broadcast_per_sample():
    torch.manual_seed(2)
    x, y = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    shift, scale, gate = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    for b in range(2):
        for s in range(4):
            assert torch.allclose(K.modulate(x, shift, scale)[b, s], x[b, s] * (1 + scale[b]) + shift[b])
            assert torch.allclose(K.gated_residual(x, gate, y)[b, s], x[b, s] + gate[b] * y[b, s])
    assert torch.equal(K.gated_residual(x, gate, y), K.gated_residual_reference(x, gate, y))


def test_swiglu_reference_values_and_grads():
    torch.manual_seed(3)
    g = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(K.swiglu(g, u), g * torch.sigmoid(g) * u)
    assert torch.autograd.gradcheck(K.swiglu, (g, u))
    assert torch.autograd.gradcheck(K.swiglu_reference, (g, u))


def test_factorized_position_is_the_sum_of_three_lookups():
    torch.manual_seed(4)
    tt, th, tw = torch.randn(3, 8), torch.randn(5, 8), torch.randn(6, 8)
    ids = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(5), torch.arange(6), indexing="ij"), -1)
    ids = ids.reshape(1, -1, 3)
    got = K.factorized_position(ids, tt, th, tw)
    assert got.shape == (1, 90, 8)
    i = 37
    t, h, w = ids[0, i].tolist()
    assert torch.allclose(got[0, i], tt[t] + th[h] + tw[w])
    emb = [torch.nn.Embedding.from_pretrained(tab) for tab in (tt, th, tw)]
    assert torch.allclose(got, sum(e(ids[..., k]) for k, e in enumerate(emb)))


def test_rotary_reference_rotates_pairs_and_inverts():
    torch.manual_seed(5)
    x = torch.randn(2, 6, 3, 8, dtype=torch.float64)
    cos, sin = K.rotary_frequencies(torch.arange(6), 8)
    y = K.rotary(x, cos, sin)
    # the complex-number form: (x1 + i x2) · e^{iθ}
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[
        :, None
    ].to(torch.complex128)
    assert torch.allclose(y, torch.cat([z.real, z.imag], -1))
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.allclose(K.rotary_reference(y, cos, -sin), x)  # rotating back is the backward pass
    assert torch.allclose(K.rotary(x, cos[:1].expand(6, 4), sin[:1].expand(6, 4))[:, :1], x[:, :1])


@pytest.mark.parametrize("mask_kind", [None, "batch", "shared"])
def test_attention_matches_the_explicit_formula_with_padding(mask_kind):
    torch.manual_seed(6)
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 8)
    mask = None
    if mask_kind == "batch":
        mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    elif mask_kind == "shared":
        mask = torch.tensor([1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    want = K.attention_math(q, k, v, mask)
    assert rel_diff(K.attention_reference(q, k, v, mask), want) < 1e-5
    assert rel_diff(K.attention(q, k, v, mask), want) < 1e-5
    if mask is not None:  # padded keys carry no weight: changing them changes nothing
        bad = mask if mask.dim() == 2 else mask.expand(2, -1)
        k2, v2 = k.clone(), v.clone()
        k2[~bad], v2[~bad] = 100.0, 100.0
        assert rel_diff(K.attention(q, k2, v2, mask), want) < 1e-5


@pytest.mark.parametrize("kind", ["flash", "cudnn", "efficient", "math", "te"])
def test_pinned_attention_backends_fall_back_on_cpu(kind):
    torch.manual_seed(7)
    q = torch.randn(1, 4, 2, 8)
    mask = torch.tensor([True, True, False, True])
    K.configure("auto", kind, False)
    assert rel_diff(K.attention(q, q, q, mask), K.attention_math(q, q, q, mask)) < 1e-5


def test_flash_with_a_padding_mask_goes_to_a_masked_backend():
    from torch.nn.attention import SDPBackend

    from megagen.kernels.attention import _sdpa_backends

    assert _sdpa_backends("flash", masked=False) == [SDPBackend.FLASH_ATTENTION]
    assert SDPBackend.FLASH_ATTENTION not in _sdpa_backends("flash", masked=True)
    assert _sdpa_backends("auto", masked=True) is None


def test_linear_is_an_nn_linear_and_computes_f_linear():
    torch.manual_seed(8)
    lin = K.Linear(8, 4, bias=True)
    assert isinstance(lin, torch.nn.Linear)
    x = torch.randn(3, 8)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    K.configure("auto", "auto", True)  # fp8 requested, no TE / no CUDA here: the torch path
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
