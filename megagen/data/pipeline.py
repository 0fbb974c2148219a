"""From config to a stream of (request, batch) for this rank: sampler, request plan and loader."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from megagen.config import Config
from megagen.data.contract import MicroBatchRequest
from megagen.data.loader_synthetic import SyntheticLoader
from megagen.data.loaders import Loader, make_loader
from megagen.data.sampler import BucketPlan, BucketSampler, RequestPlan, SyntheticSampler
from megagen.data.synthetic import SyntheticDataset

log = logging.getLogger("megagen")


@dataclass
class DataPipeline:
    """Everything the loop needs from the data side."""

    sampler: object
    plan: RequestPlan
    loader: Loader
    reader: object = None
    lazy_finite: bool = False
    """`data.check_finite=on_nan_loss` with `on_error=fail`: reads do not scan latents for NaN/inf; the
    trainer calls `on_nonfinite_loss` when a step's loss is not finite."""

    def state_after(self, steps_done: int) -> dict:
        return self.plan.state_after(steps_done)

    def on_nonfinite_loss(self, step: int, requests: list[MicroBatchRequest]) -> str:
        """The loss of `step` (1-based) is NaN/inf: with lazy finite checking, scan the step's samples on this
        rank and raise DataError naming the first non-finite one (file, bucket, sample: the eager check's
        message); else return a note that they are finite (for the trainer's `train.nonfinite` message).
        Returns "" without lazy checking (eager reads already dropped or refused such samples; synthetic)."""
        if not self.lazy_finite:
            return ""
        from megagen.data.format import DataError

        for req in requests:
            err = self.reader.nonfinite_error(req.bucket, req.sample_ids)
            if err is not None:
                raise DataError(
                    f"{err.reason} (found after the loss of step {step} went non-finite; "
                    "data.check_finite=on_nan_loss)",
                    file=err.file,
                    sample=err.sample,
                    bucket=err.bucket,
                )
        buckets = sorted({r.bucket for r in requests})
        return (
            f"the loss went non-finite at step {step} with finite data: every latent of this rank's samples "
            f"of the step (buckets {', '.join(buckets)}) is finite"
        )


def bucket_plans(
    cfg: Config, bucket_sizes: dict[str, int], dp_size: int = 1, fit_for=None
) -> list[BucketPlan]:
    """Each bucket's global/micro batch: `data.bucket_batch` overrides, else the train.* sizes; a micro
    size of `auto` resolved per bucket (megagen/data/micro_batch.py). `fit_for(bucket)` gives the memory
    check of that bucket's samples (None: no memory bound)."""
    from megagen.config import ConfigError
    from megagen.data.micro_batch import resolve_micro_batch

    unknown = set(cfg.data.bucket_batch) - set(bucket_sizes)
    if unknown:
        have = sorted(bucket_sizes)
        raise ConfigError("data.bucket_batch", f"unknown buckets {sorted(unknown)}; the dataset has {have}")
    plans = []
    for name, size in bucket_sizes.items():
        sizes = cfg.data.bucket_batch.get(name, {})
        g = sizes.get("global", cfg.train.global_batch_size)
        m = sizes.get("micro", cfg.train.micro_batch_size)
        fits = fit_for(name) if fit_for is not None else None
        m = resolve_micro_batch(m, g, dp_size, fits, name, per_bucket="micro" in sizes or "global" in sizes)
        plans.append(BucketPlan(name, size, g, m))
    return plans


def make_sampler(cfg: Config, spec, world_size: int, dp_size: int, device, reader=None):
    """The job's sampler: the synthetic one, or the bucket sampler over `reader`'s dataset (checked against
    the spec), with every bucket's micro-batch size resolved for `dp_size` data-parallel ranks."""
    from megagen.planning import activation_fit

    if reader is None:
        fits = activation_fit(cfg, spec.latent_shape(cfg), world_size, device)
        (plan,) = bucket_plans(cfg, {SyntheticSampler.BUCKET: 2**62}, dp_size, lambda _: fits)
        return SyntheticSampler(plan.global_batch, plan.micro_batch)
    from megagen.data.spec_fields import check_dataset_fields

    check_dataset_fields(reader.manifest, spec, cfg, cfg.data.path)
    sizes = {name: info.samples for name, info in reader.buckets.items()}

    def fit_for(name: str):
        return activation_fit(cfg, tuple(reader.buckets[name].latent_shape), world_size, device)

    plans = bucket_plans(cfg, sizes, dp_size, fit_for)
    return BucketSampler(plans, cfg.run.seed, cfg.data.bucket_weights or None)


def build_data(
    cfg: Config, spec, runtime, steps: int, sampler_state: dict | None = None, reader=None
) -> DataPipeline:
    """Sampler (restored from `sampler_state` when resuming), this rank's request plan, and its loader.
    Nothing here visits the steps (the plan is O(1) in them), and no rank reads more than its share of the
    shards' headers (`data.verify`, megagen/data/verify.py); the rest are read when first used."""
    if not cfg.data.path:
        sampler = make_sampler(cfg, spec, runtime.world_size, runtime.dp_size, runtime.device)
        if sampler_state:
            sampler.load_state_dict(sampler_state)
        plan = RequestPlan(sampler, steps, runtime.dp_rank, runtime.dp_size)
        dataset = SyntheticDataset(spec.sample_shapes(cfg), cfg.run.seed, cfg.data.synthetic_classes)
        return DataPipeline(sampler, plan, SyntheticLoader(dataset, plan, runtime.device))
    from megagen.data.shard_reader import ShardReader

    eager = (
        cfg.data.on_error == "skip" or cfg.data.check_finite == "eager"
    )  # skip drops samples before a step
    if reader is None:  # headers are read lazily; each rank checks its share of the shards now
        from megagen.data.verify import verify_on_ranks

        reader = ShardReader(cfg.data.path, on_error=cfg.data.on_error, verify="none", check_finite=eager)
        verify_on_ranks(reader, cfg.data.verify, runtime.rank, runtime.world_size)
    sampler = make_sampler(cfg, spec, runtime.world_size, runtime.dp_size, runtime.device, reader)
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
        dali_source=cfg.data.dali_source,
    )
    lazy = not reader.check_finite and reader.on_error == "fail"
    return DataPipeline(sampler, plan, loader, reader, lazy_finite=lazy)
