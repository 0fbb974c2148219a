"""Two "nodes" on one machine: two torchrun invocations (--nnodes 2, c10d rendezvous on 127.0.0.1,
2 processes each) train fsdp2×tp2 and match the one-process run step for step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from megagen.config import load_config
from megagen.train import train

pytestmark = pytest.mark.slow

MESH = ["parallel.tp=2"]
OVERRIDES = [
    "train.steps=3",
    "train.micro_batch_size=2",
    "metrics.tensorboard=false",
    "metrics.progress=none",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_loopback_match_one_process(tmp_path):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "two-nodes"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "2",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "megagen-test",
                "-m",
                "megagen",
                "train",
                "examples/configs/video_tiny.yaml",
                *MESH,
                *OVERRIDES,
                f"run.dir={run_dir}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outputs[0][-3000:] + outputs[1][-3000:]
    got = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref = train(load_config("examples/configs/video_tiny.yaml", [*OVERRIDES, f"run.dir={tmp_path / 'one'}"]))
    assert len(got) == 3
    for a, b in zip(got, ref.losses):
        assert a == pytest.approx(b, rel=1e-5)
