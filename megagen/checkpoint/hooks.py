"""Wiring checkpoints into a `Trainer`: resume / init_from before training, EMA + saves after each step.

Usage (every rank)::

    trainer = Trainer(cfg)
    hook = attach_checkpointing(trainer)  # restores state now (a collective on every rank)
    try:
        trainer.run(on_step_end=hook)  # EMA update, then a save every `checkpoint.every` steps
    finally:
        hook.close()
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from megagen.checkpoint.layout import COMPLETE, CheckpointError, open_checkpoint, read_latest, step_of
from megagen.checkpoint.manager import CheckpointManager, agree
from megagen.checkpoint.state import (
    check_same_model,
    host_state,
    load_into_trainer,
    mesh_of,
    prepare_load,
    tensor_state,
)

log = logging.getLogger("megagen")


def checkpoint_dir(cfg) -> Path:
    """`checkpoint.dir`, or `<run.dir>/checkpoints` when empty."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.dir) / "checkpoints"


def _rank_and_world() -> tuple[int, int]:
    """This rank's place among the ranks that share the verification of a checkpoint's files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_check(fn, device):
    """Run `fn` on every rank; if it raised a CheckpointError anywhere, every rank raises the error of
    the lowest failing rank (each rank verifies its own share of the files: any may find the fault)."""
    result, error = None, None
    try:
        result = fn()
    except CheckpointError as exc:
        error = exc
    if agree(error is None, device):
        return result
    if not dist.is_initialized():
        raise error
    mine = (error.key, error.detail) if error is not None else None
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)  # the messages of trusted peers: plain (str, str) pairs
    key, message = next(e for e in every if e is not None)
    raise CheckpointError(key, message)


def refuse_unfinished(directory: Path) -> None:
    """`resume=auto` found no complete checkpoint: step directories there (none with COMPLETE) mean a
    run whose checkpoints are unusable, not an empty directory; starting over would overwrite them."""
    if not directory.is_dir():
        return
    steps = sorted(p.name for p in directory.iterdir() if p.is_dir() and step_of(p) is not None)
    if steps:
        more = f" and {len(steps) - 3} more" if len(steps) > 3 else ""
        raise CheckpointError(
            "checkpoint.dir",
            f"{directory} holds {', '.join(steps[:3])}{more} but no complete checkpoint (no {COMPLETE} "
            "marker in any): set a new checkpoint.dir, or checkpoint.resume=never to start over deliberately",
        )


class CheckpointHook:
    """The `on_step_end(trainer, steps_done)` callback: EMA update, then a save when one is due."""

    def __init__(self, trainer, manager: CheckpointManager | None, ema, every: int):
        self.trainer = trainer
        self.manager = manager
        self.ema = ema
        self.every = every
        self.resumed_from: Path | None = None
        self.init_report = None

    def __call__(self, trainer, steps_done: int) -> None:
        if self.ema is not None:
            self.ema.update()
        if self.manager is None:
            return
        last = steps_done >= trainer.cfg.train.steps
        if steps_done % self.every == 0 or last:
            self.save(steps_done, wait=last)

    def save(self, steps_done: int | None = None, wait: bool = False) -> None:
        """Save the trainer's state now (every rank); `wait` blocks until it is complete and visible."""
        if self.manager is None:
            raise CheckpointError("checkpoint.every", "checkpointing is disabled (checkpoint.every=0)")
        trainer = self.trainer
        steps_done = trainer.step if steps_done is None else steps_done
        state, groups = tensor_state(trainer, self.ema)
        meta = host_state(trainer, steps_done, groups, self.ema)
        self.manager.save(state, meta, steps_done, wait=wait)

    def wait(self) -> None:
        """Block until every save issued so far is complete and visible (a collective)."""
        if self.manager is not None:
            self.manager.wait()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


def resume_target(cfg, directory: Path) -> Path | None:
    choice = cfg.checkpoint.resume
    if choice == "never":
        return None
    if choice == "auto":
        found = read_latest(directory)
        if found is None:
            refuse_unfinished(directory)
        return found
    return Path(choice)


def preflight(cfg) -> Path | None:
    """Check the checkpoint a run will start from before its model is built (collective-free).

    Resolves `checkpoint.resume` (or else `checkpoint.init_from`) and validates it as `attach_checkpointing`
    will — wrong spec or preset, missing or truncated files, an edited manifest — so that a bad path fails
    in seconds rather than after a large model was built. Returns the checkpoint (or init_from source), or
    None. Checksums of the data are left to `attach_checkpointing`, where the ranks share them.
    """
    target = resume_target(cfg, checkpoint_dir(cfg))
    if target is not None:
        ckpt, meta = open_checkpoint(target, "checkpoint.resume", verify="size")
        check_same_model(meta, cfg, ckpt, "checkpoint.resume")
        return ckpt
    if cfg.checkpoint.init_from:
        from megagen.checkpoint.init_from import open_source

        source = open_source(cfg.checkpoint.init_from, verify="size", cfg=cfg)
        return Path(getattr(source, "ckpt", None) or source.path)
    return None


def resume(trainer, ema, directory: Path) -> Path | None:
    """Restore `trainer` (and `ema`) from the checkpoint `checkpoint.resume` selects; None if none."""
    cfg, rt = trainer.cfg, trainer.runtime
    key = "checkpoint.resume"

    def select():
        target = resume_target(cfg, directory)
        if target is None:
            return None
        ckpt, meta = open_checkpoint(target, key, cfg.checkpoint.verify, *_rank_and_world())
        check_same_model(meta, cfg, ckpt, key)
        return ckpt, meta

    found = _collective_check(select, rt.device)
    if found is None:
        return None
    ckpt, meta = found
    prepared = _collective_check(lambda: prepare_load(trainer, ckpt, meta, ema, key), rt.device)
    load_into_trainer(trainer, ckpt, meta, ema, prepared, key)
    if rt.is_logging_rank:
        log.info(
            "checkpoint: resumed from %s at step %d (saved on mesh %s, now %s)",
            ckpt,
            trainer.step,
            meta.get("mesh"),
            mesh_of(rt),
        )
    return ckpt


def attach_checkpointing(trainer) -> CheckpointHook:
    """Resume (or init_from) now, and return the `on_step_end` callback that keeps EMA and saves.

    Call on every rank before `trainer.run()`. `checkpoint.resume=auto` continues from the latest
    complete checkpoint in `checkpoint.dir` when there is one; otherwise `checkpoint.init_from` (if set)
    loads weights only. Saving is on when `checkpoint.every > 0`.
    """
    from megagen.train.ema import EMA

    cfg = trainer.cfg
    c = cfg.checkpoint
    directory = checkpoint_dir(cfg)
    ema = EMA(trainer.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    manager = None
    if c.every > 0:
        manager = CheckpointManager(directory, trainer.runtime, c.keep, c.async_save)
    hook = CheckpointHook(trainer, manager, ema, c.every)
    hook.resumed_from = resume(trainer, ema, directory)
    if hook.resumed_from is None and c.init_from:
        from megagen.checkpoint.init_from import KEY, apply_init, plan_init, rules_for

        rt = trainer.runtime
        plan = _collective_check(
            lambda: plan_init(
                trainer.model, c.init_from, rules_for(trainer.spec), KEY, c.verify, *_rank_and_world(), cfg
            ),
            rt.device,
        )
        hook.init_report = apply_init(trainer.model, plan, logging_rank=rt.is_logging_rank)
        if ema is not None:
            ema.reset_to_weights()
    if manager is not None:
        manager.prepare()  # only after a successful start: a refused checkpoint leaves the directory alone
    return hook
