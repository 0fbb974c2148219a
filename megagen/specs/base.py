"""What a model spec is: the contract between a model family and the rest of megagen.

A spec builds its module, declares its parallel plan, adapts a data batch into model inputs and states
the per-token target; the trainer and the engine know nothing else about the model.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from megagen.config import Config, ConfigError
from megagen.parallel.plan import ParallelPlan


class ModelSpec(ABC):
    """A named, registered model family with size presets."""

    name: str = ""
    presets: dict[str, Any] = {}

    def arch(self, cfg: Config) -> Any:
        """The preset's architecture, or a ConfigError naming `model.preset` and the allowed values.

        `model.qk_norm` is folded into architectures that have a `qk_norm` field; a spec without one
        refuses it rather than ignoring it.
        """
        if cfg.model.preset not in self.presets:
            allowed = ", ".join(self.presets)
            raise ConfigError(
                "model.preset", f"{cfg.model.preset!r} is not a {self.name} preset; allowed: {allowed}"
            )
        arch = self.presets[cfg.model.preset]
        if dataclasses.is_dataclass(arch) and "qk_norm" in {f.name for f in dataclasses.fields(arch)}:
            return dataclasses.replace(arch, qk_norm=cfg.model.qk_norm)
        if cfg.model.qk_norm:
            raise ConfigError("model.qk_norm", f"spec {self.name!r} has no learned QK-norm")
        return arch

    @abstractmethod
    def build(self, cfg: Config) -> nn.Module:
        """Construct the module on the current default device (the trainer builds on the meta device)."""

    def init_weights(self, model: nn.Module, cfg: Config) -> None:
        model.init_weights(cfg.model.init_std)

    @abstractmethod
    def parallel_plan(self, cfg: Config) -> ParallelPlan:
        """How the engine may shard this model."""

    @abstractmethod
    def sample_shapes(self, cfg: Config) -> dict[str, tuple[int, ...]]:
        """Per-sample tensor shapes of a data sample (e.g. `latents`, `text.ul2`) for this config."""

    @abstractmethod
    def condition_names(self, cfg: Config) -> list[str]:
        """Conditions that `train.cond_dropout` may replace by their null embedding."""

    @abstractmethod
    def model_inputs(
        self,
        batch: dict[str, torch.Tensor],
        x_t: torch.Tensor,
        t: torch.Tensor,
        drop: dict[str, torch.Tensor] | None,
    ) -> dict[str, Any]:
        """Keyword arguments of the model's forward for noisy latents x_t at time t."""

    @abstractmethod
    def to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, ...) → per-token targets (B, S, P) in the model output's token order."""

    @abstractmethod
    def from_tokens(self, tokens: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Inverse of `to_tokens` for one latent shape (C, ...)."""

    def sample(
        self,
        model: nn.Module,
        cfg: Config,
        batch: dict[str, torch.Tensor],
        steps: int = 50,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate latents shaped like `batch["latents"]` from noise, conditioned on the batch.

        Default: Euler over Movie Gen's linear-quadratic schedule with classifier-free guidance (the
        unconditional branch drops every condition to its null embedding). Specs with long inputs override
        this with windowed sampling.
        """
        from megagen.diffusion import euler_sample

        noise, keep, drop, schedule = self.sampling_start(cfg, batch, steps, generator)
        shape = tuple(noise.shape)

        def velocity(x, t, cond):
            return self.from_tokens(model(**self.model_inputs(batch, x, t.to(x.dtype), cond)), shape[1:])

        return euler_sample(velocity, noise, schedule, keep, drop, cfg_scale)

    def sampling_start(
        self, cfg: Config, batch: dict[str, torch.Tensor], steps: int, generator: torch.Generator | None
    ):
        """What every sampler of this spec starts from: noise shaped like `batch["latents"]`, the
        keep-all / drop-all condition masks of classifier-free guidance, and Movie Gen's
        linear-quadratic schedule of `steps` steps."""
        from megagen.diffusion import linear_quadratic_schedule

        shape = tuple(batch["latents"].shape)
        noise = torch.randn(shape, generator=generator).to(batch["latents"].device)
        b = shape[0]
        names = self.condition_names(cfg)
        keep = {n: torch.zeros(b, dtype=torch.bool, device=noise.device) for n in names}
        drop = {n: torch.ones(b, dtype=torch.bool, device=noise.device) for n in names}
        return noise, keep, drop, linear_quadratic_schedule(steps, emulated_steps=max(250, steps))

    def training_loss(
        self,
        cfg: Config,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        req,
        runtime,
        sample_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """One micro-batch's (loss sum on this rank, loss units per sample); the trainer divides the sum by
        global batch x units, so the loss is a mean over the global batch's units.

        Default: flow matching (megagen/train/objective.py), units = tokens, noise keyed by `req.step` and
        `req.positions`. A spec with another objective (the TAE's reconstruction loss) overrides this.
        """
        from megagen.train.objective import draw_for_samples, flow_matching_micro_step

        latent_shape = tuple(batch["latents"].shape[1:])
        draws = draw_for_samples(cfg, self, req.step, list(req.positions), latent_shape)
        loss_sum, _, tokens_per_sample = flow_matching_micro_step(
            cfg, self, model, batch, draws, runtime.shard_targets, sample_valid
        )
        return loss_sum, tokens_per_sample

    def validate(self, cfg: Config) -> None:
        """Cross-checks between this spec and the config (e.g. heads divisible by tp)."""
        return None

    def flops_per_sample(
        self, cfg: Config, latent_shape: tuple[int, ...] | None = None, text_tokens: int | None = None
    ):
        """A `megagen.metrics.flops.FlopCount` for one sample of this latent shape (default: the config's)."""
        raise NotImplementedError(f"spec {self.name!r}: FLOP counting is not implemented")


def init_model(spec: ModelSpec, model: nn.Module, cfg: Config) -> None:
    """The spec's initialisation, then, with `model.init=live` (a test option), N(0, init_std) noise on every
    parameter: zero output layers, gates, null embeddings and unit norm weights then carry gradient from
    step 1, so parity tests see every path. The trainer runs this on the meta device inside the init record
    (`megagen/train/build.py`), where every random draw comes from a generator seeded by (`run.seed`,
    parameter name), so the initial weights do not depend on the mesh."""
    spec.init_weights(model, cfg)
    if cfg.model.init == "live":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=cfg.model.init_std)
