"""What the commands say: plan's header, rows and legend; the progress bar's ETA and held-out loss; the
loader choice and the run directory logged."""

from __future__ import annotations

import io
import logging

from megagen.cli import main


def test_plan_for_a_config_reads_its_size_and_batch_and_lists_each_plan_once(capsys):
    assert main(["plan", "--config", "examples/configs/video_tiny.yaml", "--top", "50"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert " K params" in out[0] and "0.00 B" not in out[0], out[0]
    assert "global batch 8" in out[0], "the config's global batch, not gpus/8"
    rows = [line.split("  ")[0].strip() for line in out[2:] if line[:2] == "tp"]
    assert rows and len(rows) == len(set(rows)), rows
    assert not any(r.endswith("rc:full0") for r in rows), "full recompute of 0 blocks is `none`"
    assert any(line.startswith("columns: plan = ") for line in out), "the table has a legend"


def test_progress_bar_shows_eta_and_keeps_the_eval_loss():
    from megagen.metrics.logger import MetricsLogger

    stream = io.StringIO()
    logger = MetricsLogger(
        "/tmp/megagen-bar-test", 4, jsonl=False, tensorboard=False, progress="bar", stream=stream
    )
    logger.log(1, {"loss": 1.0, "eval_loss": 0.5})
    logger.log(2, {"loss": 0.9})
    logger.close()
    second = stream.getvalue().split("\r")[-1]
    assert "ETA 0:00:" in second and "eval_loss=0.5" in second, second


def test_auto_loader_choice_and_run_dir_are_logged(tmp_path, caplog):
    from megagen.config import load_config
    from megagen.data.loaders import dali_available
    from megagen.data.synth import synth
    from megagen.train import train

    synth(tmp_path / "ds", preset="video_tiny", samples=32, seed=0, buckets="t4_h8_w8")
    cfg = load_config(
        "examples/configs/video_tiny.yaml",
        [
            f"run.dir={tmp_path / 'run'}",
            f"data.path={tmp_path / 'ds'}",
            "train.steps=1",
            "metrics.progress=none",
        ],
    )
    with caplog.at_level(logging.INFO, logger="megagen"):
        train(cfg).runtime.close()
    text = caplog.text
    assert ("using the DALI loader" if dali_available() else "using the torch loader") in text
    assert f"run written to {(tmp_path / 'run').resolve()}" in text
