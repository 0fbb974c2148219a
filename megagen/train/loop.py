"""The training loop: a `Trainer` owns one run and `run()` does its steps; `train()` adds checkpoints.

The hooks where parallelism enters (`runtime.*`) sit at fixed points of `train_step`, so the step is the
same for one process and for any mesh. Everything around a step (metrics, evaluation, the watchdog,
checkpoints, ...) is a side job (side_jobs.py), so the loop itself stays a few lines.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from megagen.config import Config, save_config
from megagen.parallel.grad_reduction import normalised_loss
from megagen.specs import get_spec
from megagen.train.build import build_model
from megagen.train.cuda_graphs import check_cuda_graphs, enable_cuda_graphs
from megagen.train.gather import full_tensors
from megagen.train.interrupt import TrainingInterrupted, was_interrupted
from megagen.train.nonfinite import NonFiniteGuard
from megagen.train.optim import build_optimizer
from megagen.train.runtime_choice import launched_distributed, make_runtime
from megagen.train.side_jobs import StepReport, collective_counts, side_jobs

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


@dataclass
class _Accumulated:
    """A step's micro-batches after their backward passes: the gradients sit in the parameters."""

    loss: torch.Tensor
    requests: list
    batch: dict
    global_batch: int
    tokens_per_sample: int
    data_wait_s: float


class Trainer:
    """Owns one run's model, optimizer, schedule, data stream and loggers; `run()` does the steps.

    Checkpointing saves and restores exactly `state_for_checkpoint()`: model, optimizer, schedule, the next
    step and the sampler state (which is independent of the mesh).
    """

    def __init__(self, cfg: Config, runtime=None, weights: str = "replay"):
        """`weights="draw"`: a rehearsal's shortcut for large tensors (megagen/train/build.py)."""
        self.cfg = cfg
        self.spec = get_spec(cfg.model.spec)
        self.spec.validate(cfg)
        self.runtime = runtime or make_runtime(cfg)
        check_cuda_graphs(cfg, self.runtime)  # train.cuda_graphs: refuse unsupported configs before building
        self.startup_s: dict[str, float] = {}
        """Seconds spent building the model on meta (`build`) and initialising its shards (`init`)."""
        self.model = build_model(cfg, self.spec, self.runtime, weights, self.startup_s)
        self.cuda_graphs = enable_cuda_graphs(cfg, self.model, self.spec.parallel_plan(cfg), self.runtime)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg)
        self.step = 0
        self.sampler_state: dict | None = None
        self.data = None
        self.skipped_samples = 0
        self.nonfinite: NonFiniteGuard | None = None
        """`train.nonfinite`'s decisions and skip count for the current `run()`."""
        self.history: list[dict] = []
        """Every step's metrics record (what metrics.jsonl gets), on every rank."""

    def state_for_checkpoint(self, steps_done: int) -> dict:
        sampler = self.data.state_after(steps_done - self.first_step) if self.data else self.sampler_state
        return {"step": steps_done, "sampler": sampler}

    def run(self, capture_grads: bool = False, on_step_end=None) -> TrainResult:
        """Train from `self.step` to `train.steps`; `on_step_end(trainer, steps_done)` follows each step."""
        losses, norms, last_grads = [], [], None
        with ExitStack() as stack:
            stream = self._start_run()
            stack.callback(_close_stream, stream)  # stop the loader's threads / workers, also on errors
            jobs = side_jobs(self, on_step_end)
            for job in jobs:
                job.start()
                stack.callback(job.close)
            for step in range(self.step, self.cfg.train.steps):
                for job in jobs:
                    job.before_step(step + 1)
                report = self.train_step(step, stream, capture_grads)
                losses.append(report.loss)
                norms.append(report.grad_norm)
                last_grads = report.grads if report.grads is not None else last_grads
                for job in jobs:
                    job.after_step(report)
        return TrainResult(
            losses, norms, self.model, self.runtime, self.optimizer, last_grads, collective_counts(jobs)
        )

    def _start_run(self):
        """Plan the data of the remaining steps, write the resolved config, and open the data stream."""
        from megagen.data.pipeline import build_data

        cfg = self.cfg
        self.first_step = self.step
        remaining = max(0, cfg.train.steps - self.step)
        self.data = build_data(cfg, self.spec, self.runtime, remaining, self.sampler_state)
        if self.runtime.is_logging_rank:
            save_config(cfg, Path(cfg.run.dir) / "config.yaml")
        self.nonfinite = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_skipped_steps)
        return iter(self.data.loader)

    def train_step(self, step: int, stream, capture_grads: bool = False) -> StepReport:
        """Optimizer step `step` (0-based): forward/backward over its micro-batches, then the update.

        The order here is the numerics contract (the parity and checkpoint tests compare bitwise): the
        gradients are finished, clipped and checked for NaN/inf before the optimizer may touch them."""
        runtime = self.runtime
        started = time.perf_counter()
        acc = self._forward_backward(step, stream)
        runtime.finish_grads(self.model)
        grad_norm = runtime.clip_grads(self.params, self.cfg.optim.grad_clip)
        loss = runtime.global_loss(acc.loss)  # before the update: a NaN step must not land
        skip = self._skip_nonfinite(step + 1, loss, grad_norm, acc.requests)
        grads = None
        if capture_grads and step == self.cfg.train.steps - 1:
            grads = full_tensors([(n, p.grad) for n, p in self.model.named_parameters()])
        lr = self.scheduler.get_last_lr()[0]
        self._update(skip)
        runtime.synchronize()
        seconds = time.perf_counter() - started
        self.step = step + 1
        return StepReport(
            step=self.step,
            loss=loss,
            grad_norm=grad_norm,
            lr=lr,
            seconds=seconds,
            data_wait_s=acc.data_wait_s,
            global_batch=acc.global_batch,
            tokens_per_sample=acc.tokens_per_sample,
            batch=acc.batch,
            bucket=acc.requests[-1].bucket,
            grads=grads,
        )

    def _forward_backward(self, step: int, stream) -> _Accumulated:
        """Every micro-batch of `step`: forward, loss normalised by the global batch, backward; the
        gradients are synchronised on the last micro-batch only."""
        step_loss = torch.zeros((), device=self.runtime.device)
        wait, micro, accum, requests = 0.0, 0, 1, []
        while micro < accum:
            t_wait = time.perf_counter()
            req, batch = next(stream)
            wait += time.perf_counter() - t_wait
            requests.append(req)
            if req.step != step or req.micro != micro:
                raise RuntimeError(f"data stream out of order: got step {req.step} micro {req.micro}")
            accum = req.accumulation
            global_batch = accum * len(req.sample_ids) * self.runtime.dp_size
            self.runtime.set_grad_sync(self.model, last_micro=micro == accum - 1)
            loss, tokens_per_sample = self._micro_step(req, batch, global_batch)
            step_loss += loss
            micro += 1
        return _Accumulated(step_loss, requests, batch, global_batch, tokens_per_sample, wait)

    def _micro_step(self, req, batch: dict[str, torch.Tensor], global_batch: int):
        """Forward and backward of one micro-batch through the spec's objective (`spec.training_loss`)."""
        runtime = self.runtime
        sample_valid = batch.pop("sample_valid", None)
        loss_sum, tokens_per_sample = self.spec.training_loss(
            self.cfg, self.model, batch, req, runtime, sample_valid
        )
        scale = getattr(runtime, "loss_scale", 1.0)
        loss = normalised_loss(loss_sum, global_batch * tokens_per_sample, scale)
        loss.backward()
        if sample_valid is not None:
            self.skipped_samples += int((~sample_valid).sum())
        return loss.detach(), tokens_per_sample

    def _skip_nonfinite(self, step: int, loss: float, grad_norm: float, requests) -> bool:
        """`train.nonfinite` for `step` (1-based): True to skip its update; raises to stop. A non-finite loss
        first lets the data layer name a NaN/inf sample (data.check_finite=on_nan_loss), so bad data is
        reported as such rather than as a diverged step."""
        note = ""
        if not math.isfinite(loss):
            note = self.data.on_nonfinite_loss(step, requests)
        return self.nonfinite.should_skip(step, loss, grad_norm, note)

    def _update(self, skip: bool) -> None:
        """The optimizer step (unless `train.nonfinite` skips it); the schedule advances either way."""
        if not skip:
            self.optimizer.step()
        with warnings.catch_warnings():
            if skip:  # torch warns when the schedule moves before the first optimizer step
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def _close_stream(stream) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def train(cfg: Config, runtime=None, capture_grads: bool = False) -> TrainResult:
    """Run `train.steps` optimizer steps; rank 0 writes metrics and the resolved config.

    Checkpointing follows the `checkpoint` group: resume from the latest complete checkpoint of
    `checkpoint.dir` (`checkpoint.resume=auto`), or start from `checkpoint.init_from`; EMA when
    `train.ema_decay > 0`; a save every `checkpoint.every` steps and at the end.
    """
    from megagen.checkpoint import attach_checkpointing, checkpoint_dir, read_latest
    from megagen.train.run_dir import check_before_build

    check_before_build(cfg, single_process=runtime is None and not launched_distributed())
    trainer = Trainer(cfg, runtime)
    hook = attach_checkpointing(trainer)
    if trainer.step >= cfg.train.steps and trainer.runtime.is_logging_rank:
        log.info(
            "checkpoint: %s already reached train.steps=%d; nothing to do", hook.resumed_from, trainer.step
        )
    try:
        result = trainer.run(capture_grads=capture_grads, on_step_end=hook)
        if trainer.runtime.is_logging_rank:
            log.info("run written to %s", Path(cfg.run.dir).resolve())
        return result
    except BaseException as exc:  # DCP's CheckpointException is a BaseException too
        if not was_interrupted(exc):
            raise
        raise TrainingInterrupted(trainer.step, read_latest(checkpoint_dir(cfg))) from None
    finally:
        hook.close()
