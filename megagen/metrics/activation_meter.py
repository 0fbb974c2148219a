"""Measure the activations autograd keeps for backward, on any device (the CPU has no allocator statistics).

Why: the planner predicts saved activation bytes per rank; `megagen rehearse` checks that prediction at
scale on a CPU, where `torch.cuda.max_memory_allocated` does not exist. Every tensor autograd saves passes
through `saved_tensors_hooks`; the meter counts each saved storage once while any saved reference to it is
alive (autograd frees them during backward), and keeps the peak. Storages of parameters (FSDP's unsharded
ones and TP's local shards included) are not activations and are not counted.

Limit: `torch.utils.checkpoint` installs its own hooks inside a recomputed region, so under
`train.recompute=full|selective` only the tensors saved outside those regions are seen; `measures()` says
whether the number can be compared with a prediction.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _storage_address(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the storage behind `t` (a DTensor's local shard for a DTensor)."""
    storage = getattr(t, "_local_tensor", t).untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class _Held:
    """What autograd stores instead of the tensor: releases the meter's count when autograd drops it."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: ActivationMeter, key: int | None):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        if self.key is not None:
            self.meter._release(self.key)


class ActivationMeter:
    """`with meter.watching(model): ...` counts saved activations; `meter.peak_bytes` is the most held."""

    def __init__(self):
        self.peak_bytes = 0
        self.live_bytes = 0
        self._refs: dict[int, list[int]] = {}  # storage address -> [references, bytes]
        self._owners: list[dict] = []  # the `_parameters` of every module that registers some
        self._seen: tuple[int, ...] | None = None
        self._storages: set[int] = set()

    def _parameter_storages(self) -> set[int]:
        """Addresses of the storages the model's parameters use right now. FSDP swaps in unsharded
        parameters (new storages) unit by unit, so the set is rebuilt whenever a parameter's data pointer
        moved; reading the pointers is cheaper than walking the module tree on every saved tensor (a 1B
        rehearsal's first step: 13.2 -> 11.5 s)."""
        tensors = [getattr(p, "_local_tensor", p) for d in self._owners for p in d.values() if p is not None]
        seen = tuple(t.data_ptr() for t in tensors)
        if seen != self._seen:
            self._seen = seen
            self._storages = {_storage_address(t)[0] for t in tensors}
        return self._storages

    def _pack(self, t: torch.Tensor) -> _Held:
        key, nbytes = _storage_address(t)
        if nbytes == 0 or key in self._parameter_storages():
            return _Held(t, self, None)
        ref = self._refs.get(key)
        if ref is None:
            self._refs[key] = [1, nbytes]
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        else:
            ref[0] += 1
        return _Held(t, self, key)

    def _release(self, key: int) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self.live_bytes -= ref[1]
            del self._refs[key]

    @contextlib.contextmanager
    def watching(self, model: nn.Module):
        self._owners = [m._parameters for m in model.modules() if m._parameters]
        self._seen = None
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor):
            yield self


def measures(recompute: str) -> bool:
    """Whether the meter sees every saved activation under this `train.recompute` policy."""
    return recompute == "none"
