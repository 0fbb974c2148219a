"""The training loop: config → runtime → spec → parallelize → data → steps → metrics.

The hooks where parallelism enters (`runtime.*`) sit at fixed points, so the loop is the same for one
process and for any mesh.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megagen.config import Config, ConfigError, save_config
from megagen.data import SyntheticDataset
from megagen.metrics import MetricsLogger
from megagen.specs import get_spec
from megagen.train.objective import draw_for_samples, flow_matching_micro_step
from megagen.train.optim import build_optimizer

log = logging.getLogger("megagen")


@dataclass
class TrainResult:
    """What a finished run returns (tests compare these across meshes)."""

    losses: list[float]
    grad_norms: list[float]
    model: torch.nn.Module
    runtime: object
    optimizer: torch.optim.Optimizer | None = None
    last_grads: dict[str, torch.Tensor] | None = None
    """Full (gathered) gradients of the last step after clipping, when `train(capture_grads=True)`."""
    comm: list[dict] | None = None
    """Per-step {axis: {kind: {bytes, calls}}} when `metrics.comm=true`."""


def full_tensors(named: list[tuple[str, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """Gather sharded tensors to full CPU copies (a collective for DTensors: call on every rank)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in named:
        if t is None:
            continue
        t = t.full_tensor() if isinstance(t, DTensor) else t
        out[name] = t.detach().to("cpu", copy=True)
    return out


def grad_accumulation_steps(cfg: Config, dp_size: int) -> int:
    """global ÷ (micro × data-parallel size), or a ConfigError naming the batch keys."""
    per_step = cfg.train.micro_batch_size * dp_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size",
            f"{cfg.train.global_batch_size} is not divisible by train.micro_batch_size × data-parallel size "
            f"= {cfg.train.micro_batch_size} × {dp_size}",
        )
    return cfg.train.global_batch_size // per_step


def _active_modes() -> list:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return list(_get_current_dispatch_mode_stack())


def max_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_runtime(cfg: Config):
    """The single-process runtime, or the distributed one when launched by torchrun."""
    import os

    import torch.distributed as dist

    from megagen.parallel.runtime import DistributedRuntime, LocalRuntime

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return DistributedRuntime(cfg)
    p = cfg.parallel
    if max(p.dp_replicate, p.cp, p.tp, p.dp_shard) > 1:
        raise ConfigError("parallel", "a mesh larger than 1 needs several processes: launch with torchrun")
    return LocalRuntime()


def build_model(cfg: Config, spec, runtime):
    """Build and initialise the full model from the seed, then let the runtime shard it."""
    torch.manual_seed(cfg.run.seed)
    model = spec.build(cfg)
    spec.init_weights(model, cfg)
    return runtime.parallelize(model.to(runtime.device), spec.parallel_plan(cfg), cfg)


def train(cfg: Config, runtime=None, capture_grads: bool = False) -> TrainResult:
    """Run `train.steps` optimizer steps; rank 0 writes metrics and the resolved config."""
    spec = get_spec(cfg.model.spec)
    spec.validate(cfg)
    runtime = runtime or make_runtime(cfg)
    accum = grad_accumulation_steps(cfg, runtime.dp_size)
    model = build_model(cfg, spec, runtime)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, cfg)
    dataset = SyntheticDataset(spec.sample_shapes(cfg), cfg.run.seed, cfg.data.synthetic_classes)
    latent_shape = spec.sample_shapes(cfg)["latents"]

    run_dir = Path(cfg.run.dir) if runtime.is_logging_rank else None
    if run_dir is not None:
        save_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(
        run_dir,
        cfg.train.steps,
        cfg.metrics.jsonl,
        cfg.metrics.tensorboard,
        cfg.metrics.progress,
        cfg.train.log_every,
    )
    losses, norms, last_grads = [], [], None
    counter = runtime.comm_counter() if cfg.metrics.comm else None
    comm = [] if counter is not None else None
    try:
        for step in range(cfg.train.steps):
            if counter is not None:
                counter.reset()
                counter.__enter__()
            t_start = time.perf_counter()
            step_loss = torch.zeros((), device=runtime.device)
            tokens_per_sample = 0
            for micro in range(accum):
                runtime.set_grad_sync(model, micro == accum - 1)
                indices = runtime.sample_indices(micro, cfg.train.micro_batch_size)
                batch = {k: v.to(runtime.device) for k, v in dataset.batch(step, indices).items()}
                draws = draw_for_samples(cfg, spec, step, indices, latent_shape)
                loss_sum, _, tokens_per_sample = flow_matching_micro_step(
                    cfg, spec, model, batch, draws, runtime.shard_targets
                )
                loss = (
                    loss_sum
                    * getattr(runtime, "loss_scale", 1.0)
                    / (cfg.train.global_batch_size * tokens_per_sample)
                )
                loss.backward()
                step_loss += loss.detach()
            runtime.finish_grads(model)
            grad_norm = runtime.clip_grads(params, cfg.optim.grad_clip)
            if capture_grads and step == cfg.train.steps - 1:
                last_grads = full_tensors([(n, p.grad) for n, p in model.named_parameters()])
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_loss = runtime.global_loss(step_loss)
            dt = time.perf_counter() - t_start
            extra = {}
            if counter is not None:
                counter.__exit__(None, None, None)
                extra = {"comm_bytes": counter.bytes_by_axis()}
                comm.append(counter.summary())
            losses.append(global_loss)
            norms.append(grad_norm)
            logger.log(
                step + 1,
                {
                    "loss": global_loss,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "samples_per_s": cfg.train.global_batch_size / dt,
                    "tokens_per_s": cfg.train.global_batch_size * tokens_per_sample / dt,
                    "step_time_s": dt,
                    "max_mem_gb": max_memory_gb(runtime.device),
                    **extra,
                },
            )
    finally:
        logger.close()
        if counter is not None and counter in _active_modes():
            counter.__exit__(None, None, None)
    return TrainResult(losses, norms, model, runtime, optimizer, last_grads, comm)
