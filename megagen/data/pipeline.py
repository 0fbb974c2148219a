"""From config to a stream of (request, batch) for this rank: sampler, request plan and loader."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megagen.config import Config
from megagen.data.contract import MicroBatchRequest
from megagen.data.sampler import BucketPlan, BucketSampler, RequestPlan, SyntheticSampler
from megagen.data.synthetic import SyntheticDataset

log = logging.getLogger("megagen")


class SyntheticLoader:
    """Batches of the seeded synthetic dataset: sample at position i of step s depends on (seed, s, i)."""

    def __init__(self, dataset: SyntheticDataset, requests: RequestPlan, device: torch.device):
        self.dataset, self.requests, self.device = dataset, requests, device

    def __iter__(self) -> Iterator[tuple[MicroBatchRequest, dict[str, torch.Tensor]]]:
        for req in self.requests:
            batch = self.dataset.batch(req.step, list(req.positions))
            yield req, {k: v.to(self.device) for k, v in batch.items()}


@dataclass
class DataPipeline:
    """Everything the loop needs from the data side."""

    sampler: object
    plan: RequestPlan
    loader: object

    def state_after(self, steps_done: int) -> dict:
        return self.plan.state_after(steps_done)


def bucket_plans(cfg: Config, bucket_sizes: dict[str, int]) -> list[BucketPlan]:
    """Each bucket's global/micro batch: `data.bucket_batch` overrides, else the train.* sizes."""
    from megagen.config import ConfigError

    unknown = set(cfg.data.bucket_batch) - set(bucket_sizes)
    if unknown:
        have = sorted(bucket_sizes)
        raise ConfigError("data.bucket_batch", f"unknown buckets {sorted(unknown)}; the dataset has {have}")
    plans = []
    for name, size in bucket_sizes.items():
        sizes = cfg.data.bucket_batch.get(name, {})
        g = sizes.get("global", cfg.train.global_batch_size)
        m = sizes.get("micro", cfg.train.micro_batch_size)
        plans.append(BucketPlan(name, size, g, m))
    return plans


def build_data(
    cfg: Config, spec, runtime, steps: int, sampler_state: dict | None = None, reader=None
) -> DataPipeline:
    """Sampler (restored from `sampler_state` when resuming), this rank's request plan, and its loader."""
    if not cfg.data.path:
        sampler = SyntheticSampler(cfg.train.global_batch_size, cfg.train.micro_batch_size)
        if sampler_state:
            sampler.load_state_dict(sampler_state)
        plan = RequestPlan(sampler, steps, runtime.dp_rank, runtime.dp_size)
        dataset = SyntheticDataset(spec.sample_shapes(cfg), cfg.run.seed, cfg.data.synthetic_classes)
        return DataPipeline(sampler, plan, SyntheticLoader(dataset, plan, runtime.device))
    from megagen.data.loaders import make_loader
    from megagen.data.shards import ShardReader

    reader = reader or ShardReader(cfg.data.path, on_error=cfg.data.on_error, verify=cfg.data.verify)
    sizes = {name: info.samples for name, info in reader.buckets.items()}
    sampler = BucketSampler(bucket_plans(cfg, sizes), cfg.run.seed, cfg.data.bucket_weights or None)
    if sampler_state:
        sampler.load_state_dict(sampler_state)
    plan = RequestPlan(sampler, steps, runtime.dp_rank, runtime.dp_size)
    loader = make_loader(
        cfg.data.loader,
        reader,
        plan,
        num_workers=cfg.data.num_workers,
        prefetch=cfg.data.prefetch,
        threads=cfg.data.threads,
        device=runtime.device,
    )
    return DataPipeline(sampler, plan, loader)
