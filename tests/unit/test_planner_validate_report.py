"""`megagen plan --validate`'s report (megagen/plan_validate.py) without running a trainer: exposed seconds
per axis sit beside the exact bytes, are not part of `match`, and print "—" where unmeasurable."""

from __future__ import annotations

import torch

from megagen.plan_validate import _print_table, _report, cluster_for_run

PREDICTED = {
    "comm": {"tp": 1000, "dp_shard_cp": 4000},
    "exposed": {"tp": 0.002, "dp_shard_cp": 0.001},
    "chunks": {"sp_pieces": 2},
    "params": 10,
    "grads": 10,
    "optimizer": 20,
}
MEASURED = {
    "comm": {"tp": 1000, "dp_shard_cp": 4000},
    "exposed": {"tp": 0.05, "dp_shard_cp": None},  # FSDP2 waits on Work handles: not measurable
    "params": 10,
    "grads": 10,
    "optimizer": 20,
}


def test_exposed_seconds_beside_bytes_and_not_part_of_match(capsys):
    report = _report("tp2+sp cp1 fsdp2 mb1 rc:none overlap", PREDICTED, MEASURED, "cpu")
    assert report["match"]  # bytes and state equal; timings differ and do not count
    assert report["exposed_s_per_axis"] == {
        "dp_shard_cp": {"predicted": 0.001, "measured": None},
        "tp": {"predicted": 0.002, "measured": 0.05},
    }
    assert report["cluster"] == "cpu" and report["overlap_chunks"] == {"sp_pieces": 2}
    _print_table(report)
    out = capsys.readouterr().out
    assert "predicted on cpu; chunks: sp_pieces 2" in out
    assert any(line.split() == ["dp_shard_cp", "exposed", "0.0010", "—"] for line in out.splitlines())
    assert any(line.split() == ["tp", "exposed", "0.0020", "0.0500"] for line in out.splitlines())


def test_an_axis_without_collectives_measured_waits_zero():
    measured = {**MEASURED, "exposed": {"tp": 0.05}}
    report = _report("p", {**PREDICTED, "exposed": {"tp": 0.002, "world": 0.0001}}, measured, "cpu")
    assert report["exposed_s_per_axis"]["world"] == {"predicted": 0.0001, "measured": 0.0}


def test_the_prediction_uses_the_run_devices_preset_unless_named():
    assert cluster_for_run("", torch.device("cpu")).name == "cpu"
    assert cluster_for_run("h100", torch.device("cpu")).name == "h100"
