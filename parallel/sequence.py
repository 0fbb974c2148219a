"""Padding and sharding the root's sequence inputs, and cutting targets the same way.

Sequences are padded to a multiple of the shard count (cp, times tp under sequence parallelism) and each
rank keeps one contiguous chunk: chunk index = cp_rank·tp + tp_rank with SP, cp_rank without. When it
pads, the root's `token_mask` keyword receives the mask of real tokens over the padded sequence, which the
model passes to its self-attention (no state is kept between forwards).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SequenceSharder:
    """How one rank cuts the root's sequence inputs: `shards` chunks, this rank's is number `index`."""

    def __init__(self, shards: int, index: int):
        self.shards, self.index = shards, index

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
        return x.narrow(dim, self.index * size, size)

    def valid_mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        """(chunk,) bool of this rank's real (unpadded) positions; None when nothing is padded."""
        if self.padded(n) == n:
            return None
        size = self.padded(n) // self.shards
        pos = torch.arange(self.index * size, (self.index + 1) * size, device=device)
        return pos < n

    def token_mask(self, n: int, device: torch.device, given: torch.Tensor | None) -> torch.Tensor | None:
        """(padded n,) bool, True at real tokens: `given` (the caller's mask over n, if any) padded with
        False; None when nothing is padded and no mask was given."""
        pad = self.padded(n) - n
        if not pad:
            return given
        real = given if given is not None else torch.ones(n, dtype=torch.bool, device=device)
        return F.pad(real, [0, pad], value=False)

    def install(self, model: nn.Module, sequence_inputs: dict[str, int], token_mask: str = "") -> None:
        """Pre-hook on the root: pad + shard the declared keyword inputs, pass the mask of real tokens."""

        def hook(module, args, kwargs):
            lengths = set()
            for name, dim in sequence_inputs.items():
                if name not in kwargs:
                    raise TypeError(f"sequence input {name!r} must be passed by keyword to the model")
                lengths.add(kwargs[name].shape[dim])
            if len(lengths) != 1:
                raise ValueError(f"sequence inputs disagree on length: {sorted(lengths)}")
            (n,) = lengths
            first = kwargs[next(iter(sequence_inputs))]
            if self.padded(n) != n and not token_mask:
                raise ValueError(
                    f"a sequence of {n} tokens is padded to {self.padded(n)} ({self.shards} shards), but the "
                    "parallel plan names no token_mask input to mask the padding out of attention"
                )
            if token_mask:
                kwargs[token_mask] = self.token_mask(n, first.device, kwargs.get(token_mask))
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
