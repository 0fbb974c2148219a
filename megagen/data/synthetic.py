"""Seeded synthetic samples that a model can actually learn.

Each sample is one of `classes` fixed (caption, video) pairs: the text embeddings identify the class and
the latents are that class's smooth pattern, so the flow-matching target is predictable from the
condition and the loss falls well below its starting value — unlike pure noise. Sample i of step s
depends only on (seed, s, i), so every parallel layout sees the same global batch.
"""

from __future__ import annotations

import torch


def sample_seed(seed: int, step: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed mixing (seed, step, index, stream): independent of world size and rank."""
    h = 0x9E3779B97F4A7C15
    for v in (seed, step, index, stream):
        h = (h ^ (v + 0x632BE59BD9B4E019 + ((h << 6) & (2**64 - 1)) + (h >> 2))) & (2**64 - 1)
        h = (h * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    return h >> 1


def _smooth_pattern(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A unit-variance field that varies smoothly along its trailing dims (a few random sinusoids)."""
    channels, *spatial = shape
    coords = torch.meshgrid(*[torch.linspace(0, 1, n) for n in spatial], indexing="ij")
    out = torch.zeros(shape)
    for c in range(channels):
        for _ in range(2):
            freq = torch.randint(0, 3, (len(spatial),), generator=gen).float()
            phase = torch.rand((), generator=gen) * 6.283
            arg = sum(f * x for f, x in zip(freq, coords)) * 6.283 + phase
            out[c] += torch.cos(arg)
    return (out - out.mean()) / out.std().clamp(min=1e-6)


class SyntheticDataset:
    """`shapes` maps a field name (`latents`, `text.<encoder>`) to its per-sample shape."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int, classes: int = 8):
        self.shapes, self.seed, self.classes = dict(shapes), seed, classes
        gen = torch.Generator().manual_seed(sample_seed(seed, -1, -1))
        self.prototypes: dict[str, torch.Tensor] = {}
        for name, shape in self.shapes.items():
            if name == "latents":
                protos = [_smooth_pattern(shape, gen) for _ in range(classes)]
            else:
                protos = [torch.randn(shape, generator=gen) for _ in range(classes)]
            self.prototypes[name] = torch.stack(protos)

    def class_of(self, step: int, index: int) -> int:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, step, index, stream=1))
        return int(torch.randint(0, self.classes, (1,), generator=gen))

    def sample(self, step: int, index: int) -> dict[str, torch.Tensor]:
        c = self.class_of(step, index)
        return {name: protos[c] for name, protos in self.prototypes.items()}

    def batch(self, step: int, indices: list[int] | range) -> dict[str, torch.Tensor]:
        """Stack samples `indices` of global step `step`."""
        samples = [self.sample(step, i) for i in indices]
        return {name: torch.stack([s[name] for s in samples]) for name in self.shapes}
