"""`megagen launch slurm --dry-run` renders a script that derives rendezvous, node rank and world size
from a (fake) SLURM allocation; `megagen doctor` runs in one process."""

from __future__ import annotations

import os
import stat
import subprocess

from megagen.cli import main

FAKES = {
    "scontrol": '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-node-7\\ngpu-node-8\\n"\n',
    # /etc/hosts-style trap: the loopback line comes first and must be skipped
    "getent": '#!/bin/bash\nprintf "127.0.1.1 STREAM gpu-node-7\\n10.0.0.7 STREAM gpu-node-7\\n"\n',
    # one task per node, as srun --ntasks-per-node=1 does
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
    'for n in $(seq 0 $((SLURM_NNODES-1))); do SLURM_NODEID=$n "$@"; done\n',
}


def test_slurm_script_derives_rendezvous_rank_and_world(tmp_path, capsys):
    script = tmp_path / "job.sbatch"
    assert (
        main(
            [
                "launch",
                "slurm",
                "examples/configs/video_tiny.yaml",
                "parallel.tp=2",
                "--nodes",
                "2",
                "--gpus-per-node",
                "4",
                "--dry-run",
                "--out",
                str(script),
                "--log-dir",
                str(tmp_path / "logs"),
            ]
        )
        == 0
    )
    assert "#SBATCH --nodes=2" in capsys.readouterr().out
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node-[7-8]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "MEGAGEN_PYTHON": "echo",
    }
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "world size 8, rendezvous 10.0.0.7:29500" in text
    assert "node rank 0" in text and "node rank 1" in text
    for flag in (
        "--nnodes=2",
        "--nproc_per_node=4",
        "--rdzv_endpoint=10.0.0.7:29500",
        "--rdzv_id=4242",
        "--max-restarts=3",
        "megagen train examples/configs/video_tiny.yaml parallel.tp=2",
    ):
        assert flag in text, flag


def test_bad_config_is_refused_before_rendering(capsys):
    assert (
        main(
            [
                "launch",
                "slurm",
                "examples/configs/video_tiny.yaml",
                "parallel.tp=x",
                "--nodes",
                "2",
                "--dry-run",
            ]
        )
        == 2
    )
    assert "parallel.tp" in capsys.readouterr().err


def test_doctor_single_process(tmp_path, capsys):
    assert main(["doctor", "examples/configs/video_tiny.yaml", f"run.dir={tmp_path}"]) == 0
    assert "megagen doctor: 1 process" in capsys.readouterr().out
    assert main(["doctor", "examples/configs/video_tiny.yaml", "data.path=/nonexistent/shards"]) == 1
    assert "cannot see /nonexistent/shards" in capsys.readouterr().out
