"""Worker-side checkpoint cases: train with checkpointing on the pool's mesh (or alone), stop, resume.

Every rank calls the same function. Results carry the losses, the full (gathered) parameters and EMA
weights on rank 0, the sample requests this rank served, and where the run started.
"""

from __future__ import annotations

import os
import signal
import warnings

import torch.distributed as dist

from megagen.config import load_config
from megagen.train.gather import full_tensors
from megagen.train.loop import Trainer

EXAMPLE = "examples/configs/video_tiny.yaml"
BASE = [
    "train.steps=8",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "optim.warmup_steps=2",
    "train.ema_decay=0.9",
    "metrics.tensorboard=false",
    "metrics.jsonl=false",
    "metrics.progress=none",
]


class Stop(Exception):
    """Raised after the checkpoint of `stop_at` (a job that ends there, e.g. its time limit)."""


def config(overrides: list[str], run_dir: str):
    return load_config(EXAMPLE, [*BASE, f"run.dir={run_dir}", *overrides])


def _kill_rank_during_save(rank: int, step: int) -> None:
    """SIGKILL this process (rank `rank`) from inside the DCP writer of checkpoint `step`."""
    from torch.distributed.checkpoint import FileSystemWriter

    original = FileSystemWriter.write_data
    marker = f"step-{step:06d}.tmp-"

    def write_data(self, plan, planner):
        if dist.get_rank() == rank and marker in str(self.path):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, plan, planner)

    FileSystemWriter.write_data = write_data


def train_with_checkpoints(
    overrides: list[str],
    run_dir: str,
    stop_at: int | None = None,
    kill_rank_at: tuple[int, int] | None = None,
    keep_trainer: bool = False,
) -> dict:
    """Train (resuming per `checkpoint.resume`); with `stop_at`, end right after that step's save.

    `kill_rank_at=(rank, step)`: that rank SIGKILLs itself inside the writer of checkpoint `step`.
    """
    from megagen.checkpoint import attach_checkpointing
    from megagen.parallel.runtime import LocalRuntime
    from megagen.runtime_setup import distributed_runtime

    warnings.filterwarnings("ignore")
    if kill_rank_at is not None:
        _kill_rank_during_save(*kill_rank_at)
    cfg = config(overrides, run_dir)
    runtime = distributed_runtime(cfg) if dist.is_initialized() else LocalRuntime()
    trainer = Trainer(cfg, runtime)
    hook = attach_checkpointing(trainer)
    start = {"step": trainer.step, "sampler": trainer.sampler_state}

    def on_step_end(tr, steps_done):
        hook(tr, steps_done)
        if steps_done == stop_at:
            hook.wait()
            raise Stop

    losses = None
    try:
        losses = trainer.run(on_step_end=on_step_end).losses
    except Stop:
        pass
    finally:
        hook.close()
    out = {
        "start": start,
        "resumed_from": str(hook.resumed_from) if hook.resumed_from else None,
        "losses": losses,
        "requests": [(r.step, r.sample_ids) for r in trainer.data.plan],
        "sampler_end": trainer.state_for_checkpoint(trainer.step)["sampler"],
    }
    params = full_tensors(list(trainer.model.named_parameters()))
    ema = full_tensors(list(hook.ema.shadow.items())) if hook.ema is not None else None
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.update(params=params, ema=ema)
    if keep_trainer:  # in-process callers only (not picklable)
        out.update(trainer=trainer, hook=hook)
    return out


def resume_error(overrides: list[str], run_dir: str) -> str | None:
    """The one-line error this rank raises when starting from a checkpoint (None: it started fine).
    Returned, not raised, so that the pool stays up for the next case."""
    from megagen.checkpoint import CheckpointError

    try:
        train_with_checkpoints(overrides, run_dir)
    except CheckpointError as exc:
        return str(exc)
    return None


def files_hashed_at_resume(overrides: list[str], run_dir: str) -> dict:
    """Resume, recording which checkpoint files this rank hashed while verifying it."""
    from megagen.checkpoint import verify

    hashed: list[str] = []
    original = verify.digest_files

    def recording(paths, threads=None):
        hashed.extend(p.name if p.parent.name != "rng" else f"rng/{p.name}" for p in paths)
        return original(paths, threads)

    verify.digest_files = recording
    try:
        out = train_with_checkpoints(overrides, run_dir)
    finally:
        verify.digest_files = original
    return {"hashed": hashed, "start": out["start"]["step"]}
