"""Ctrl-C during training: one line saying how far the run got and what the same command resumes from."""

from __future__ import annotations

from pathlib import Path


def was_interrupted(exc: BaseException) -> bool:
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
