"""`megagen sample`: sources (config, checkpoint, exported weights), prompt files, outputs, refusals."""

from __future__ import annotations

import argparse
import collections
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from megagen.config import ConfigError, load_config
from megagen.sample import add_sample_command, run_sample_command
from megagen.sample_inputs import make_batch, read_prompt_file
from megagen.sample_model import load_model
from megagen.specs import get_spec

EXAMPLE = "examples/configs/video_tiny.yaml"
WIDTHS = {"ul2": 24, "byt5": 16, "metaclip": 12}  # the tiny video preset's text encoders


def prompts(batch: int | None = 2, tokens: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    return {
        f"text.{n}": rng.standard_normal((*lead, tokens, w)).astype(np.float32) for n, w in WIDTHS.items()
    }


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="megagen")
    add_sample_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["sample", *argv])


def direct(model, cfg, arrays, steps, cfg_scale, seed) -> torch.Tensor:
    """What the command must produce: the spec's sampler on the same batch and noise seed."""
    spec = get_spec(cfg.model.spec)
    batch = make_batch(spec, cfg, {k: torch.as_tensor(v) for k, v in arrays.items()})
    return spec.sample(model, cfg, batch, steps, cfg_scale, torch.Generator().manual_seed(seed))


def test_sample_from_config_writes_npy_safetensors_and_record(tmp_path, capsys):
    arrays = prompts()
    np.savez(tmp_path / "p.npz", **arrays)
    out = tmp_path / "out"
    argv = [EXAMPLE, "--prompt-embeddings", str(tmp_path / "p.npz"), "--steps", "3", "--cfg", "4"]
    assert run_sample_command(parse([*argv, "--out", str(out), "--seed", "7"])) == 0
    assert "video/tiny, 3 steps, cfg 4.0" in capsys.readouterr().out
    npy = np.load(out / "latents.npy")
    assert npy.shape == (2, 16, 4, 8, 8) and npy.dtype == np.float32
    assert np.array_equal(load_file(str(out / "latents.safetensors"))["latents"].numpy(), npy)
    record = json.loads((out / "sample.json").read_text())
    assert record["steps"] == 3 and record["cfg_scale"] == 4.0 and record["seed"] == 7
    assert record["spec"] == "video" and record["shape"] == [2, 16, 4, 8, 8]

    cfg, _, model, _ = load_model(EXAMPLE)
    assert torch.equal(torch.from_numpy(npy), direct(model, cfg, arrays, 3, 4.0, 7))

    with pytest.raises(ConfigError, match="--overwrite"):
        run_sample_command(parse([*argv, "--out", str(out)]))
    assert run_sample_command(parse([*argv, "--out", str(out), "--overwrite", "--steps", "1"])) == 0
    assert json.loads((out / "sample.json").read_text())["steps"] == 1


def test_prompt_file_formats_and_single_prompt_agree(tmp_path):
    """One prompt without a batch dim, in .safetensors, .npz and dict .npy, with overrides for the shape."""
    arrays = prompts(batch=None)
    save_file({k: torch.from_numpy(v) for k, v in arrays.items()}, str(tmp_path / "p.safetensors"))
    np.savez(tmp_path / "p.npz", **arrays)
    np.save(tmp_path / "p.npy", arrays)
    outs = []
    for suffix in ("safetensors", "npz", "npy"):
        out = tmp_path / suffix
        argv = [EXAMPLE, "data.latent_frames=2", "--prompt-embeddings", str(tmp_path / f"p.{suffix}")]
        assert run_sample_command(parse([*argv, "--steps", "1", "--out", str(out)])) == 0
        outs.append(np.load(out / "latents.npy"))
    assert outs[0].shape == (1, 16, 2, 8, 8)
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_text_valid_masks_and_latent_shape(tmp_path):
    arrays = prompts(batch=1)
    arrays["text_valid.ul2"] = np.array([[True, True, True, False, False]])
    cfg, spec, _, _ = load_model(EXAMPLE)
    batch = make_batch(spec, cfg, {k: torch.as_tensor(v) for k, v in arrays.items()}, (16, 2, 4, 6))
    assert batch["latents"].shape == (1, 16, 2, 4, 6)
    assert batch["text_valid.ul2"].dtype == torch.bool
    assert batch["text_valid.byt5"].all() and batch["text_valid.byt5"].shape == (1, 5)  # filled in


def test_npy_pickles_other_than_arrays_are_refused(tmp_path):
    np.save(tmp_path / "p.npy", {"text.ul2": collections.Counter("ab")}, allow_pickle=True)
    with pytest.raises(ConfigError, match="refusing to load collections.Counter"):
        read_prompt_file(tmp_path / "p.npy")


@pytest.mark.parametrize(
    "drop, change, match",
    [
        ("text.byt5", {}, r"missing \['text.byt5'\]"),
        (None, {"text.ul2": np.zeros((2, 5, 7), np.float32)}, r"text.ul2 has per-sample shape \(5, 7\)"),
        (None, {"text.ul2": np.zeros((3, 5, 24), np.float32)}, "disagree on the batch size"),
        (None, {"text.ul2": np.zeros((5, 24), np.float32)}, "lack the batch dimension"),
    ],
)
def test_bad_prompt_files_name_the_problem(tmp_path, drop, change, match):
    arrays = {k: v for k, v in prompts().items() if k != drop}
    arrays.update(change)
    np.savez(tmp_path / "p.npz", **arrays)
    argv = [EXAMPLE, "--prompt-embeddings", str(tmp_path / "p.npz"), "--out", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match=match) as info:
        run_sample_command(parse(argv))
    assert info.value.key == "--prompt-embeddings"
    assert not (tmp_path / "o").exists()


def test_weights_file_with_foreign_dotted_spec_is_not_imported(tmp_path):
    cfg = load_config(EXAMPLE)
    model = get_spec("video").build(cfg)
    tree = {"model": {"spec": "evil_module_never_imported:SPEC", "preset": "tiny"}}
    header = {"spec": "evil_module_never_imported:SPEC", "config": json.dumps(tree)}
    save_file(dict(model.state_dict()), str(tmp_path / "w.safetensors"), metadata=header)
    with pytest.raises(ConfigError, match="imports code only when you name it") as info:
        load_model(str(tmp_path / "w.safetensors"))
    assert info.value.key == "model.spec" and "evil_module_never_imported" not in sys.modules


def test_checkpoint_and_exported_weights_give_the_trained_model(tmp_path):
    """Train 2 steps with a checkpoint; sampling from the checkpoint, its export, or CONFIG --weights is
    the sampler applied to the trained weights."""
    checkpoint = pytest.importorskip("megagen.checkpoint")
    from megagen.train.loop import Trainer

    run = tmp_path / "run"
    cfg = load_config(
        EXAMPLE,
        [
            f"run.dir={run}",
            "train.steps=2",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
            "checkpoint.every=2",
            "metrics.tensorboard=false",
            "metrics.jsonl=false",
            "metrics.progress=none",
            "metrics.mfu=false",
        ],
    )
    trainer = Trainer(cfg)
    hook = checkpoint.attach_checkpointing(trainer)
    trainer.run(on_step_end=hook)
    hook.close()
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    exported = checkpoint.export_safetensors(run / "checkpoints", tmp_path / "w.safetensors")

    arrays = prompts(batch=1)
    np.savez(tmp_path / "p.npz", **arrays)
    common = ["--prompt-embeddings", str(tmp_path / "p.npz"), "--steps", "2", "--cfg", "1.5"]
    sources = {
        "ckpt": [str(run / "checkpoints")],
        "export": [str(exported)],
        "config": [EXAMPLE, "--weights", str(exported)],
    }
    results = {}
    for name, argv in sources.items():
        assert run_sample_command(parse([*argv, *common, "--out", str(tmp_path / name)])) == 0
        results[name] = torch.from_numpy(np.load(tmp_path / name / "latents.npy"))
    model = get_spec("video").build(cfg)
    model.load_state_dict(trained)
    expected = direct(model.eval(), cfg, arrays, 2, 1.5, 0)
    for name, got in results.items():
        assert torch.equal(got, expected), name
    assert json.loads((tmp_path / "ckpt" / "sample.json").read_text())["weights"].endswith("step 2)")

    fresh = load_model(EXAMPLE)[2]
    assert not torch.equal(fresh.out_proj.weight, model.out_proj.weight)  # the weights were really loaded
