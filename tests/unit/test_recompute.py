"""Tests for per-block activation recompute (parallel/recompute.py): exact gradients, unchanged parameter
names, the saved-activation memory of each policy, FSDP2 composition and config errors.

Run with `pytest -s` to see the measured memory of each policy.
"""

from __future__ import annotations

import copy
import gc
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megagen.parallel.recompute import POLICIES, apply_recompute, recompute_policy

D, HEADS, HIDDEN, SEQ, BATCH, DEPTH = 64, 4, 256, 256, 2, 4


class Block(nn.Module):
    """Pre-norm DiT-like block: RMSNorm → SDPA self-attention → RMSNorm → SwiGLU, residuals, a gate."""

    def __init__(self, d: int = D, heads: int = HEADS, hidden: int = HIDDEN):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.RMSNorm(d)
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, *, gate: torch.Tensor | None = None):
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x) + cond).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        h = self.norm2(x)
        m = self.w2(F.silu(self.w1(h)) * self.w3(h))
        return x + (m if gate is None else gate * m)


class TinyDiT(nn.Module):
    def __init__(self, depth: int = DEPTH):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.norm = nn.RMSNorm(D)
        self.head = nn.Linear(D, D)

    def forward(self, x, cond, gate):
        for block in self.blocks:
            x = block(x, cond, gate=gate)  # positional + keyword arguments
        return self.head(self.norm(x))


def _model_and_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyDiT()
    x = torch.randn(BATCH, SEQ, D, generator=g)
    cond = torch.randn(BATCH, 1, D, generator=g)
    gate = torch.randn(D, generator=g)
    return model, (x, cond, gate)


def _loss(model, inputs):
    return model(*inputs).square().mean()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= 1e-6 * scale, f"{what}: max abs error {err:.3g} vs max |grad| {scale:.3g}"


class _ActivationMeter(TorchDispatchMode):
    """Tracks every storage an op produces (unique storages, so views are not double counted), by weak
    reference, excluding the parameters and inputs. `live()` is the bytes still alive: called after the
    forward, that is exactly what is kept for backward, wherever it is kept (autograd's saved tensors,
    checkpoint's held block inputs, the selective-checkpoint cache of matmul outputs)."""

    def __init__(self, exclude):
        super().__init__()
        self._keep = [StorageWeakRef(t.untyped_storage()) for t in exclude]
        self.excluded = {r.cdata for r in self._keep}
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)  # holding a weak ref pins the address: cdata stays unique
                if ref.cdata not in self.excluded and ref.cdata not in self.refs:
                    self.refs[ref.cdata] = (ref, storage.nbytes())
        self.peak = max(self.peak, self.live())
        return out

    def live(self) -> int:
        for key in [k for k, (r, _) in self.refs.items() if r.expired()]:
            del self.refs[key]
        return sum(n for _, n in self.refs.values())


def _measure(policy: str, base: nn.Module, inputs) -> dict[str, int]:
    model = copy.deepcopy(base)
    apply_recompute(model, "blocks", policy)
    inputs = tuple(t.detach().requires_grad_() for t in inputs)
    meter = _ActivationMeter(list(model.parameters()) + list(inputs))
    hooked: dict[int, tuple[StorageWeakRef, int]] = {}

    def pack(t):
        ref = StorageWeakRef(t.untyped_storage())
        if ref.cdata not in meter.excluded:
            hooked.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
        return t

    with meter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, inputs)
    gc.collect()
    retained = meter.live()
    with meter:
        loss.backward()
    return {
        "retained": retained,
        "hooked": sum(n for _, n in hooked.values()),
        "peak": meter.peak,
    }


@pytest.mark.parametrize("policy", POLICIES)
def test_gradients_match_reference(policy):
    ref, inputs = _model_and_inputs()
    model = copy.deepcopy(ref)
    apply_recompute(model, "blocks", policy)
    assert all(recompute_policy(b) == policy for b in model.blocks)

    ref_inputs = tuple(t.clone().requires_grad_() for t in inputs)
    rc_inputs = tuple(t.clone().requires_grad_() for t in inputs)
    _loss(ref, ref_inputs).backward()
    out = _loss(model, rc_inputs)
    out.backward()
    assert torch.equal(out, _loss(ref, inputs))

    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        _assert_close(p.grad, ref_params[name].grad, name)
    for i, (a, b) in enumerate(zip(rc_inputs, ref_inputs)):
        _assert_close(a.grad, b.grad, f"input {i}")


@pytest.mark.parametrize("policy", POLICIES)
def test_state_dict_keys_unchanged(policy):
    ref, _ = _model_and_inputs()
    model = copy.deepcopy(ref)
    apply_recompute(model, "blocks", policy)
    assert list(model.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]
    model.load_state_dict(ref.state_dict())  # strict


def test_saved_activation_memory_ordering():
    base, inputs = _model_and_inputs()
    m = {policy: _measure(policy, base, inputs) for policy in POLICIES}

    mib = 2**20
    none = m["none"]["retained"]
    print()
    print(f"saved activations after forward, d={D} seq={SEQ} batch={BATCH} blocks={DEPTH}, fp32:")
    for policy, r in m.items():
        print(
            f"  {policy:9s} retained {r['retained'] / mib:7.3f} MiB ({r['retained'] / none:6.1%} of none)"
            f"  peak fwd+bwd {r['peak'] / mib:7.3f} MiB"
            f"  [seen by saved_tensors_hooks: {r['hooked'] / mib:7.3f} MiB]"
        )

    full, sel = m["full"]["retained"], m["selective"]["retained"]
    assert full * 3 <= none, m
    assert full * 3 <= sel, m
    assert sel <= 0.75 * none, m
    assert m["full"]["peak"] < m["selective"]["peak"] < m["none"]["peak"], m

    # Selective keeps exactly each block's matmul outputs (qkv, proj, w1, w3, w2) on top of what full keeps.
    matmul_out = DEPTH * BATCH * SEQ * (3 * D + D + 2 * HIDDEN + D) * 4
    assert sel - full == matmul_out, (sel - full, matmul_out)

    # Without checkpointing the meter agrees with autograd's own saved tensors ...
    assert abs(m["none"]["hooked"] - none) <= 0.01 * none, m
    # ... but saved_tensors_hooks cannot see inside a checkpoint (its own hooks shadow outer ones), nor the
    # selective-checkpoint cache: it reports the same bytes for selective as for full.
    assert m["selective"]["hooked"] == m["full"]["hooked"], m


def test_bad_policy():
    model, _ = _model_and_inputs()
    with pytest.raises(ValueError, match=r"train\.recompute.*none, full, selective.*'partial'"):
        apply_recompute(model, "blocks", "partial")
    with pytest.raises(ValueError, match="ModuleList"):
        apply_recompute(model, "head", "full")
    with pytest.raises(ValueError, match="no submodule"):
        apply_recompute(model, "layers", "full")


def test_reapply_none_restores_and_deepcopy_rebinds():
    ref, inputs = _model_and_inputs()
    model = copy.deepcopy(ref)
    apply_recompute(model, "blocks", "full")
    apply_recompute(model, "blocks", "selective")  # replaces, does not nest
    assert all(recompute_policy(b) == "selective" for b in model.blocks)
    apply_recompute(model, "blocks", "none")
    assert all("forward" not in b.__dict__ and recompute_policy(b) == "none" for b in model.blocks)

    # A deep copy (an EMA model, say) must run its own parameters, not the original's.
    apply_recompute(model, "blocks", "full")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    with torch.no_grad():
        expected = copy.deepcopy(ref)
        for p in expected.parameters():
            p.mul_(0.5)
    assert torch.equal(twin(*inputs), expected(*inputs))
    assert torch.equal(model(*inputs), ref(*inputs))

    # No grad: no checkpoint, same values.
    with torch.no_grad():
        assert torch.equal(model(*inputs), ref(*inputs))


def test_block_keywords_named_like_checkpoint_options():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, *, debug=None, context_fn=None, use_reentrant=None):
            return self.lin(x) * debug + context_fn * use_reentrant

    holder = nn.Module()
    holder.blocks = nn.ModuleList([Odd()])
    x = torch.randn(3, 4, requires_grad=True)
    kw = {"debug": torch.tensor(2.0), "context_fn": torch.tensor(3.0), "use_reentrant": torch.tensor(5.0)}
    expected = holder.blocks[0](x, **kw)
    for policy in ("full", "selective"):
        apply_recompute(holder, "blocks", policy)
        out = holder.blocks[0](x, **kw)
        assert torch.equal(out, expected)
        out.sum().backward()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_composes_with_fsdp2_world_size_1():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    ref, inputs = _model_and_inputs()
    _loss(ref, inputs).backward()
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        for policy in ("full", "selective"):
            model = copy.deepcopy(ref)
            model.zero_grad(set_to_none=True)
            apply_recompute(model, "blocks", policy)  # recompute first, then fully_shard per block
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            loss = _loss(model, inputs)
            # Resharded after forward: the module holds sharded DTensors again, so the recompute in backward
            # only works if FSDP's pre-backward hook has unsharded the block (plain tensor ops on a DTensor
            # parameter would fail).
            assert isinstance(model.blocks[0].qkv.weight, DTensor)
            loss.backward()
            ref_params = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                _assert_close(p.grad.full_tensor(), ref_params[name].grad, f"{policy} {name}")
    finally:
        dist.destroy_process_group()


def test_recompute_layers_limits_full_recompute_to_the_first_blocks():
    model = TinyDiT()
    apply_recompute(model, "blocks", "full", layers=1)
    assert [recompute_policy(b) for b in model.blocks] == ["full"] + ["none"] * (DEPTH - 1)
    with pytest.raises(ValueError, match="train.recompute_layers"):
        apply_recompute(model, "blocks", "full", layers=-2)
