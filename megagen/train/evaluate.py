"""Held-out loss per bucket on a fixed grid of timesteps with fixed noise.

Every number depends only on (eval.seed, the eval samples, the weights), not on the mesh or on training
randomness, so runs and meshes can be compared — Movie Gen steers its learning-rate drops by it.
Every rank evaluates the same samples (their sequence shards differ under cp/tp), which keeps collective
order identical on all ranks; sums are reduced over the sequence shards only.
"""

from __future__ import annotations

import torch

from megagen.config import Config
from megagen.data.sampler import _bucket_key
from megagen.data.synthetic import sample_seed
from megagen.diffusion import flow_matching_loss_sum, interpolate, velocity_target


class Evaluator:
    """Evaluates `eval.samples` samples of each bucket of `eval.path` at every t in `eval.t_values`."""

    def __init__(self, cfg: Config, spec, runtime, reader=None):
        from megagen.data.shard_reader import ShardReader

        self.cfg, self.spec, self.runtime = cfg, spec, runtime
        self.reader = reader or ShardReader(cfg.eval.path, on_error="fail", verify=cfg.data.verify)
        self.t_values = [float(v) for v in cfg.eval.t_values.split(",")]
        self.ids = {
            name: list(range(min(cfg.eval.samples, info.samples)))
            for name, info in self.reader.buckets.items()
        }

    def _noise(self, bucket: str, sample_id: int, t_index: int, shape: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(
            sample_seed(self.cfg.eval.seed, sample_id, _bucket_key(bucket), t_index)
        )
        return torch.randn(shape, generator=gen)

    @torch.no_grad()
    def bucket_loss(self, model, bucket: str) -> float:
        device, mb = self.runtime.device, self.cfg.eval.micro_batch_size
        ids = self.ids[bucket]
        total = torch.zeros((), dtype=torch.float64, device=device)
        tokens = 0
        for start in range(0, len(ids), mb):
            chunk = ids[start : start + mb]
            batch = self.reader.to_model_batch(self.reader.read_batch(bucket, chunk))
            batch = {k: v.to(device) for k, v in batch.items()}
            batch.pop("sample_valid", None)
            x1 = batch["latents"]
            for ti, t_value in enumerate(self.t_values):
                x0 = torch.stack([self._noise(bucket, i, ti, tuple(x1.shape[1:])) for i in chunk]).to(
                    device, x1.dtype
                )
                t = torch.full((len(chunk),), t_value, device=device)
                target = self.spec.to_tokens(velocity_target(x0, x1))
                pred = model(**self.spec.model_inputs(batch, interpolate(x0, x1, t), t, None))
                target_local, valid = self.runtime.shard_targets(target)
                loss_sum, _ = flow_matching_loss_sum(pred.float(), target_local.float(), valid)
                total += loss_sum.double()
                tokens += target.shape[0] * target.shape[1]
        return self.runtime.sum_over_sequence_shards(total) / tokens

    def evaluate(self, model) -> dict[str, float]:
        """{"eval_loss": mean over buckets, "eval_loss/<bucket>": ...}."""
        out = {f"eval_loss/{b}": self.bucket_loss(model, b) for b in self.ids}
        out["eval_loss"] = sum(out.values()) / len(out)
        return out
