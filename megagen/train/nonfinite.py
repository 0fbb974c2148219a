"""`train.nonfinite`: what a step whose loss or gradient norm is NaN/inf does, decided before its update.

Why before: once `optimizer.step()` has run on NaN gradients every weight is NaN, and the next checkpoint
would save that state (and rotate good ones out). The loss and the gradient norm are global reductions, so
every rank sees the same values and takes the same decision, with the same collectives in the same order.

- `stop` (default): raise `NonFiniteStepError` naming the step and both values. The step's update, metrics
  and checkpoint hook do not run: the last checkpoint on disk is the last good state.
- `skip_step`: drop the step's update (gradients zeroed, no optimizer step: weights and AdamW moments stay
  as they were). The step counter, the data stream and the lr schedule still advance, as if the step had
  trained, so the run stays aligned with its plan and with resumption. Each skip is logged and counted
  (`skipped_steps` in the metrics); more than `train.max_skipped_steps` skipped in a row stop the run.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("megagen")


class NonFiniteStepError(RuntimeError):
    """A step's loss or gradient norm is NaN/inf and `train.nonfinite` says to stop (one line)."""


class NonFiniteGuard:
    """Decides, once per step and before the update, whether the step trains, is skipped, or stops the run."""

    def __init__(self, mode: str, max_skipped: int):
        if mode not in ("stop", "skip_step"):
            raise ValueError(f"train.nonfinite must be 'stop' or 'skip_step', got {mode!r}")
        self.mode, self.max_skipped = mode, max_skipped
        self.skipped = 0
        """Steps skipped so far in this run (`skipped_steps` in the metrics)."""
        self.in_a_row = 0

    def should_skip(self, step: int, loss: float, grad_norm: float, note: str = "") -> bool:
        """True when `step` (1-based) must not update the weights; raises NonFiniteStepError to stop.
        `note`: what the data layer found about the step's samples (appended to the message)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        what = f"step {step}: loss {loss}, grad_norm {grad_norm} is not finite"
        what += f"; {note}" if note else ""
        if self.mode == "stop":
            raise NonFiniteStepError(
                f"train.nonfinite=stop: {what}; stopped before its optimizer step, so no checkpoint holds it "
                "(lower optim.lr, check the data, or set train.nonfinite=skip_step)"
            )
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row > self.max_skipped:
            raise NonFiniteStepError(
                f"train.nonfinite=skip_step: {what}: {self.in_a_row} steps in a row would be skipped, more "
                f"than train.max_skipped_steps={self.max_skipped}; stopped before its optimizer step"
            )
        log.warning("train.nonfinite=skip_step: skipped the update of %s (%d so far)", what, self.skipped)
        return True
