"""Under torchrun a job-wide error is printed once (by rank 0), the kernels line too, and `megagen launch
local` does not restart a job that failed on bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.distributed.torchrun import run_torchrun

pytestmark = pytest.mark.slow

EXAMPLE = "examples/configs/video_tiny.yaml"


def test_config_error_printed_once_per_job(tmp_path):
    proc = run_torchrun(["train", EXAMPLE, f"run.dir={tmp_path}", f"data.path={tmp_path}/missing"], nproc=2)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megagen:")]
    assert len(lines) == 1 and "missing" in lines[0], proc.stderr[-3000:]
    ours = re.compile(r'File ".*/(megagen|parallel|kernels)/')  # torchrun's own ChildFailedError is not ours
    assert not ours.search(proc.stderr), proc.stderr[-3000:]


def test_kernels_line_printed_once(tmp_path):
    args = ["train", EXAMPLE, f"run.dir={tmp_path}", "train.steps=1", "metrics.progress=none"]
    proc = run_torchrun([*args, "metrics.tensorboard=false"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("megagen.kernels: kernels:") == 1


def test_launch_local_does_not_restart_bad_input(tmp_path):
    cmd = [sys.executable, "-m", "megagen", "launch", "local", EXAMPLE, "--nproc", "2", "--max-restarts", "2"]
    proc = subprocess.run(
        [*cmd, f"run.dir={tmp_path}", f"data.path={tmp_path}/missing"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "not restarting" in proc.stderr and "restart 1 of" not in proc.stderr
