"""torchrun launch: the CLI trains on a mesh; only rank 0 writes metrics, with comm bytes per axis; a rank
killed mid-run is restarted by torchrun and the job resumes from its last checkpoint with identical losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_torchrun_trains_and_rank0_logs_comm(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "megagen",
        "train",
        "examples/configs/video_tiny.yaml",
        "parallel.cp=2",
        "parallel.cp_kind=ulysses",
        "train.steps=2",
        "metrics.comm=true",
        "metrics.tensorboard=false",
        "metrics.progress=lines",
        f"run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 2/2") == 1, "only rank 0 prints"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["comm_bytes"]["cp"] > 0 and r["comm_bytes"]["dp_shard_cp"] > 0


def _torchrun(tmp_path, run_dir, extra_args, overrides, entry=("-m", "megagen"), crash_at=0):
    from megagen.launch_cli import launch_env

    env = {**launch_env(), "OMP_NUM_THREADS": "1", "MEGAGEN_TEST_CRASH_AT_STEP": str(crash_at)}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        *extra_args,
        *entry,
        "train",
        "examples/configs/video_tiny.yaml",
        "parallel.tp=2",
        "train.steps=6",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "checkpoint.every=2",
        "checkpoint.async_save=true",
        "metrics.tensorboard=false",
        "metrics.progress=none",
        f"run.dir={run_dir}",
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=os.getcwd())


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rank_killed_is_restarted_and_resumes_exactly(tmp_path):
    """Rank 1 is SIGKILLed after step 5 (checkpoint at step 4); torchrun --max-restarts 1 restarts both
    ranks, they resume from step 4 and the metrics of steps 1–6 equal an uninterrupted run's, bit for bit."""
    straight = _torchrun(tmp_path, tmp_path / "straight", ["--standalone"], [])
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = _torchrun(
        tmp_path,
        tmp_path / "crashed",
        ["--standalone", "--max-restarts", "1", "--monitor-interval", "0.2"],
        [],
        entry=("tests/distributed/crash_once.py",),
        crash_at=5,
    )
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    log = crashed.stdout + crashed.stderr
    assert "resumed from" in log and "step-000004" in log, log[-3000:]
    assert _losses(tmp_path / "crashed") == _losses(tmp_path / "straight")
    assert len(_losses(tmp_path / "straight")) == 6
