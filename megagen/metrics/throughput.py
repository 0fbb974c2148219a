"""Per-step TFLOP/s, MFU and HFU from the spec's FLOP count and the device peak."""

from __future__ import annotations

import functools

import torch

from megagen.metrics.peak import Peak, device_peak


@functools.lru_cache(maxsize=8)
def _cached_peak(device: str, dtype: str, shape: tuple[int, int, int]) -> Peak:
    return device_peak(torch.device(device), dtype, shape)


class FlopMeter:
    """Turns (batch shape, step time) into tflops / mfu / hfu per device."""

    def __init__(self, cfg, spec, runtime):
        self.cfg, self.spec, self.runtime = cfg, spec, runtime
        self._counts: dict[tuple, object] = {}
        self._peak: Peak | None = None

    def peak(self, tokens: int, width: int, hidden: int) -> Peak:
        if self._peak is None:
            dtype = "bf16" if self.cfg.parallel.param_dtype == "bf16" else "fp32"
            shape = (max(256, min(tokens, 4096)), max(256, width), max(256, hidden))
            self._peak = _cached_peak(str(self.runtime.device), dtype, shape)
        return self._peak

    def count(self, batch: dict[str, torch.Tensor]):
        latent_shape = tuple(batch["latents"].shape[1:])
        text = [v.shape[1] for k, v in batch.items() if k.startswith("text.")]
        key = (latent_shape, text[0] if text else None)
        if key not in self._counts:
            self._counts[key] = self.spec.flops_per_sample(self.cfg, latent_shape, key[1])
        return self._counts[key]

    def step_metrics(
        self, batch, global_batch: int, tokens_per_sample: int, seconds: float
    ) -> dict[str, float]:
        count = self.count(batch)
        arch = self.spec.arch(self.cfg)
        peak = self.peak(tokens_per_sample * len(batch["latents"]), arch.dim, getattr(arch, "ffn", arch.dim))
        devices = self.runtime.world_size
        per_device = count.model * global_batch / seconds / devices
        return {
            "peak_tflops": peak.flops / 1e12,
            "tflops": per_device / 1e12,
            "mfu": per_device / peak.flops,
            "hfu": count.hardware * global_batch / seconds / devices / peak.flops,
        }
