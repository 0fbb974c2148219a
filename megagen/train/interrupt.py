"""Ctrl-C during training: one line saying how far the run got and what the same command resumes from."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("megagen")


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
            if inner is not exc and was_interrupted(inner):  # e.g. a torch.save cut short, then closed
                return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def interrupts_held():
    """Hold a Ctrl-C until the block ends, so the step-end work (EMA, checkpoint save) is never cut in half.

    A KeyboardInterrupt inside `torch.save` leaves a truncated zip whose close then fails: the save is lost
    and the error no longer reads as an interrupt. Held, the first Ctrl-C lets the save finish and stops
    after it (so the run resumes from that very step); a second one interrupts at once. Only the main
    thread can install handlers, and a handler someone else installed is left in charge.
    """
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pressed = []

    def hold(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)
        log.warning("Ctrl-C: finishing this step's checkpoint first (press again to stop at once)")

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


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
