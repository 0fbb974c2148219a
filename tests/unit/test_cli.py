"""The command line: help text, bad overrides exit non-zero with one line naming the key."""

import subprocess
import sys

import pytest

from megagen.cli import main

EXAMPLE = "examples/configs/video_tiny.yaml"


@pytest.mark.parametrize(
    "override, key",
    [("parallel.tp=abc", "parallel.tp"), ("model.preset=nope", "model.preset"), ("nope.key=1", "nope.key")],
)
def test_bad_override_exits_nonzero_naming_key(capsys, override, key):
    assert main(["train", EXAMPLE, override]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0]


def test_help_describes_commands_and_key_groups(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for group in ("run.", "model.", "parallel.", "data.", "optim.", "train.", "checkpoint.", "metrics."):
        assert group in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "specs", "config"):
        assert command in out


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megagen",
            "train",
            EXAMPLE,
            "train.steps=2",
            f"run.dir={tmp_path}",
            "metrics.tensorboard=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_specs_lists_video(capsys):
    assert main(["specs"]) == 0
    assert "video" in capsys.readouterr().out
