"""`train.nonfinite` cases, run in one process (unit tests) or on every rank of a pool (parity tests).

A step is made non-finite by a hook, on one rank or all: `loss` multiplies the model's output by NaN (the loss
and every gradient go NaN), `grad` multiplies one parameter's gradient by inf (the loss stays finite, the
gradient norm does not).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from megagen.config import load_config
from megagen.train.gather import full_tensors
from megagen.train.loop import Trainer
from megagen.train.nonfinite import NonFiniteStepError
from tests.distributed.cases_parity import EXAMPLE
from tests.distributed.cases_parity import SMALL as BASE


def poison(trainer: Trainer, steps: set[int], kind: str = "loss", rank: int | None = None) -> None:
    """Make the 1-based `steps` non-finite on `rank` (None: every rank) through a hook of `kind`."""

    def active() -> bool:  # during step s, trainer.step is s - 1 (the steps done)
        return trainer.step + 1 in steps and (rank is None or rank == trainer.runtime.rank)

    if kind == "loss":
        trainer.model.register_forward_hook(lambda m, i, out: out * float("nan") if active() else None)
    elif kind == "grad":
        trainer.params[0].register_hook(lambda g: g * float("inf") if active() else None)
    else:
        raise ValueError(kind)


def run_poisoned(
    overrides: list[str], steps: list[int], kind: str = "loss", rank: int | None = None, run_dir: str = ""
) -> dict:
    """Train with `steps` poisoned; every step's full params (rank 0), losses, metrics records and the
    NonFiniteStepError message if the run stopped."""
    from megagen.parallel.runtime import LocalRuntime
    from megagen.runtime_setup import distributed_runtime

    cfg = load_config(EXAMPLE, [*BASE, f"run.dir={run_dir or '/tmp/megagen-nonfinite'}", *overrides])
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    runtime = distributed_runtime(cfg) if dist.is_initialized() else LocalRuntime()
    trainer = Trainer(cfg, runtime)
    poison(trainer, set(steps), kind, rank)
    snapshots = [full_tensors(list(trainer.model.named_parameters()))]
    error = None
    try:
        trainer.run(on_step_end=lambda t, s: snapshots.append(full_tensors(list(t.model.named_parameters()))))
    except NonFiniteStepError as exc:
        error = str(exc)
    last = full_tensors(list(trainer.model.named_parameters()))
    adam_steps = sorted({int(st["step"]) for st in trainer.optimizer.state.values()})
    out = {
        "error": error,
        "history": trainer.history,
        "steps_done": trainer.step,
        "adam_steps": adam_steps,
        "finite": all(bool(torch.isfinite(t).all()) for t in last.values()),
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.update(snapshots=snapshots, last=last)
    return out
