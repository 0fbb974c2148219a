"""torchrun launch: the CLI trains on a mesh; only rank 0 writes metrics, with comm bytes per axis; a rank
killed mid-run is restarted by torchrun and the job resumes from its last checkpoint with identical losses."""

from __future__ import annotations

import json

import pytest

from tests.distributed.torchrun import run_torchrun

pytestmark = pytest.mark.slow


def test_torchrun_trains_and_rank0_logs_comm(tmp_path):
    proc = run_torchrun(
        [
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
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 2/2") == 1, "only rank 0 prints"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["comm_bytes"]["cp"] > 0 and r["comm_bytes"]["dp_shard_cp"] > 0


def _train_with_checkpoints(run_dir, torchrun_args, entry=("-m", "megagen"), crash_at=0):
    """6 tp2 steps with an async checkpoint every 2 (`crash_at`: read by tests/distributed/crash_once.py)."""
    return run_torchrun(
        [
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
        ],
        torchrun_args,
        entry,
        env={"MEGAGEN_TEST_CRASH_AT_STEP": str(crash_at)},
        timeout=300,
    )


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rank_killed_is_restarted_and_resumes_exactly(tmp_path):
    """Rank 1 is SIGKILLed after step 5 (checkpoint at step 4); torchrun --max-restarts 1 restarts both
    ranks, they resume from step 4 and the metrics of steps 1–6 equal an uninterrupted run's, bit for bit."""
    straight = _train_with_checkpoints(tmp_path / "straight", ("--standalone",))
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = _train_with_checkpoints(
        tmp_path / "crashed",
        ("--standalone", "--max-restarts", "1", "--monitor-interval", "0.2"),
        entry=("tests/distributed/crash_once.py",),
        crash_at=5,
    )
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    log = crashed.stdout + crashed.stderr
    assert "resumed from" in log and "step-000004" in log, log[-3000:]
    assert _losses(tmp_path / "crashed") == _losses(tmp_path / "straight")
    assert len(_losses(tmp_path / "straight")) == 6
