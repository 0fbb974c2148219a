"""Before a run builds its model: can it write where it must, and may it write into `run.dir`?

A fresh start never silently replaces another run's record.

A run that resumes from a checkpoint continues its own metrics (truncated to the resumed step). A fresh
start into a directory holding another run's metrics.jsonl or TensorBoard events is refused, unless
`run.overwrite=true`, which replaces them (the old event files are removed, so TensorBoard does not draw
two runs as one).
"""

from __future__ import annotations

from pathlib import Path

from megagen.config import ConfigError


def previous_run_files(run_dir: Path) -> list[Path]:
    """The files of an earlier run's record in `run_dir`."""
    files = [run_dir / "metrics.jsonl"] if (run_dir / "metrics.jsonl").is_file() else []
    files = [f for f in files if f.stat().st_size > 0]
    return files + sorted((run_dir / "tb").glob("events.*"))


def claim_run_dir(cfg, resuming: bool) -> None:
    """Refuse (or, with run.overwrite, clear) an earlier run's record before this run starts writing."""
    if resuming:
        return
    run_dir = Path(cfg.run.dir)
    found = previous_run_files(run_dir)
    if not found:
        return
    if not cfg.run.overwrite:
        names = ", ".join(str(f.relative_to(run_dir)) for f in found[:2])
        raise ConfigError(
            "run.dir",
            f"{run_dir} already holds a run ({names}) and no checkpoint to resume from: use a new run.dir, "
            "or run.overwrite=true to replace it",
        )
    for f in found:
        if f.parent.name == "tb":
            f.unlink(missing_ok=True)


def check_before_build(cfg, single_process: bool) -> None:
    """Every check a run can make from the config and the filesystem alone, before a weight exists: the
    directories it writes (one process; under torchrun the pre-flight checks every rank), the checkpoint
    it starts from, and its claim on run.dir."""
    from megagen.checkpoint import checkpoint_dir
    from megagen.checkpoint import preflight as checkpoint_preflight
    from megagen.checkpoint.hooks import resume_target
    from megagen.fsutil import ensure_writable_dir

    if single_process:
        ensure_writable_dir(cfg.run.dir, "run.dir")
        if cfg.checkpoint.every > 0:
            ensure_writable_dir(checkpoint_dir(cfg), "checkpoint.dir")
    checkpoint_preflight(cfg)  # a bad resume / init_from path fails before the model is built
    claim_run_dir(cfg, resuming=resume_target(cfg, checkpoint_dir(cfg)) is not None)
