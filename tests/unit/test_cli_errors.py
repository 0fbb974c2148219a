"""Bad input ends in one line naming the key, path or rank, a documented exit code, and no traceback.

Cases call the console entry point's `main` in this process (a traceback would escape it and fail the
test); Ctrl-C runs the real command in a subprocess. Working directories are temporary, so nothing here
depends on the checkout's own runs/ or data/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples/configs/video_tiny.yaml")
QUIET = ["metrics.progress=none", "metrics.tensorboard=false"]


def megagen(args: list[str], cwd: Path, timeout: float = 120, env: dict | None = None):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "megagen", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=full_env,
    )


def error_lines(stderr: str) -> list[str]:
    """stderr without log lines (timestamped INFO/WARNING records)."""
    return [line for line in stderr.splitlines() if line.strip() and not line[:4].isdigit()]


def assert_one_line_error(proc, *needles: str, code: int = 2) -> str:
    lines = error_lines(proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


class Ran:
    """What `run_main` saw: exit code, stdout, stderr."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(args: list[str], capsys, cwd: Path, monkeypatch) -> Ran:
    from megagen.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    out = capsys.readouterr()
    return Ran(code, out.out, out.err)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """A small video and audio dataset, a truncated and a corrupt copy of the video one, an empty dir."""
    root = tmp_path_factory.mktemp("cli-errors")
    for preset, name in (("video_tiny", "video"), ("audio_tiny", "audio")):
        proc = megagen(
            ["data", "synth", "--preset", preset, "--out", str(root / name), "--samples", "64", "-q"], root
        )
        assert proc.returncode == 0, proc.stderr
    shard = next((root / "video").glob("t4_h8_w8/*.safetensors"))
    for kind in ("truncated", "corrupt"):
        copy = root / kind
        subprocess.run(["cp", "-r", str(root / "video"), str(copy)], check=True)
        target = copy / shard.relative_to(root / "video")
        data = bytearray(target.read_bytes())
        if kind == "truncated":
            target.write_bytes(bytes(data[:1000]))
        else:
            data[3] = 0xFF  # an implausible header length
            target.write_bytes(bytes(data))
    (root / "empty").mkdir()
    return root


TRAIN_CASES = {
    "missing data.path": (["data.path={root}/nope"], ["data", "nope"]),
    "empty data dir": (["data.path={root}/empty"], ["empty", "manifest"]),
    "truncated shard": (["data.path={root}/truncated"], ["truncated", "shard-00000.safetensors"]),
    "corrupt shard": (["data.path={root}/corrupt"], ["corrupt", "shard-00000.safetensors"]),
    "video config on audio data": (["data.path={root}/audio"], ["audio", "latents"]),
    "unwritable checkpoint.dir": (
        ["checkpoint.dir=/proc/megagen-x", "checkpoint.every=1"],
        ["checkpoint.dir"],
    ),
    "unwritable run.dir": (["run.dir=/proc/megagen-y"], ["run.dir"]),
    "empty run.dir": (["run.dir="], ["run.dir"]),
    "nan lr": (["optim.lr=nan"], ["optim.lr"]),
    "nccl without CUDA": (["parallel.backend=nccl"], ["parallel.backend", "CUDA"]),
    "impossible micro-batch": (
        ["train.micro_batch_size=1000000", "train.global_batch_size=1000000"],
        ["train.micro_batch_size"],
    ),
    "profile steps reversed": (["metrics.profile_steps=5,2"], ["metrics.profile_steps"]),
}


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_train_bad_input_is_one_line(name, datasets, tmp_path, capsys, monkeypatch):
    overrides, needles = TRAIN_CASES[name]
    if name == "nccl without CUDA":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    overrides = [o.format(root=datasets) for o in overrides]
    args = ["train", EXAMPLE, "train.steps=1", f"run.dir={tmp_path / 'run'}", *QUIET, *overrides]
    assert_one_line_error(run_main(args, capsys, tmp_path, monkeypatch), *needles)


@pytest.mark.parametrize(
    "text, needle",
    [("run:\n  dir: [a, b\n", "line"), ("train:\n  steps: 2\n\tbad: 1\n", "YAML")],
    ids=["truncated", "malformed"],
)
def test_bad_yaml_names_the_file(tmp_path, text, needle, capsys, monkeypatch):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert_one_line_error(run_main(["train", str(path)], capsys, tmp_path, monkeypatch), "bad.yaml", needle)


def test_config_that_is_a_directory(tmp_path, capsys, monkeypatch):
    proc = run_main(["train", str(tmp_path)], capsys, tmp_path, monkeypatch)
    assert_one_line_error(proc, "is a directory")


def test_train_without_config_asks_for_config_alone(tmp_path, capsys, monkeypatch):
    proc = run_main(["train"], capsys, tmp_path, monkeypatch)
    assert proc.returncode == 2
    assert "CONFIG" in proc.stderr and "OVERRIDE" not in proc.stderr.splitlines()[-1]


def test_help_lists_each_command_once(tmp_path, capsys, monkeypatch):
    out = run_main(["--help"], capsys, tmp_path, monkeypatch).stdout
    for command in ("train", "bench", "doctor", "launch", "plan"):
        assert len([line for line in out.splitlines() if line.strip().startswith(command + " ")]) == 1, out


def test_every_option_of_every_command_has_help():
    import argparse

    from megagen.cli import _parser

    def parsers(p, path):
        yield path, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from parsers(sub, f"{path} {name}")

    for path, p in parsers(_parser(), "megagen"):
        for action in p._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help, f"{path} {action.option_strings[0]} has no help text"


def test_slurm_without_sbatch_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, and no sbatch
    proc = run_main(["launch", "slurm", EXAMPLE, "--nodes", "1"], capsys, tmp_path, monkeypatch)
    assert_one_line_error(proc, "sbatch")


@pytest.mark.parametrize(
    "args, needle",
    [(["parallel.tp=3"], "parallel"), (["parallel.tp=16", "--gpus-per-node", "8"], "parallel.tp")],
    ids=["tp3-heads", "tp16-beyond-node"],
)
def test_slurm_dry_run_validates_the_mesh(tmp_path, args, needle, capsys, monkeypatch):
    argv = ["launch", "slurm", EXAMPLE, *args, "--nodes", "2", "--dry-run"]
    proc = run_main(argv, capsys, tmp_path, monkeypatch)
    assert_one_line_error(proc, needle)


def test_doctor_fails_on_an_empty_dataset_and_says_so(datasets, tmp_path, capsys, monkeypatch):
    def doctor(data):
        return run_main(
            ["doctor", EXAMPLE, f"data.path={data}", f"run.dir={tmp_path}"], capsys, tmp_path, monkeypatch
        )

    proc = doctor(datasets / "empty")
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1].startswith("megagen doctor: FAILED"), proc.stdout
    ok = doctor(datasets / "video")
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1] == "megagen doctor: OK", ok.stdout
    assert len(ok.stdout.splitlines()) > 2, "the report lists its checks"


def test_bench_leaves_the_configs_run_dir_alone(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "finished"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("sentinel\n")
    config = tmp_path / "cfg.yaml"
    config.write_text(Path(EXAMPLE).read_text().replace("dir: runs/video_tiny", f"dir: {run_dir}"))
    proc = run_main(
        ["bench", str(config), "--steps", "1", "--warmup", "0", "--json"], capsys, tmp_path, monkeypatch
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / "config.yaml").read_text() == "sentinel\n"
    assert (tmp_path / "finished-bench" / "config.yaml").exists()
    assert '"dp_shard": 1' in proc.stdout, "the mesh is reported resolved"


@pytest.mark.slow
def test_ctrl_c_reports_where_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", EXAMPLE, "train.steps=100000", f"run.dir={run_dir}", *QUIET, "checkpoint.every=2"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megagen", *args],
        cwd=tmp_path,
        env=full_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("step-*/COMPLETE")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    lines = error_lines(err)
    assert "Traceback" not in err and len(lines) == 1, lines
    assert "interrupted at step" in lines[0] and "resumes from" in lines[0] and "step-" in lines[0], lines[0]


def test_fresh_run_into_a_finished_run_dir_is_refused(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    args = ["train", EXAMPLE, "train.steps=1", f"run.dir={run_dir}", "metrics.progress=none"]
    assert run_main(args, capsys, tmp_path, monkeypatch).returncode == 0
    before = (run_dir / "metrics.jsonl").read_text()
    assert_one_line_error(run_main(args, capsys, tmp_path, monkeypatch), "run.dir", "run.overwrite=true")
    assert (run_dir / "metrics.jsonl").read_text() == before, "nothing of the finished run was touched"
    assert run_main([*args, "run.overwrite=true"], capsys, tmp_path, monkeypatch).returncode == 0
    assert len(list((run_dir / "tb").glob("events.*"))) == 1, "the old TensorBoard events were replaced"


def test_ctrl_c_as_a_save_starts_lets_it_finish_then_stops(tmp_path, capsys, monkeypatch):
    """The Ctrl-C lands inside the step-2 save: that save completes and is the resume point."""
    from megagen.checkpoint.layout import step_name
    from megagen.checkpoint.manager import CheckpointManager
    from megagen.checkpoint.verify import read_meta, verify_files

    real_save = CheckpointManager.save

    def save_with_ctrl_c(self, state, meta, step, wait=False):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(self, state, meta, step, wait)

    monkeypatch.setattr(CheckpointManager, "save", save_with_ctrl_c)
    run_dir = tmp_path / "run"
    args = ["train", EXAMPLE, "train.steps=6", f"run.dir={run_dir}", *QUIET, "checkpoint.every=2"]
    ran = run_main(args, capsys, tmp_path, monkeypatch)
    assert ran.returncode == 130, ran.stderr[-2000:]
    line = error_lines(ran.stderr)[-1]
    assert "interrupted at step 2" in line and step_name(2) in line, line
    saved = run_dir / "checkpoints" / step_name(2)
    assert (saved / "COMPLETE").exists(), sorted(p.name for p in saved.parent.iterdir())
    verify_files(saved, read_meta(saved, "checkpoint.dir"), "checkpoint.dir")  # every file's checksum


def test_a_second_ctrl_c_stops_at_once():
    from megagen.train.interrupt import interrupts_held

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("held")
            os.kill(os.getpid(), signal.SIGINT)
            reached.append("not reached")
    assert reached == ["held"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_a_checkpoint_save_is_still_an_interrupt():
    """DCP wraps a KeyboardInterrupt raised while it writes into a CheckpointException (a BaseException)."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from megagen.train.interrupt import was_interrupted

    wrapped = CheckpointException("save failed", {0: (KeyboardInterrupt(), traceback.StackSummary())})
    assert was_interrupted(wrapped) and was_interrupted(KeyboardInterrupt())
    try:  # a torch.save cut short fails again as it closes: the RuntimeError's context is the Ctrl-C
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("unexpected pos 46 vs 0")  # noqa: B904 - as torch's zip writer does
    except RuntimeError as closing:
        cut_short = CheckpointException("save failed", {0: (closing, traceback.StackSummary())})
    assert was_interrupted(cut_short)
    other = CheckpointException("save failed", {0: (OSError("disk full"), traceback.StackSummary())})
    assert not was_interrupted(other) and not was_interrupted(ValueError("x"))
