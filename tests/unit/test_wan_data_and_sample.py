"""The wan spec's fields through the data tools (`data synth --preset wan_tiny`, `data pack`) and training
from the written dataset, and `megagen sample` on the wan tiny config."""

from __future__ import annotations

import argparse
import json

import numpy as np

from megagen.config import load_config
from megagen.data.cli import add_data_commands, run_data_command
from megagen.data.manifest import load_manifest
from megagen.data.spec_fields import field_mismatches
from megagen.sample import add_sample_command, run_sample_command
from megagen.specs import get_spec

EXAMPLE = "examples/configs/wan_tiny.yaml"


def data(*argv) -> int:
    parser = argparse.ArgumentParser(prog="megagen")
    add_data_commands(parser.add_subparsers(dest="command"))
    return run_data_command(parser.parse_args(["data", *argv]))


def sample(*argv) -> int:
    parser = argparse.ArgumentParser(prog="megagen")
    add_sample_command(parser.add_subparsers(dest="command"))
    return run_sample_command(parser.parse_args(["sample", *argv]))


def test_synth_wan_tiny_fits_the_spec_and_trains(tmp_path):
    out = tmp_path / "ds"
    assert data("synth", "--preset", "wan_tiny", "--out", str(out), "--samples", "8", "-q") == 0
    manifest = load_manifest(str(out))
    assert (
        manifest.spec == "wan" and manifest.latent_channels == 16 and list(manifest.text_encoders) == ["umt5"]
    )
    cfg = load_config(EXAMPLE, [])
    assert field_mismatches(manifest, get_spec("wan").sample_shapes(cfg)) == []

    from megagen.train.loop import Trainer

    run_cfg = load_config(
        EXAMPLE,
        [
            f"data.path={out}",
            "data.num_workers=0",
            "data.loader=torch",
            "train.steps=2",
            "train.global_batch_size=2",
            "train.micro_batch_size=1",
            f"run.dir={tmp_path / 'run'}",
            "metrics.progress=none",
            "metrics.tensorboard=false",
        ],
    )
    losses = []
    Trainer(run_cfg).run(on_step_end=lambda t, s: losses.append(s))
    assert len(losses) == 2


def test_pack_writes_umt5_embeddings_the_spec_reads(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for i in range(3):
        np.save(src / f"lat{i}.npy", np.full((16, 2, 4, 4), float(i), np.float32))
        np.save(src / f"umt5-{i}.npy", np.ones((3 + i, 32), np.float32))
        rows.append(
            {"id": i, "latent": f"lat{i}.npy", "text": {"umt5": f"umt5-{i}.npy"}, "fps": 16, "duration": 1}
        )
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ds"
    assert data("pack", str(src), "--out", str(out), "--spec", "wan", "--max-len", "8") == 0
    manifest = load_manifest(str(out))
    assert manifest.spec == "wan" and manifest.text_encoders["umt5"].dim == 32
    assert field_mismatches(manifest, get_spec("wan").sample_shapes(load_config(EXAMPLE, []))) == []


def test_sample_command_runs_wan(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "p.npz", **{"text.umt5": rng.standard_normal((2, 5, 32)).astype(np.float32)})
    out = tmp_path / "out"
    argv = [EXAMPLE, "--prompt-embeddings", str(tmp_path / "p.npz"), "--steps", "3", "--cfg", "4"]
    assert sample(*argv, "--out", str(out), "--seed", "1") == 0
    assert "wan/tiny, 3 steps" in capsys.readouterr().out
    latents = np.load(out / "latents.npy")
    assert latents.shape == (2, 16, 4, 8, 8) and np.isfinite(latents).all()
