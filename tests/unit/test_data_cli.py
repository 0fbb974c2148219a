"""`megagen data synth|pack|check|stats` through argparse: outputs, exit codes, one-line errors."""

import argparse
import json
import os

import numpy as np
import pytest

from megagen.data.cli import add_data_commands, run_data_command
from megagen.data.manifest import load_manifest


def run(*argv):
    parser = argparse.ArgumentParser(prog="megagen")
    sub = parser.add_subparsers(dest="command")
    add_data_commands(sub)
    args = parser.parse_args(["data", *argv])
    assert args.command == "data"
    return run_data_command(args)


def test_synth_check_stats(tmp_path, capsys):
    out = str(tmp_path / "ds")
    assert (
        run(
            "synth",
            "--preset",
            "video_tiny",
            "--out",
            out,
            "--samples",
            "20",
            "--buckets",
            "t4_h8_w8,t1_h16_w16",
            "--seed",
            "1",
            "--shard-mb",
            "0.02",
            "-q",
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"synth {out}: 20 samples in 2 bucket(s)") and "t4_h8_w8: 10" in line
    m = load_manifest(out)
    assert [b.name for b in m.buckets] == ["t4_h8_w8", "t1_h16_w16"] and len(m.buckets[0].shards) > 1

    assert run("check", out) == 0
    assert "OK: 20 samples, 2 bucket(s)" in capsys.readouterr().out

    assert run("stats", out) == 0
    table = capsys.readouterr().out
    assert "t1_h16_w16" in table and "16x4x8x8" in table and "1280" in table  # 20 samples × 64 tokens
    assert run("stats", out, "--json", "--patch", "1,4,4") == 0
    st = json.loads(capsys.readouterr().out)
    assert st["samples"] == 20 and st["buckets"][0]["tokens_per_sample"] == 4 * 2 * 2


def test_check_prints_every_problem_and_fails(tmp_path, capsys):
    out = tmp_path / "ds"
    assert run("synth", "--out", str(out), "--samples", "12", "--shard-mb", "0.02", "-q") == 0
    capsys.readouterr()
    shards = sorted((out / "t4_h8_w8").iterdir())
    os.remove(shards[0])
    with open(shards[1], "r+b") as f:
        f.truncate(100)
    assert run("check", str(out)) == 1
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0] == f"{shards[0]}: shard file is missing" and lines[1].startswith(
        f"{shards[1]}: truncated"
    )
    assert "2 problem(s)" in captured.err


def test_pack_command_and_one_line_errors(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for i in range(4):
        np.save(src / f"lat{i}.npy", np.ones((16, 2, 4, 4), np.float32) * i)
        np.save(src / f"ul2-{i}.npy", np.ones((3, 8), np.float32))
        rows.append(
            {"id": i, "latent": f"lat{i}.npy", "text": {"ul2": f"ul2-{i}.npy"}, "fps": 24, "duration": 1}
        )
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ds"
    assert run("pack", str(src), "--out", str(out), "--max-len", "5") == 0
    stdout = capsys.readouterr().out
    assert "wrote t2_h4_w4/shard-00000.safetensors" in stdout and "packed" in stdout
    assert load_manifest(out).text_encoders["ul2"].max_len == 5
    assert run("check", str(out)) == 0
    capsys.readouterr()

    # a bad sample: one clear line naming the metadata line and the sample, non-zero exit
    rows[2]["text"] = {"ul2": "missing.npy"}
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run("pack", str(src), "--out", str(tmp_path / "ds2")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.npy" in err[0] and err[0].startswith("megagen data pack:")
    (src / "metadata.jsonl").write_text('{"id": 1, "latent": "lat1.npy"}\n')
    assert run("pack", str(src), "--out", str(tmp_path / "ds3")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metadata.jsonl:1 (sample 1)" in err[0] and "'text'" in err[0]

    assert run("stats", str(tmp_path / "nope")) == 1
    assert "does not exist" in capsys.readouterr().err
    assert run("synth", "--out", str(tmp_path / "ds4"), "--buckets", "4x8x8") == 1
    assert "t<T>_h<H>_w<W>" in capsys.readouterr().err


def test_usage_errors(capsys):
    with pytest.raises(SystemExit):
        run("synth", "--out", "x", "--shard-mb", "0")
    assert "must be positive" in capsys.readouterr().err
    parser = argparse.ArgumentParser(prog="megagen")
    add_data_commands(parser.add_subparsers(dest="command"))
    assert run_data_command(parser.parse_args(["data"])) == 2
    assert "pack" in capsys.readouterr().out
