"""Padding and sharding the root's sequence inputs, and cutting targets the same way.

Sequences are padded to a multiple of the shard count (cp, times tp under sequence parallelism) and each
rank keeps one contiguous chunk: chunk index = cp_rank·tp + tp_rank with SP, cp_rank without.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megagen.parallel.context_parallel import SequenceLayout


class SequenceSharder:
    """Owns the layout of the current global sequence for one model."""

    def __init__(self, shards: int, index: int, layout: SequenceLayout):
        self.shards, self.index, self.layout = shards, index, layout

    def padded(self, n: int) -> int:
        return -(-n // self.shards) * self.shards

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Pad `dim` with zeros to a multiple of the shard count and keep this rank's chunk."""
        n = x.shape[dim]
        pad = self.padded(n) - n
        if pad:
            widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
            x = F.pad(x, widths)
        size = x.shape[dim] // self.shards
        # a copy, not a view: a saved slice of a view would keep the whole (padded) sequence alive
        return x.narrow(dim, self.index * size, size).clone()

    def valid_mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        """(chunk,) bool of this rank's real (unpadded) positions; None when nothing is padded."""
        if self.padded(n) == n:
            return None
        size = self.padded(n) // self.shards
        pos = torch.arange(self.index * size, (self.index + 1) * size, device=device)
        return pos < n

    def install(self, model: nn.Module, sequence_inputs: dict[str, int]) -> None:
        """Pre-hook on the root: pad + shard the declared keyword inputs, record the layout."""

        def hook(module, args, kwargs):
            lengths = set()
            for name, dim in sequence_inputs.items():
                if name not in kwargs:
                    raise TypeError(f"sequence input {name!r} must be passed by keyword to the model")
                lengths.add(kwargs[name].shape[dim])
            if len(lengths) != 1:
                raise ValueError(f"sequence inputs disagree on length: {sorted(lengths)}")
            (n,) = lengths
            self.layout.valid_len, self.layout.padded_len = n, self.padded(n)
            for name, dim in sequence_inputs.items():
                kwargs[name] = self.shard(kwargs[name], dim)
            return args, kwargs

        model.register_forward_pre_hook(hook, with_kwargs=True)

    def shard_targets(self, target: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's chunk of a per-token target and the (B, chunk) mask of its real tokens."""
        n = target.shape[dim]
        mask = self.valid_mask(n, target.device)
        local = self.shard(target, dim)
        if mask is not None:
            mask = mask.unsqueeze(0).expand(target.shape[0], -1)
        return local, mask
