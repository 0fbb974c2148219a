"""The online-softmax merge behind the overlapped CP all-gather: chunked attention merged by log-sum-exp
must equal attention over the concatenated keys, forward and backward, with padded (masked) keys."""

import torch

from megagen.parallel.attention_lse import reference_attention_with_lse as chunk_attention
from megagen.parallel.cp_overlap import key_bias, merge_chunks


def _full(q, k, v, valid):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + key_bias(valid, torch.float64)
    return torch.softmax(s, -1) @ v


def test_two_chunks_merged_match_full_attention_with_masked_keys():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    valid = torch.ones(10, dtype=torch.bool)
    valid[7:] = False  # the second chunk is partly padding
    bias = key_bias(valid, torch.float64)
    kk, vv = torch.cat([k, k.flip(2)], 2), torch.cat([v, v.flip(2)], 2)
    o1, l1 = chunk_attention(q, kk[:, :, :5], vv[:, :, :5], bias[..., :5])
    o2, l2 = chunk_attention(q, kk[:, :, 5:], vv[:, :, 5:], bias[..., 5:])
    merged, _ = merge_chunks([o1, o2], [l1, l2])
    ref = _full(q, kk, vv, valid)
    torch.testing.assert_close(merged, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(merged, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_a_fully_padded_chunk_weighs_nothing():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    valid = torch.tensor([True] * 4 + [False] * 4)
    bias = key_bias(valid, torch.float64)
    o1, l1 = chunk_attention(q, k, v, bias[..., :4])
    o2, l2 = chunk_attention(q, k, v, bias[..., 4:])
    merged, _ = merge_chunks([o1, o2], [l1, l2])
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, o1 / 1.0, atol=1e-12, rtol=0)
