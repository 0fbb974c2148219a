"""torchrun launch: the CLI trains on a mesh; only rank 0 writes metrics, with comm bytes per axis."""

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
