"""The work around each training step that is not the step: timing, counting, evaluating, logging, saving.

Why one interface: the loop stays a few lines however many of these there are, and each job's set-up,
per-step work and tear-down sit together in one small class. `side_jobs()` lists them in the order they
run; the order is part of the contract (for example the collective counter stops after the throughput
meter and before evaluation, so the step's `comm_bytes` count the step and nothing else, and the
checkpoint callback runs after the step's metrics are written). Adding a side job = one `SideJob`
subclass + one line in `side_jobs()`.
"""

from __future__ import annotations

import logging
import resource
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megagen.train.interrupt import interrupts_held

log = logging.getLogger("megagen")


@dataclass
class StepReport:
    """One finished optimizer step, as the side jobs see it."""

    step: int
    """Steps done, i.e. the 1-based number of this step."""
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    data_wait_s: float
    global_batch: int
    tokens_per_sample: int
    batch: dict
    """The step's last micro-batch (its shapes give the FLOP count)."""
    bucket: str
    metrics: dict = field(default_factory=dict)
    """What the side jobs add to this step's metrics record, in the order they add it."""
    grads: dict | None = None
    """Full gradients after clipping, when the run captures them (last step only)."""


class SideJob:
    """`start()` once before the first step, `before_step(n)` / `after_step(report)` around step n
    (1-based), `close()` once at the end, also when the run stops with an exception."""

    def start(self) -> None:
        pass

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, report: StepReport) -> None:
        pass

    def close(self) -> None:
        pass


def max_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: the allocator's peak on a GPU, the resident set's peak on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Profile(SideJob):
    """torch.profiler over steps a..b (`metrics.profile_steps=a,b`): Chrome trace + top-ops table."""

    def __init__(self, cfg, runtime):
        from megagen.config.load import profile_step_range

        self.first, self.last = profile_step_range(cfg.metrics.profile_steps)
        self.out = Path(cfg.run.dir) / "profile"
        self.rank = runtime.rank
        self.prof = None
        self.active = ExitStack()

    def before_step(self, step: int) -> None:
        if step == self.first and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            )
            self.prof = self.active.enter_context(profile(activities=activities, record_shapes=True))

    def after_step(self, report: StepReport) -> None:
        if self.prof is not None and report.step == self.last:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        self.active.close()
        self.out.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out / f"trace_rank{self.rank}.json"))
        if self.rank == 0:
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            log.info("profile of steps %d..%d (trace in %s):\n%s", self.first, self.last, self.out, table)
        self.prof = None


class Throughput(SideJob):
    """`metrics.mfu`: TFLOP/s, MFU and HFU of each step from the spec's FLOP count."""

    def __init__(self, cfg, spec, runtime):
        from megagen.metrics.throughput import FlopMeter

        self.meter = FlopMeter(cfg, spec, runtime)

    def after_step(self, report: StepReport) -> None:
        r = report
        r.metrics.update(self.meter.step_metrics(r.batch, r.global_batch, r.tokens_per_sample, r.seconds))


class Watchdog(SideJob):
    """`train.step_timeout_s`: times each step (not what runs between steps) and reports a hang."""

    def __init__(self, cfg, runtime):
        self.cfg, self.runtime = cfg, runtime
        self.dog = None

    def start(self) -> None:
        from megagen.train.watchdog import start_watchdog

        self.dog = start_watchdog(self.cfg, self.runtime)

    def before_step(self, step: int) -> None:
        self.dog.step_started(step)

    def after_step(self, report: StepReport) -> None:
        self.dog.step_finished()

    def close(self) -> None:
        if self.dog is not None:
            self.dog.close()


class CountCollectives(SideJob):
    """`metrics.comm`: bytes, calls and seconds of the collectives each step issues, per mesh axis; the
    seconds spent waiting per axis (`comm_exposed_s`, None where unmeasurable) show what overlap hid."""

    def __init__(self, counter):
        self.counter = counter
        self.counting = ExitStack()
        self.per_step: list[dict] = []
        """Each step's {axis: {kind: {bytes, calls}}} (the run's `TrainResult.comm`)."""

    def before_step(self, step: int) -> None:
        self.counter.reset()
        self.counting.enter_context(self.counter)

    def after_step(self, report: StepReport) -> None:
        self.counting.close()
        report.metrics["comm_bytes"] = self.counter.bytes_by_axis()
        report.metrics["comm_s"] = self.counter.seconds
        report.metrics["comm_exposed_s"] = self.counter.exposed_by_axis()
        self.per_step.append(self.counter.summary())

    def close(self) -> None:  # a step that raised left the counter on
        self.counting.close()


class CountSkips(SideJob):
    """Samples the data layer dropped and steps `train.nonfinite=skip_step` skipped, once there are any."""

    def __init__(self, trainer):
        self.trainer = trainer

    def after_step(self, report: StepReport) -> None:
        if self.trainer.skipped_samples:
            report.metrics["skipped_samples"] = self.trainer.skipped_samples
        if self.trainer.nonfinite.skipped:
            report.metrics["skipped_steps"] = self.trainer.nonfinite.skipped


class Evaluate(SideJob):
    """`eval.every`: held-out loss every N steps and after the last one (not timed by the watchdog)."""

    def __init__(self, cfg, spec, runtime, model):
        self.cfg, self.spec, self.runtime, self.model = cfg, spec, runtime, model
        self.evaluator = None

    def start(self) -> None:
        from megagen.train.evaluate import Evaluator

        self.evaluator = Evaluator(self.cfg, self.spec, self.runtime)

    def after_step(self, report: StepReport) -> None:
        if report.step % self.cfg.eval.every == 0 or report.step == self.cfg.train.steps:
            report.metrics.update(self.evaluator.evaluate(self.model))


class LogMetrics(SideJob):
    """Each step's record into `trainer.history` (every rank) and the metrics sinks (rank 0 writes)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.logger = None

    def start(self) -> None:
        from megagen.metrics import MetricsLogger

        t, m = self.trainer, self.trainer.cfg.metrics
        run_dir = Path(t.cfg.run.dir) if t.runtime.is_logging_rank else None
        steps, every = t.cfg.train.steps, t.cfg.train.log_every
        self.logger = MetricsLogger(
            run_dir, steps, m.jsonl, m.tensorboard, m.progress, every, resume=t.step > 0, resume_step=t.step
        )

    def after_step(self, report: StepReport) -> None:
        r = report
        record = {
            "loss": r.loss,
            "grad_norm": r.grad_norm,
            "lr": r.lr,
            "samples_per_s": r.global_batch / r.seconds,
            "tokens_per_s": r.global_batch * r.tokens_per_sample / r.seconds,
            "step_time_s": r.seconds,
            "data_wait_s": r.data_wait_s,
            "max_mem_gb": max_memory_gb(self.trainer.runtime.device),
            "bucket": r.bucket,
            **r.metrics,
        }
        self.trainer.history.append(record)
        self.logger.log(r.step, record)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


class StepEndCallback(SideJob):
    """`run(on_step_end=fn)`: `fn(trainer, steps_done)` after each step's record (checkpoints, EMA, tests)."""

    def __init__(self, trainer, fn):
        self.trainer, self.fn = trainer, fn

    def after_step(self, report: StepReport) -> None:
        with interrupts_held():
            self.fn(self.trainer, report.step)


class CollectGarbage(SideJob):
    """`train.gc_every`: Python's cyclic collector at step boundaries only (see step_gc.py)."""

    def __init__(self, every: int):
        from megagen.train.step_gc import StepGC

        self.gc = StepGC(every)
        self.active = ExitStack()

    def start(self) -> None:
        self.active.enter_context(self.gc)

    def after_step(self, report: StepReport) -> None:
        self.gc.step_done(report.step)

    def close(self) -> None:
        self.active.close()


def side_jobs(trainer, on_step_end=None) -> list[SideJob]:
    """This run's side jobs in the order they run, each only where its setting asks for it."""
    cfg, runtime = trainer.cfg, trainer.runtime
    counter = runtime.comm_counter() if cfg.metrics.comm else None
    wanted = [
        (cfg.metrics.profile_steps, lambda: Profile(cfg, runtime)),
        (cfg.metrics.mfu, lambda: Throughput(cfg, trainer.spec, runtime)),
        (cfg.train.step_timeout_s != 0, lambda: Watchdog(cfg, runtime)),
        (counter is not None, lambda: CountCollectives(counter)),
        (True, lambda: CountSkips(trainer)),
        (cfg.eval.path and cfg.eval.every, lambda: Evaluate(cfg, trainer.spec, runtime, trainer.model)),
        (True, lambda: LogMetrics(trainer)),
        (on_step_end is not None, lambda: StepEndCallback(trainer, on_step_end)),
        (True, lambda: CollectGarbage(cfg.train.gc_every)),
    ]
    return [make() for on, make in wanted if on]


def collective_counts(jobs: list[SideJob]) -> list[dict] | None:
    """Per-step collective counts of a run, when it counted them (`metrics.comm` on a mesh)."""
    return next((job.per_step for job in jobs if isinstance(job, CountCollectives)), None)
