"""Per-step metrics to stdout (progress bar on a TTY, plain lines otherwise), JSON lines and TensorBoard."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("megagen")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class MetricsLogger:
    """Writes one record per step to every enabled sink. Only rank 0 should construct an enabled one."""

    SHOWN = ("loss", "eval_loss", "grad_norm", "lr", "tokens_per_s", "step_time_s")

    def __init__(
        self,
        run_dir: str | Path | None,
        total_steps: int,
        jsonl: bool = True,
        tensorboard: bool = True,
        progress: str = "auto",
        log_every: int = 1,
        stream=None,
        resume: bool = False,
        resume_step: int = 0,
    ):
        self.total, self.log_every = total_steps, log_every
        self.stream = stream or sys.stdout
        self._first_step = resume_step
        self._last_eval = None
        self.enabled = run_dir is not None
        self._jsonl = None
        self._tb = None
        if progress == "auto":
            progress = "bar" if self.stream.isatty() else "lines"
        self.progress = progress if self.enabled else "none"
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            path = run_dir / "metrics.jsonl"
            if resume and path.exists():
                _truncate_after(path, resume_step)
            self._jsonl = open(path, "a" if resume else "w", encoding="utf-8")
        if tensorboard:
            self._tb = _open_tensorboard(run_dir / "tb")
        self._t0 = time.perf_counter()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
                elif isinstance(v, dict):
                    for sub, sv in v.items():
                        if isinstance(sv, (int, float)):
                            self._tb.add_scalar(f"{k}/{sub}", sv, step)
        self._print(step, metrics)

    def _print(self, step: int, metrics: dict[str, Any]) -> None:
        if "eval_loss" in metrics:
            self._last_eval = metrics["eval_loss"]
        elif self._last_eval is not None:  # keep the latest held-out loss in view between evaluations
            metrics = {**metrics, "eval_loss": self._last_eval}
        shown = " ".join(f"{k}={_fmt(metrics[k])}" for k in self.SHOWN if k in metrics)
        if self.progress == "bar":
            done = int(30 * step / max(1, self.total))
            eta = self._eta(step)
            self.stream.write(f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{self.total} {eta}{shown}")
            if step >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif self.progress == "lines" and (step % self.log_every == 0 or step >= self.total):
            self.stream.write(f"step {step}/{self.total} {shown}\n")
            self.stream.flush()

    def _eta(self, step: int) -> str:
        """`ETA 1:02:03 ` from the mean time of the steps this process ran ('' before the first)."""
        if step <= self._first_step or step >= self.total:
            return ""
        per_step = (time.perf_counter() - self._t0) / (step - self._first_step)
        seconds = int(per_step * (self.total - step))
        return f"ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} "

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _truncate_after(path: Path, step: int) -> None:
    """Drop records of steps after `step`: a run resumed from a checkpoint logs those steps again, and every
    step must appear exactly once."""
    kept = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


def _open_tensorboard(path: Path):
    """A SummaryWriter, or None with one log line when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        log.warning("tensorboard not available (%s): TensorBoard logging disabled", exc)
        return None
    return SummaryWriter(str(path))
