"""The rules the planner and the engine share (parallel/overlap_schedule.py): Ulysses' head chunks, and
what `parallel.overlap=auto` means on each device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megagen.parallel.overlap_schedule import MAX_HEAD_CHUNKS, overlap_on, ulysses_head_chunks

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples/configs/video_tiny.yaml")


def test_no_pipelining_without_cp_or_with_few_heads():
    assert ulysses_head_chunks(8, 1, 4096, 64) == 1
    assert ulysses_head_chunks(2, 2, 4096, 64) == 1  # one head per rank: nothing to split
    assert ulysses_head_chunks(3, 2, 4096, 64) == 1  # heads do not split over cp


def test_tiny_messages_stay_one_all_to_all():
    assert ulysses_head_chunks(8, 2, 16, 64) == 1


def test_large_messages_pipeline_in_groups_that_split_over_cp():
    chunks = ulysses_head_chunks(16, 2, 4096, 64)
    assert 1 < chunks <= MAX_HEAD_CHUNKS
    assert (16 // 2) % chunks == 0
    assert ulysses_head_chunks(12, 2, 4096, 64) == 3  # 6 heads per rank: 4 does not divide, 3 does


def test_cpu_keeps_one_stacked_all_to_all():
    """gloo's all-to-all runs on the cores attention uses: no head groups on CPU, whatever the size."""
    assert ulysses_head_chunks(16, 2, 4096, 64, "cuda") > 1
    assert ulysses_head_chunks(16, 2, 4096, 64, "cpu") == 1


def test_overlap_auto_is_on_for_cuda_and_off_on_cpu_and_explicit_settings_win():
    assert overlap_on("auto", "cuda") and not overlap_on("auto", "cpu")
    assert overlap_on(True, "cpu") and not overlap_on(False, "cuda")


@pytest.mark.parametrize("setting, engine_overlaps", [("auto", False), ("true", True), ("false", False)])
def test_the_engine_decides_auto_by_its_device(tmp_path, setting, engine_overlaps):
    """cp2 on torch's fake process group, in a fresh process: what the CPU engine builds."""
    code = f"""
import json
from megagen.config import load_config
from megagen.parallel.context_parallel import ContextParallelAttention
from megagen.rehearse import QUIET, start_fake_world
from megagen.runtime_setup import distributed_runtime
from megagen.train.loop import Trainer

start_fake_world(2, 0)
overrides = ["parallel.cp=2", "parallel.overlap={setting}", *QUIET, "train.steps=1", "run.dir={tmp_path}"]
cfg = load_config({EXAMPLE!r}, overrides)
trainer = Trainer(cfg, distributed_runtime(cfg), weights="draw")
cores = [m.overlap for m in trainer.model.modules() if isinstance(m, ContextParallelAttention)]
print(json.dumps({{"runtime": trainer.runtime.overlap, "cores": cores}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = json.loads(ran.stdout.strip().splitlines()[-1])
    assert got["runtime"] == engine_overlaps and got["cores"] and set(got["cores"]) == {engine_overlaps}


@pytest.mark.parametrize("setting, launch_overlaps", [("auto", True), ("true", True), ("false", False)])
def test_a_rehearsal_decides_auto_as_the_gpu_launch_does(setting, launch_overlaps):
    from megagen.planning import plan_point_for_config
    from megagen.rehearse import LAUNCH_DEVICE, rehearsal_config

    cfg = rehearsal_config(EXAMPLE, [f"parallel.overlap={setting}", "parallel.cp=2"], steps=1)
    assert cfg.parallel.overlap is launch_overlaps
    assert plan_point_for_config(cfg, 2, LAUNCH_DEVICE).overlap is launch_overlaps
