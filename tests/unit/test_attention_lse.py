"""The LSE-returning chunk kernels (parallel/attention_lse.py): every path available here against the
reference math, with padded keys and an all-masked chunk; per-chunk backward with the merged out/lse must
add up to the gradient of attention over all keys."""

import pytest
import torch

from megagen.parallel.attention_lse import (
    attention_chunk_backward,
    attention_with_lse,
    lse_backend,
    reference_attention_with_lse,
)
from megagen.parallel.cp_overlap import key_bias, merge_chunks

KERNELS = ["cpu_flash", "reference"]  # the ones this CPU can run
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def _inputs(dtype, seed=0, sq=6, sk=10):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, sq, 8, generator=gen, dtype=dtype)
    k, v = (torch.randn(2, 3, sk, 8, generator=gen, dtype=dtype) for _ in range(2))
    valid = torch.ones(2, sk, dtype=torch.bool)
    valid[0, 7:] = False  # sample 0: the second chunk is partly padding
    valid[1, 5:] = False  # sample 1: the second chunk is all padding
    return q, k, v, key_bias(valid, torch.float32)


def test_cpu_dispatch_uses_the_fused_kernel():
    assert lse_backend(torch.zeros(1, 1, 1, 8)) == "cpu_flash"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_matches_reference_including_an_all_masked_chunk(backend, dtype):
    q, k, v, bias = _inputs(dtype)
    for sl in (slice(0, 5), slice(5, 10)):
        out, lse = attention_with_lse(q, k[:, :, sl], v[:, :, sl], bias[..., sl], backend)
        ref_out, ref_lse = reference_attention_with_lse(q, k[:, :, sl], v[:, :, sl], bias[..., sl])
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref_out, atol=TOL[dtype], rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=0)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()  # sample 1's second chunk: all masked


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", KERNELS)
def test_chunk_backwards_with_merged_out_and_lse_give_full_gradient(backend, dtype):
    q, k, v, bias = _inputs(dtype, seed=1)
    chunks = (slice(0, 5), slice(5, 10))
    parts = [attention_with_lse(q, k[:, :, c], v[:, :, c], bias[..., c], backend) for c in chunks]
    out, lse = merge_chunks(*zip(*parts))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    full = torch.softmax(leaves[0] @ leaves[1].transpose(-1, -2) * 8**-0.5 + bias.to(dtype), -1) @ leaves[2]
    torch.testing.assert_close(out, full.detach(), atol=TOL[dtype], rtol=0)
    g = torch.randn_like(out)
    want = torch.autograd.grad(full, leaves, g)
    grads = [
        attention_chunk_backward(g, q, k[:, :, c], v[:, :, c], out, lse, bias[..., c], backend)
        for c in chunks
    ]
    dq = grads[0][0] + grads[1][0]
    dk, dv = (torch.cat([grads[0][i], grads[1][i]], 2) for i in (1, 2))
    for got, ref in zip((dq, dk, dv), want):
        torch.testing.assert_close(got, ref, atol=10 * TOL[dtype], rtol=0)
    assert (grads[1][1][1] == 0).all() and (grads[1][2][1] == 0).all()  # the all-masked chunk: no grads


def test_bf16_runs_in_bf16_with_fp32_lse():
    q, k, v, bias = _inputs(torch.bfloat16)
    bias = bias.to(torch.bfloat16)  # cp_overlap builds the mask in q's dtype
    out, lse = attention_with_lse(q, k, v, bias)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = reference_attention_with_lse(q, k, v, bias)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    g = torch.randn_like(out)
    got = attention_chunk_backward(g, q, k, v, out, lse, bias)
    want = attention_chunk_backward(g, q, k, v, out, lse, bias, "reference")
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=0)


def test_cuda_bias_is_a_16_aligned_copy_of_a_chunks_slice():
    """The CUDA kernel needs 16-aligned bias rows; checked on CPU, since no GPU runs here."""
    from megagen.parallel.attention_lse import _cuda_bias

    q = torch.zeros(2, 3, 23, 8)
    whole = key_bias(torch.arange(46) < 40, torch.float32)
    got = _cuda_bias(whole[..., 23:], q, q)
    assert got.shape == (2, 3, 23, 23) and got.stride(0) % 16 == 0 and got.stride(-1) == 1
    assert torch.equal(got[:, :1, :1], whole[..., 23:].expand(2, 1, 1, 23))
