"""Padding and sharding the root's sequence inputs, and cutting targets the same way.

Sequences are padded to a multiple of the shard count (cp, times tp under sequence parallelism) and each
rank keeps one contiguous chunk: chunk index = cp_rank·tp + tp_rank with SP, cp_rank without. The root
becomes a `SequenceSharded<Model>` (`class_swap.py`) whose forward cuts its declared keyword inputs first;
when it pads, the root's `token_mask` keyword receives the mask of real tokens over the padded sequence,
which the model passes to its self-attention (no state is kept between forwards).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megagen.parallel.class_swap import swap_in


class SequenceSharder:
    """How one rank cuts the root's sequence inputs: `shards` chunks, this rank's is number `index`.
    `sequence_inputs`: root keyword → sequence dim; `token_mask`: the root keyword for the mask of real
    tokens (ParallelPlan.token_mask)."""

    def __init__(self, shards: int, index: int, sequence_inputs: dict[str, int] | None = None, token_mask=""):
        self.shards, self.index = shards, index
        self.sequence_inputs, self.token_mask_input = dict(sequence_inputs or {}), token_mask

    def __repr__(self) -> str:
        inputs = ", ".join(f"{n}: dim {d}" for n, d in self.sequence_inputs.items())
        return f"shard {self.index} of {self.shards} ({inputs}; mask → {self.token_mask_input or 'none'})"

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

    def token_mask(self, n: int, device: torch.device, given: torch.Tensor | None) -> torch.Tensor | None:
        """(padded n,) bool, True at real tokens: `given` (the caller's mask over n, if any) padded with
        False; None when nothing is padded and no mask was given."""
        pad = self.padded(n) - n
        if not pad:
            return given
        real = given if given is not None else torch.ones(n, dtype=torch.bool, device=device)
        return F.pad(real, [0, pad], value=False)

    def prepare(self, kwargs: dict) -> dict:
        """The root's keyword arguments with the sequence inputs padded and cut to this rank's chunk, and
        the mask of real tokens passed when anything is padded."""
        lengths = set()
        for name, dim in self.sequence_inputs.items():
            if name not in kwargs:
                raise TypeError(f"sequence input {name!r} must be passed by keyword to the model")
            lengths.add(kwargs[name].shape[dim])
        if len(lengths) != 1:
            raise ValueError(f"sequence inputs disagree on length: {sorted(lengths)}")
        (n,) = lengths
        kwargs = dict(kwargs)
        mask_name = self.token_mask_input
        if self.padded(n) != n and not mask_name:
            raise ValueError(
                f"a sequence of {n} tokens is padded to {self.padded(n)} ({self.shards} shards), but the "
                "parallel plan names no token_mask input to mask the padding out of attention"
            )
        if mask_name:
            device = kwargs[next(iter(self.sequence_inputs))].device
            kwargs[mask_name] = self.token_mask(n, device, kwargs.get(mask_name))
        for name, dim in self.sequence_inputs.items():
            kwargs[name] = self.shard(kwargs[name], dim)
        return kwargs

    def install(self, model: nn.Module) -> None:
        """Make `model` cut its sequence inputs with this sharder before every forward."""
        swap_in(model, SequenceSharded)
        model.sequence_sharder = self

    def shard_targets(self, target: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's chunk of a per-token target and the (B, chunk) mask of its real tokens."""
        n = target.shape[dim]
        mask = self.valid_mask(n, target.device)
        local = self.shard(target, dim)
        if mask is not None:
            mask = mask.unsqueeze(0).expand(target.shape[0], -1)
        return local, mask


class SequenceSharded:
    """Root wrapper (swapped in as a subclass): the model's forward on this rank's chunk of its sequence
    inputs (`SequenceSharder.prepare`); parameter names are unchanged."""

    prefix = "SequenceSharded"
    sequence_sharder: SequenceSharder

    def forward(self, *args, **kwargs):
        return super().forward(*args, **self.sequence_sharder.prepare(kwargs))

    def extra_repr(self) -> str:
        inner = super().extra_repr()
        return f"sequence={self.sequence_sharder!r}" + (f", {inner}" if inner else "")
