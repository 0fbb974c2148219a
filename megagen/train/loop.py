"""The training loop: config → runtime → spec → parallelize → data → steps → metrics.

The hooks where parallelism enters (`runtime.*`) sit at fixed points, so the loop is the same for one
process and for any mesh.
"""

from __future__ import annotations

import logging
import math
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from megagen.config import Config, ConfigError, save_config
from megagen.metrics import MetricsLogger
from megagen.specs import get_spec
from megagen.train.build import build_model
from megagen.train.nonfinite import NonFiniteGuard
from megagen.train.objective import draw_for_samples, flow_matching_micro_step
from megagen.train.optim import build_optimizer
from megagen.train.step_gc import StepGC

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


def _active_modes() -> list:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return list(_get_current_dispatch_mode_stack())


def max_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _launched_distributed() -> bool:
    import os

    import torch.distributed as dist

    return dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_runtime(cfg: Config):
    """The single-process runtime, or the distributed one when launched by torchrun."""
    from megagen.parallel.runtime import LocalRuntime
    from megagen.runtime_setup import distributed_runtime

    if _launched_distributed():
        return distributed_runtime(cfg)
    p = cfg.parallel
    if max(p.dp_replicate, p.cp, p.tp, p.dp_shard) > 1:
        raise ConfigError("parallel", "a mesh larger than 1 needs several processes: launch with torchrun")
    from megagen.parallel.mesh import device_and_backend

    return LocalRuntime(device_and_backend(p.backend)[0])  # the GPU when there is one, else the CPU


def _interrupted(exc: BaseException) -> bool:
    """Whether `exc` is a Ctrl-C in disguise: DCP turns a KeyboardInterrupt during a save into a
    CheckpointException holding each rank's failure."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt):
            return True
        for failure in (getattr(exc, "failures", None) or {}).values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, KeyboardInterrupt):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training: the steps done and the checkpoint the same command resumes from."""

    def __init__(self, steps_done: int, checkpoint: Path | None):
        self.steps_done, self.checkpoint = steps_done, checkpoint
        resume = (
            f"the same command resumes from {checkpoint}"
            if checkpoint is not None
            else "no checkpoint: progress is lost"
        )
        super().__init__(f"interrupted at step {steps_done}; {resume}")


class _Profiler:
    """torch.profiler over steps a..b (`metrics.profile_steps=a,b`): Chrome trace + top-ops table."""

    def __init__(self, cfg: Config, runtime):
        from megagen.config.load import profile_step_range

        self.first, self.last = profile_step_range(cfg.metrics.profile_steps)
        self.out = Path(cfg.run.dir) / "profile"
        self.rank = runtime.rank
        self.prof = None

    def before_step(self, step: int) -> None:
        if step == self.first and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            )
            self.prof = profile(activities=activities, record_shapes=True)
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        if self.prof is not None and step == self.last:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out / f"trace_rank{self.rank}.json"))
        if self.rank == 0:
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            log.info("profile of steps %d..%d (trace in %s):\n%s", self.first, self.last, self.out, table)
        self.prof = None


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
        from megagen.train.cuda_graphs import check_cuda_graphs, enable_cuda_graphs

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
        self.history: list[dict] = []
        """Every step's metrics record (what metrics.jsonl gets), on every rank."""

    def state_for_checkpoint(self, steps_done: int) -> dict:
        sampler = self.data.state_after(steps_done - self.first_step) if self.data else self.sampler_state
        return {"step": steps_done, "sampler": sampler}

    def _micro_step(self, req, batch: dict[str, torch.Tensor], global_batch: int):
        cfg, spec, runtime = self.cfg, self.spec, self.runtime
        latent_shape = tuple(batch["latents"].shape[1:])
        draws = draw_for_samples(cfg, spec, req.step, list(req.positions), latent_shape)
        sample_valid = batch.pop("sample_valid", None)
        loss_sum, _, tokens_per_sample = flow_matching_micro_step(
            cfg, spec, self.model, batch, draws, runtime.shard_targets, sample_valid
        )
        scale = getattr(runtime, "loss_scale", 1.0)
        loss = loss_sum * scale / (global_batch * tokens_per_sample)
        loss.backward()
        if sample_valid is not None:
            self.skipped_samples += int((~sample_valid).sum())
        return loss.detach(), tokens_per_sample

    def _skip_nonfinite(self, guard: NonFiniteGuard, step: int, loss: float, grad_norm: float, requests):
        """`train.nonfinite` for `step` (1-based): True to skip its update; raises to stop. A non-finite loss
        first lets the data layer name a NaN/inf sample (data.check_finite=on_nan_loss), so bad data is
        reported as such rather than as a diverged step."""
        note = ""
        if not math.isfinite(loss):
            note = self.data.on_nonfinite_loss(step, requests)
        return guard.should_skip(step, loss, grad_norm, note)

    def run(self, capture_grads: bool = False, on_step_end=None) -> TrainResult:
        """Train from `self.step` to `train.steps`; `on_step_end(trainer, steps_done)` follows each step."""
        cfg, runtime, model = self.cfg, self.runtime, self.model
        from megagen.data.pipeline import build_data

        self.first_step = self.step
        remaining = cfg.train.steps - self.step
        self.data = build_data(cfg, self.spec, runtime, max(0, remaining), self.sampler_state)
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
            resume=self.step > 0,
            resume_step=self.step,
        )
        evaluator = None
        if cfg.eval.path and cfg.eval.every:
            from megagen.train.evaluate import Evaluator

            evaluator = Evaluator(cfg, self.spec, runtime)
        meter = None
        if cfg.metrics.mfu:
            from megagen.metrics.throughput import FlopMeter

            meter = FlopMeter(cfg, self.spec, runtime)
        profiler = _Profiler(cfg, runtime) if cfg.metrics.profile_steps else None
        losses, norms, last_grads = [], [], None
        counter = runtime.comm_counter() if cfg.metrics.comm else None
        from megagen.train.watchdog import start_watchdog

        watchdog = start_watchdog(cfg, runtime)  # None when train.step_timeout_s=0
        comm = [] if counter is not None else None
        guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_skipped_steps)
        stream = iter(self.data.loader)
        step_gc = StepGC(cfg.train.gc_every).__enter__()
        try:
            for step in range(self.step, cfg.train.steps):
                if counter is not None:
                    counter.reset()
                    counter.__enter__()
                if profiler is not None:
                    profiler.before_step(step + 1)
                if watchdog is not None:
                    watchdog.step_started(step + 1)
                t_start = time.perf_counter()
                step_loss = torch.zeros((), device=runtime.device)
                wait = 0.0
                micro, accum = 0, 1
                step_reqs = []
                while micro < accum:
                    t_wait = time.perf_counter()
                    req, batch = next(stream)
                    wait += time.perf_counter() - t_wait
                    step_reqs.append(req)
                    if req.step != step or req.micro != micro:
                        raise RuntimeError(f"data stream out of order: got step {req.step} micro {req.micro}")
                    accum = req.accumulation
                    global_batch = accum * len(req.sample_ids) * runtime.dp_size
                    runtime.set_grad_sync(model, last_micro=micro == accum - 1)
                    loss, tokens_per_sample = self._micro_step(req, batch, global_batch)
                    step_loss += loss
                    micro += 1
                runtime.finish_grads(model)
                grad_norm = runtime.clip_grads(self.params, cfg.optim.grad_clip)
                global_loss = runtime.global_loss(step_loss)  # before the update: a NaN step must not land
                skip = self._skip_nonfinite(guard, step + 1, global_loss, grad_norm, step_reqs)
                if capture_grads and step == cfg.train.steps - 1:
                    last_grads = full_tensors([(n, p.grad) for n, p in model.named_parameters()])
                lr = self.scheduler.get_last_lr()[0]
                if not skip:
                    self.optimizer.step()
                with warnings.catch_warnings():
                    if skip:  # torch warns when the schedule moves before the first optimizer step
                        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()` before")
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                runtime.synchronize()
                dt = time.perf_counter() - t_start
                self.step = step + 1
                if profiler is not None:
                    profiler.after_step(self.step)
                extra = {"bucket": req.bucket}
                if meter is not None:
                    extra.update(meter.step_metrics(batch, global_batch, tokens_per_sample, dt))
                if watchdog is not None:
                    watchdog.step_finished()
                if counter is not None:
                    counter.__exit__(None, None, None)
                if counter is not None and cfg.metrics.comm:
                    extra["comm_bytes"] = counter.bytes_by_axis()
                    extra["comm_s"] = counter.seconds
                    comm.append(counter.summary())
                if self.skipped_samples:
                    extra["skipped_samples"] = self.skipped_samples
                if guard.skipped:
                    extra["skipped_steps"] = guard.skipped
                last = self.step == cfg.train.steps
                if evaluator is not None and (self.step % cfg.eval.every == 0 or last):
                    extra.update(evaluator.evaluate(model))
                losses.append(global_loss)
                norms.append(grad_norm)
                record = {
                    "loss": global_loss,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "samples_per_s": global_batch / dt,
                    "tokens_per_s": global_batch * tokens_per_sample / dt,
                    "step_time_s": dt,
                    "data_wait_s": wait,
                    "max_mem_gb": max_memory_gb(runtime.device),
                    **extra,
                }
                self.history.append(record)
                logger.log(self.step, record)
                if on_step_end is not None:
                    on_step_end(self, self.step)
                step_gc.step_done(self.step)
        finally:
            step_gc.__exit__(None, None, None)
            close_stream = getattr(stream, "close", None)  # stop the loader's threads / workers now
            if close_stream is not None:
                close_stream()
            logger.close()
            if profiler is not None:
                profiler.close()
            if watchdog is not None:
                watchdog.close()
            if counter is not None and counter in _active_modes():
                counter.__exit__(None, None, None)
        return TrainResult(losses, norms, model, runtime, self.optimizer, last_grads, comm)


def train(cfg: Config, runtime=None, capture_grads: bool = False) -> TrainResult:
    """Run `train.steps` optimizer steps; rank 0 writes metrics and the resolved config.

    Checkpointing follows the `checkpoint` group: resume from the latest complete checkpoint of
    `checkpoint.dir` (`checkpoint.resume=auto`), or start from `checkpoint.init_from`; EMA when
    `train.ema_decay > 0`; a save every `checkpoint.every` steps and at the end.
    """
    from megagen.checkpoint import attach_checkpointing, checkpoint_dir, read_latest
    from megagen.train.run_dir import check_before_build

    check_before_build(cfg, single_process=runtime is None and not _launched_distributed())
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
        if not _interrupted(exc):
            raise
        raise TrainingInterrupted(trainer.step, read_latest(checkpoint_dir(cfg))) from None
    finally:
        hook.close()
