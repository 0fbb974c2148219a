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

from megagen.checkpoint.layout import CheckpointError, open_checkpoint, read_latest
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


def _collective_check(fn, device):
    """Run `fn` on every rank; if it raised a CheckpointError anywhere, raise on every rank."""
    result, error = None, None
    try:
        result = fn()
    except CheckpointError as exc:
        error = exc
    if not agree(error is None, device):
        if error is not None:
            raise error
        raise CheckpointError("checkpoint", "another rank could not use the checkpoint (see its error)")
    return result


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


def _resume_target(cfg, directory: Path) -> Path | None:
    choice = cfg.checkpoint.resume
    if choice == "never":
        return None
    if choice == "auto":
        return read_latest(directory)
    return Path(choice)


def preflight(cfg) -> Path | None:
    """Check the checkpoint a run will start from before its model is built (collective-free).

    Resolves `checkpoint.resume` (or else `checkpoint.init_from`) and validates it as `attach_checkpointing`
    will — wrong spec or preset, missing or truncated files — so that a bad path fails in seconds rather
    than after a large model was built. Returns the checkpoint (or init_from source), or None.
    """
    target = _resume_target(cfg, checkpoint_dir(cfg))
    if target is not None:
        ckpt, meta = open_checkpoint(target, "checkpoint.resume")
        check_same_model(meta, cfg, ckpt, "checkpoint.resume")
        return ckpt
    if cfg.checkpoint.init_from:
        from megagen.checkpoint.init_from import open_source

        source = open_source(cfg.checkpoint.init_from)
        return Path(getattr(source, "ckpt", None) or source.path)
    return None


def resume(trainer, ema, directory: Path) -> Path | None:
    """Restore `trainer` (and `ema`) from the checkpoint `checkpoint.resume` selects; None if none."""
    cfg, rt = trainer.cfg, trainer.runtime
    key = "checkpoint.resume"

    def select():
        target = _resume_target(cfg, directory)
        if target is None:
            return None
        ckpt, meta = open_checkpoint(target, key)
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
        manager.prepare()
    hook = CheckpointHook(trainer, manager, ema, c.every)
    hook.resumed_from = resume(trainer, ema, directory)
    if hook.resumed_from is None and c.init_from:
        from megagen.checkpoint.init_from import apply_init, plan_init, rules_for

        rt = trainer.runtime
        plan = _collective_check(
            lambda: plan_init(trainer.model, c.init_from, rules_for(trainer.spec)), rt.device
        )
        hook.init_report = apply_init(trainer.model, plan, logging_rank=rt.is_logging_rank)
        if ema is not None:
            ema.reset_to_weights()
    return hook
