"""CUDA Graph capture of the transformer blocks' forward + backward (`train.cuda_graphs=true`).

Buckets give every micro-batch of a bucket the same shapes, so each bucket's block stack is captured once:
on the first training call of block 0 with a new (shapes, dtypes, mask) key, all blocks are warmed up on
a side stream and captured together (forward in order, backward in reverse) by
`torch.cuda.make_graphed_callables`, every bucket into the one memory pool the stack shares (buckets run
one at a time, so their graphs can reuse each other's memory instead of each holding its own); later
micro-batches of that bucket copy their inputs into the static buffers and replay. A new bucket is a new
key: it is captured on first sight (re-capture per bucket). Evaluation and no-grad calls run eagerly.
Everything outside the blocks (embeddings, loss) stays eager; it is small and shape-light. Capture runs
with autocast's weight-cast cache off: torch refuses to capture with it on, since a cached cast would be
baked into the graph and go stale when the weights change.

How the blocks reach their graphs: each block's class is swapped for `CudaGraphed<Block>`, a subclass whose
forward asks the stack's `BlockGraphs` (no patched `forward` attribute), so `print(model)` shows it and the
block keeps its module object, parameter names (checkpoints) and hooks.

What cannot be captured is refused at start-up, before the model is built, by `check_cuda_graphs`, with
a ConfigError naming `train.cuda_graphs` and the reason:
- no CUDA device (CPU runs);
- FSDP / HSDP (world > 1 on the data axes): FSDP2's all-gather/free hooks allocate and synchronise with
  the CPU per call, which capture forbids;
- tensor or context parallelism: their collectives and DTensor parameters are outside what
  make_graphed_callables handles here;
- activation recompute: recomputation re-enters autograd during backward, outside the captured graph;
- `parallel.compile`: graphing compiled blocks needs inductor's own cudagraph trees (mode
  "reduce-overhead"), not this path;
- `train.fp8`: Transformer Engine's FP8 scaling state is updated outside the graph.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from megagen.config import Config, ConfigError

log = logging.getLogger("megagen")

KEY = "train.cuda_graphs"


def refusal(cfg: Config, device: torch.device | None = None, world_size: int = 1) -> str | None:
    """Why this config cannot use CUDA graphs, or None when it can."""
    device = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"needs a CUDA device; this run is on {device.type} (set {KEY}=false)"
    p = cfg.parallel
    if p.tp > 1 or p.cp > 1:
        return f"not supported with tensor/context parallelism (parallel.tp={p.tp}, parallel.cp={p.cp})"
    if world_size > 1:
        return (
            f"not supported with FSDP/HSDP over {world_size} ranks: FSDP2's per-block all-gather and "
            "free hooks allocate and synchronise with the CPU, which capture forbids"
        )
    if cfg.train.recompute != "none":
        return f"not supported with activation recompute (train.recompute={cfg.train.recompute})"
    if p.compile:
        return "not supported together with parallel.compile (use one or the other)"
    if cfg.train.fp8:
        return "not supported with train.fp8 (Transformer Engine updates FP8 scales outside the graph)"
    return None


def check_cuda_graphs(cfg: Config, runtime) -> None:
    """Raise ConfigError naming `train.cuda_graphs` when the option is on and cannot work here."""
    if not cfg.train.cuda_graphs:
        return
    reason = refusal(cfg, runtime.device, getattr(runtime, "world_size", 1))
    if reason is not None:
        raise ConfigError(KEY, reason)


class CudaGraphedBlock(nn.Module):
    """Put in front of a block's own class by `BlockGraphs` (`CudaGraphed<Block>`), so printing the model
    shows which blocks replay graphs while parameter names (and so checkpoints) stay the block's own.
    Its forward hands training calls to the stack's graphs; `eager_forward` is the block's own forward."""

    block_graphs: BlockGraphs
    block_index: int

    def forward(self, *args):
        return self.block_graphs.call(self.block_index, args)

    def eager_forward(self, *args):
        return super().forward(*args)

    def extra_repr(self) -> str:
        own = super().extra_repr()
        return "cuda_graphs=per_bucket" + (f", {own}" if own else "")


@functools.cache
def graphed_class(block_class: type) -> type:
    """`CudaGraphed<Block>`: the block's class with `CudaGraphedBlock`'s forward in front (one per class)."""
    return type(f"CudaGraphed{block_class.__name__}", (CudaGraphedBlock, block_class), {})


class _Call(nn.Module):
    """A hook-free wrapper make_graphed_callables can take over; `present[i]` is False where the block's
    i-th positional argument is None (graphed callables take tensors only)."""

    def __init__(self, block: CudaGraphedBlock, present: tuple[bool, ...]):
        super().__init__()
        self.block, self.present = block, present

    def forward(self, *tensors):
        it = iter(tensors)
        return self.block.eager_forward(*(next(it) if here else None for here in self.present))


def _autocast_without_cache():
    """The autocast state of the calling region (on or off, same dtype) with its cast cache disabled."""
    enabled = torch.is_autocast_enabled("cuda")
    return torch.autocast(
        "cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=enabled, cache_enabled=False
    )


class BlockGraphs:
    """Per-bucket CUDA graphs of a stack of blocks, each called as `block(x, *tensors_or_None)` with the same
    argument shapes in and x's shape out (transformer blocks). Each block's class becomes
    `CudaGraphed<Block>` (`graphed_class`); its module object, parameters and hooks stay as they were."""

    capturable = staticmethod(lambda x: x.is_cuda)
    """Whether a call on `x` may be captured (tests substitute a fake capture on CPU)."""

    def __init__(self, blocks: nn.ModuleList, warmup_iters: int = 3):
        self.blocks = list(blocks)
        self.warmup_iters = warmup_iters
        self.graphs: dict[tuple, list] = {}
        self.captures = 0
        self.pool = None
        """The graph memory pool every bucket's capture shares (made at the first capture)."""
        for i, block in enumerate(self.blocks):
            block.__class__ = graphed_class(type(block))
            block.block_graphs, block.block_index = self, i

    @staticmethod
    def _key(args) -> tuple:
        return tuple(
            None if a is None else (tuple(a.shape), a.dtype, a.requires_grad, a.device) for a in args
        )

    def _capture(self, key: tuple, args) -> list:
        present = tuple(a is not None for a in args)
        callables = tuple(_Call(b, present) for b in self.blocks)

        def sample():
            return tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args if a is not None)

        log.info("cuda graphs: capturing %d blocks for shapes %s", len(callables), [k and k[0] for k in key])
        torch.cuda.synchronize()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with _autocast_without_cache():
            graphed = torch.cuda.make_graphed_callables(
                callables,
                tuple(sample() for _ in callables),
                num_warmup_iters=self.warmup_iters,
                pool=self.pool,
            )
        torch.cuda.synchronize()
        self.captures += 1
        return list(graphed)

    def call(self, index: int, args: tuple):
        """Block `index` on `args`: replay its graph for this bucket (capturing the whole stack when block 0
        meets a new bucket); eager for no-grad, eval and non-capturable calls."""
        block = self.blocks[index]
        if not (torch.is_grad_enabled() and block.training and self.capturable(args[0])):
            return block.eager_forward(*args)
        key = self._key(args)
        graphed = self.graphs.get(key)
        if graphed is None:
            if index != 0:  # a stack entered mid-way: no capture for it
                return block.eager_forward(*args)
            graphed = self.graphs[key] = self._capture(key, args)
        return graphed[index](*(a for a in args if a is not None))


def enable_cuda_graphs(cfg: Config, model: nn.Module, plan, runtime) -> BlockGraphs | None:
    """Install per-bucket graph capture on the plan's blocks (after `check_cuda_graphs` accepted the run)."""
    if not cfg.train.cuda_graphs:
        return None
    check_cuda_graphs(cfg, runtime)
    graphs = BlockGraphs(model.get_submodule(plan.blocks))
    log.info("cuda graphs: enabled on %d blocks (captured per bucket on first use)", len(graphs.blocks))
    return graphs
