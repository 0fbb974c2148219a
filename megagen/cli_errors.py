"""How a megagen command ends when something goes wrong: one line, once per job, a meaningful exit code.

Exit codes (docs/launching.md): launchers restart a job only when a restart can help.
  1   a step's loss or gradient norm was not finite (train.nonfinite=stop): a restart from the latest
      checkpoint would diverge the same way, so it is not restarted either; any other failure (a bug, a
      full disk) also exits 1 and is restartable
  2   bad input (config key, path, file, data): the same command fails again, so it is never restarted
  86  the step watchdog fired (a hung or dead peer): restartable, resumes from the latest checkpoint
  130 interrupted (Ctrl-C / SIGINT): the same command resumes from the latest checkpoint
Under torchrun an error every rank raises alike (a config error) is printed by rank 0 alone; an error of
one rank's own (its data, its files) is printed by that rank, prefixed with its rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

EXIT_DIVERGED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
FAILURE_FILE_ENV = "MEGAGEN_FAILURE_FILE"
"""Set by `megagen launch local`: a rank that fails with bad input writes its exit code to this file
(suffixed with its rank), so the launcher knows not to restart."""


def job_rank() -> tuple[int, int]:
    """(rank, world size) of this process from torchrun's environment (0, 1 when run alone)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def report_error(message: str, rank_local: bool = False, stream=None) -> None:
    """Print `megagen: message` once per job: rank 0 for job-wide errors, the failing rank otherwise."""
    rank, world = job_rank()
    if world > 1 and rank_local:
        message = f"rank {rank}: {message}"
    elif world > 1 and rank != 0:
        return
    stream = stream or sys.stderr
    stream.write(f"megagen: {' '.join(str(message).split())}\n")
    stream.flush()


def record_failure(code: int) -> None:
    """Tell `megagen launch local` that this rank failed in a way a restart cannot mend."""
    path = os.environ.get(FAILURE_FILE_ENV)
    if not path:
        return
    rank, _ = job_rank()
    try:
        Path(f"{path}.rank{rank}").write_text(f"{code}\n")
    except OSError:
        pass


def unrestartable_failure(path: str) -> int | None:
    """The exit code some rank recorded through `record_failure`, if any (and clear the records)."""
    found = None
    for f in Path(path).parent.glob(Path(path).name + ".rank*"):
        try:
            found = int(f.read_text().strip() or EXIT_BAD_INPUT)
        except (OSError, ValueError):
            found = EXIT_BAD_INPUT
        f.unlink(missing_ok=True)
    return found


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def run_reporting_errors(handler, args) -> int:
    """Run a command's handler; known failures become one line (see the module docstring) and an exit
    code; anything else is a bug and keeps its traceback."""
    from megagen.config import ConfigError
    from megagen.data.format import DataError
    from megagen.train.nonfinite import NonFiniteStepError

    try:
        return handler(args)
    except ConfigError as exc:
        report_error(str(exc), rank_local=getattr(exc, "rank_local", False))
        record_failure(EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except DataError as exc:
        report_error(f"data error: {exc}", rank_local=getattr(exc, "rank_local", True))
        record_failure(EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except NonFiniteStepError as exc:  # every rank stops alike; a restart would diverge the same way
        report_error(str(exc))
        record_failure(EXIT_DIVERGED)
        return EXIT_DIVERGED
    except KeyboardInterrupt as exc:
        report_error(str(exc) or "interrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        report_error(f"cannot use{where}: {exc.strerror or exc}", rank_local=True)
        return 1
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report_error(
            f"out of memory ({first}); lower train.micro_batch_size, or use train.recompute / more ranks",
            rank_local=True,
        )
        return 1
