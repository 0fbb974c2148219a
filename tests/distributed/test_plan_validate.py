"""`megagen plan --validate` on a 2-rank gloo run reports predicted beside measured exposed communication
per axis (timings are not asserted: only that the keys are there, predicted on the cpu preset) while the
bytes still match exactly."""

from __future__ import annotations

import json

import pytest

from tests.distributed.torchrun import run_torchrun

pytestmark = pytest.mark.slow

MESHES = {
    "tp2-overlap": ["parallel.tp=2", "parallel.overlap=true"],
    "cp2-ulysses-overlap": ["parallel.cp=2", "parallel.cp_kind=ulysses", "parallel.overlap=true"],
}


@pytest.mark.parametrize("overrides", MESHES.values(), ids=MESHES.keys())
def test_validate_reports_exposed_time_per_axis(tmp_path, overrides):
    args = ["plan", "--validate", "examples/configs/video_tiny.yaml", "--json", *overrides]
    proc = run_torchrun([*args, f"run.dir={tmp_path}", "train.global_batch_size=4"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 prints one JSON document
    assert report["match"], report["bytes_per_axis"]
    assert report["cluster"] == "cpu" and "overlap" in report["plan"]
    exposed = report["exposed_s_per_axis"]
    axis = "tp" if "parallel.tp=2" in overrides else "cp"
    assert set(report["bytes_per_axis"]) <= set(exposed) and axis in exposed
    for v in exposed.values():
        assert v["predicted"] >= 0.0
        assert v["measured"] is None or v["measured"] >= 0.0
    assert exposed[axis]["measured"] is not None  # functional collectives: their waits are timed
    assert report["overlap_chunks"]  # the schedule the prediction assumed
