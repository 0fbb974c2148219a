"""Activation recompute per transformer block (`train.recompute = none | full | selective`).

`apply_recompute` makes each block of the plan's block list a `Recomputed<Block>` (`class_swap.py`): a
subclass whose forward runs the block's own forward under `torch.utils.checkpoint`. No wrapper module is
inserted, so parameter names and state_dict keys are unchanged (checkpoints and parallel plans address
parameters by name), and `print(model)` shows the policy on each block.

Policies:
  none       nothing is recomputed; autograd saves whatever each op needs.
  full       only the block's inputs are kept; the whole block is re-run in backward.
  selective  matmul outputs (mm / addmm / bmm / baddbmm / _scaled_mm) are kept; the cheap ops around them
             (norms, elementwise, activations, and the attention core including its softmax) are
             re-run in backward. Built on `torch.utils.checkpoint.create_selective_checkpoint_contexts`.

Composition with FSDP2: apply recompute first, then `fully_shard` each block. FSDP2's hooks live on the
module's `__call__` (forward pre/post hooks, and a pre-backward hook on the block's outputs), i.e. *outside*
the checkpointed region, exactly like torchtitan's checkpoint-wrapper-inside-fully_shard: the forward
runs between FSDP's unshard and reshard, and in backward FSDP's pre-backward hook (fired when the gradient
reaches the block's outputs) unshards the parameters before the first of the block's autograd nodes
unpacks a saved tensor, which is what triggers the recompute, so the recompute sees unsharded
parameters. Gradients reach the same unsharded parameter objects FSDP reduce-scatters from.

RNG: `preserve_rng_state=True` by default, so a block with dropout or any other random op recomputes the
same values it produced in forward (gradients stay exact). The cost is stashing the CPU (and, for CUDA
inputs, the device) generator state once per block per forward, which is negligible next to a block.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megagen.parallel.class_swap import swap_in, swap_out

POLICIES = ("none", "full", "selective")


def _matmul_packets() -> frozenset:
    aten = torch.ops.aten
    # aten.linear / aten.matmul are CompositeImplicitAutograd: below autograd (where the selective-checkpoint
    # dispatch mode sits) they show up as view/t + mm or addmm (2-D after flattening) or bmm / baddbmm
    # (batched matmul). They are listed anyway in case a backend keeps them whole.
    names = ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "_scaled_mm")
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


def _collective_packets() -> frozenset:
    """Collectives: recomputing them would repeat the communication, so their outputs are kept."""
    ops = []
    for ns, names in (
        (
            "c10d",
            (
                "_allgather_base_",
                "allgather_",
                "_reduce_scatter_base_",
                "reduce_scatter_",
                "allreduce_",
                "alltoall_base_",
                "alltoall_",
            ),
        ),
        (
            "_c10d_functional",
            (
                "all_gather_into_tensor",
                "reduce_scatter_tensor",
                "all_reduce",
                "all_to_all_single",
                "wait_tensor",
            ),
        ),
    ):
        namespace = getattr(torch.ops, ns, None)
        for n in names:
            if namespace is not None and hasattr(namespace, n):
                ops.append(getattr(namespace, n))
    return frozenset(ops)


_SAVE_OPS = _matmul_packets() | _collective_packets()


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep matmul and collective outputs; recompute the rest (norms, elementwise, activations, attention)."""
    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.MUST_SAVE if packet in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


class Recomputed:
    """Block wrapper (swapped in as a subclass): the block's forward, checkpointed with its policy."""

    prefix = "Recomputed"
    recompute_policy = "none"
    recompute_preserves_rng = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        run = super().forward
        if not torch.is_grad_enabled():
            # Nothing is saved for backward under no_grad / inference_mode: run the block as is.
            return run(*args, **kwargs)
        # Keyword arguments go through a partial so that a block keyword that happens to share a name with a
        # `checkpoint` option (debug, context_fn, ...) is never swallowed by checkpoint itself.
        fn = functools.partial(run, **kwargs) if kwargs else run
        extra = {"context_fn": _selective_context} if self.recompute_policy == "selective" else {}
        return checkpoint(
            fn, *args, use_reentrant=False, preserve_rng_state=self.recompute_preserves_rng, **extra
        )

    def extra_repr(self) -> str:
        inner = super().extra_repr()
        return f"recompute={self.recompute_policy}" + (f", {inner}" if inner else "")


def _get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError as e:
        raise ValueError(f"recompute: no submodule {path!r} in {type(model).__name__}: {e}") from None


def apply_recompute(
    model: nn.Module, blocks_path: str, policy: str, *, preserve_rng_state: bool = True, layers: int = -1
) -> None:
    """Checkpoint every block of the `nn.ModuleList` at `blocks_path` (dotted) inside `model`, in place.

    `policy` is the value of `train.recompute`: "none", "full" or "selective". Apply before `fully_shard`.
    Calling it again replaces the previous policy ("none" restores the plain forward). `layers`
    (`train.recompute_layers`) limits the policy to the first k blocks (-1 = all): at long sequences a
    model may need recompute in some blocks but not all, and every recomputed block costs a forward.
    """
    if policy not in POLICIES:
        raise ValueError(f"train.recompute must be one of {', '.join(POLICIES)}; got {policy!r}")
    blocks = _get_submodule(model, blocks_path)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"recompute: {blocks_path!r} must be an nn.ModuleList of blocks, got {type(blocks).__name__}"
        )
    if layers < -1:
        raise ValueError(f"train.recompute_layers must be -1 (all) or >= 0; got {layers}")
    for index, block in enumerate(blocks):
        swap_out(block, Recomputed)  # re-applying replaces the previous policy
        if policy == "none" or (layers >= 0 and index >= layers):
            continue
        swap_in(block, Recomputed)
        block.recompute_policy, block.recompute_preserves_rng = policy, preserve_rng_state


def recompute_policy(block: nn.Module) -> str:
    """The recompute policy currently applied to `block` ("none" if none)."""
    return block.recompute_policy if isinstance(block, Recomputed) else "none"
