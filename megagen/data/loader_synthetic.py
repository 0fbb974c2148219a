"""The loader of the seeded synthetic dataset (runs without `data.path`): a `Loader` like the shard ones."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megagen.data.contract import MicroBatchRequest
from megagen.data.sampler import RequestPlan
from megagen.data.synthetic import SyntheticDataset


class SyntheticLoader:
    """Batches of the seeded synthetic dataset: sample at position i of step s depends on (seed, s, i)."""

    def __init__(self, dataset: SyntheticDataset, requests: RequestPlan, device: torch.device):
        self.dataset, self.requests, self.device = dataset, requests, device

    def __iter__(self) -> Iterator[tuple[MicroBatchRequest, dict[str, torch.Tensor]]]:
        for req in self.requests:
            batch = self.dataset.batch(req.step, list(req.positions))
            yield req, {k: v.to(self.device) for k, v in batch.items()}
