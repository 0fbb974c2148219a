"""How the inputs of one tensor-parallel region enter it (the plain path, no overlap)."""

from __future__ import annotations

import torch

from megagen.parallel.mappings import copy_to_region, gather_along
from megagen.parallel.plan import TPRegion

SEQ_DIM = 1  # activations inside blocks are (batch, sequence, features)


class RegionEntry:
    """How the inputs of one tensor-parallel region enter it, by argument name: a sequence-sharded
    activation is all-gathered over tp under SP, else copied (identity forward, all-reduce backward); a
    replicated one (text context) is copied without SP and passed as is under SP, where its gradient stays
    partial like every replicated parameter's (the gradient rule of `grad_reduction.py`)."""

    def __init__(self, region: TPRegion, arg_names: list[str], group, sequence_parallel: bool):
        self.region, self.arg_names = region, arg_names
        self.group, self.sequence_parallel = group, sequence_parallel

    def __repr__(self) -> str:
        seq = "gather" if self.sequence_parallel else "copy"
        parts = [f"{n}: {seq}" for n in self.region.seq_args]
        parts += [
            f"{n}: {'as is' if self.sequence_parallel else 'copy'}" for n in self.region.replicated_args
        ]
        return "tp_inputs=(" + ", ".join(parts) + ")"

    def _enter(self, name: str, x):
        if not isinstance(x, torch.Tensor):
            return x
        if name in self.region.seq_args:
            return (
                gather_along(x, SEQ_DIM, self.group)
                if self.sequence_parallel
                else copy_to_region(x, self.group)
            )
        if name in self.region.replicated_args and not self.sequence_parallel:
            return copy_to_region(x, self.group)
        return x

    def prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The region's call arguments with every declared input brought into the region."""
        args = (
            tuple(self._enter(name, x) for name, x in zip(self.arg_names, args)) + args[len(self.arg_names) :]
        )
        return args, {name: self._enter(name, x) for name, x in kwargs.items()}

    def run(self, forward, args: tuple, kwargs: dict):
        """The region's `forward` on its inputs brought in."""
        args, kwargs = self.prepare(args, kwargs)
        return forward(*args, **kwargs)
