"""Wan ↔ diffusers checkpoints: `checkpoint.init_from=DIR` of a `save_pretrained` directory and
`megagen ckpt export --format diffusers` (diffusers built from a tiny random config; nothing downloaded)."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from megagen.checkpoint import init_from_checkpoint
from megagen.checkpoint.cli import add_ckpt_commands, run_ckpt_command
from megagen.checkpoint.diffusers_dir import INDEX, WEIGHTS
from megagen.checkpoint.export import export_diffusers
from megagen.checkpoint.layout import FORMAT, VERSION, CheckpointError, publish
from megagen.config import load_config
from megagen.specs.video.spec import grid_positions, patchify
from megagen.specs.wan.model import WanTransformer
from megagen.specs.wan.spec import WAN_PRESETS
from tests.unit.wan_reference import diffusers_wan

pytest.importorskip("diffusers")

ARCH = WAN_PRESETS["tiny"]
CFG = load_config("examples/configs/wan_tiny.yaml")


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = diffusers_wan(ARCH).eval()
    with torch.no_grad():  # diffusers starts some tensors at zero: random values test every mapping
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture
def saved(reference, tmp_path):
    reference.save_pretrained(tmp_path / "wan")
    return tmp_path / "wan"


def import_wan(directory) -> WanTransformer:
    """megagen's wan/tiny started from a diffusers directory (`checkpoint.init_from=DIR`)."""
    model = WanTransformer(ARCH)
    report = init_from_checkpoint(model, directory, cfg=CFG)
    assert report.missing == [] and report.unexpected == [] and not report.grown
    return model


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, ARCH.latent_channels, 2, 4, 6, generator=g)
    text = torch.randn(2, 5, ARCH.text_dim, generator=g)
    return latents, torch.tensor([500.0, 120.0]), text


def diffusers_tokens(out: torch.Tensor) -> torch.Tensor:
    """diffusers' (B, C, T, H, W) output as per-token vectors in (pt, ph, pw, C) order."""
    b, c, t, h, w = out.shape
    x = out.reshape(b, c, t, 1, h // 2, 2, w // 2, 2).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, t * (h // 2) * (w // 2), -1)


def run_diffusers(model, latents, timestep, text):
    with torch.no_grad():
        return model(latents, timestep, text, return_dict=False)[0]


def test_import_matches_diffusers_forward(reference, saved):
    model = import_wan(saved)
    latents, timestep, text = inputs()
    grid = (latents.shape[2], latents.shape[3] // 2, latents.shape[4] // 2)
    with torch.no_grad():
        mine = model(patchify(latents, ARCH.patch), grid_positions(grid), timestep, text)
    theirs = diffusers_tokens(run_diffusers(reference, latents, timestep, text))
    assert (mine - theirs).norm() <= 1e-5 * theirs.norm()


def test_sharded_index_loads_as_one_file(reference, saved, tmp_path):
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / INDEX).is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    one, many = import_wan(saved).state_dict(), import_wan(tmp_path / "sharded").state_dict()
    assert all(torch.equal(one[n], many[n]) for n in one)


def test_mismatched_config_is_refused_naming_the_field(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "num_layers": 3}))  # the preset has 2
    with pytest.raises(CheckpointError, match="num_layers: diffusers config has 3, preset wan/tiny has 2"):
        import_wan(saved)


def test_missing_or_corrupt_shard_is_named(reference, tmp_path):
    reference.save_pretrained(tmp_path / "a", max_shard_size="40KB")
    shard = sorted((tmp_path / "a").glob("*-of-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{shard}.* not a readable safetensors file"):
        import_wan(tmp_path / "a")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard} is missing"):
        import_wan(tmp_path / "a")


def test_missing_tensor_is_named(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / WEIGHTS)
    del tensors["blocks.1.attn2.to_k.bias"]
    save_file(tensors, saved / WEIGHTS)
    with pytest.raises(CheckpointError, match="lacks 'blocks.1.attn2.to_k.bias'"):
        import_wan(saved)


# ------------------------------------------------------------------------------------------------ export
def weights_checkpoint(tensors: dict, out, spec: str, preset: str):
    """A weights-only megagen checkpoint (as `megagen ckpt average` writes) holding `tensors`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    tmp = out.with_name(out.name + ".tmp-test")
    dcp.save({"model": tensors}, storage_writer=FileSystemWriter(tmp), no_dist=True)
    meta = {"format": FORMAT, "version": VERSION, "kind": "weights", "step": 0, "spec": spec}
    meta.update(preset=preset, contents=["model"], torch=torch.__version__, saved_at=time.time())
    publish(tmp, out, meta)
    return out


def ckpt_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="megagen")
    add_ckpt_commands(parser.add_subparsers(dest="command"))
    return run_ckpt_command(parser.parse_args(["ckpt", *argv]))


def test_import_export_from_pretrained_is_bitwise(reference, saved, tmp_path):
    from diffusers import WanTransformer3DModel

    tensors = {n: t.clone() for n, t in import_wan(saved).state_dict().items()}
    ckpt = weights_checkpoint(tensors, tmp_path / "step-000000", "wan", "tiny")
    out = tmp_path / "exported"
    assert ckpt_cli("export", str(ckpt), str(out), "--format", "diffusers") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["_diffusers_version"]
    back = WanTransformer3DModel.from_pretrained(out).eval()
    theirs, mine = reference.state_dict(), back.state_dict()
    assert theirs.keys() == mine.keys()
    assert all(torch.equal(theirs[n], mine[n]) for n in theirs)
    latents, timestep, text = inputs()
    want = run_diffusers(reference, latents, timestep, text)
    assert torch.equal(run_diffusers(back, latents, timestep, text), want)


def test_export_refuses_a_spec_without_a_diffusers_mapping(tmp_path):
    ckpt = weights_checkpoint({"w": torch.zeros(2)}, tmp_path / "step-000000", "video", "tiny")
    with pytest.raises(CheckpointError, match="spec 'video' has no diffusers mapping"):
        export_diffusers(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- generic tensor rules
def test_tensor_rules_read_row_blocks_and_invert_exactly(tmp_path):
    """Layouts wan does not need (fused from split, permuted rows, channels-last kernels) read any block
    of rows from the outside tensors' rows only, and export back to the very same tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from megagen.checkpoint.external_format import RuleReader, TensorRule, to_outside

    g = torch.Generator().manual_seed(0)
    outside = {
        n: torch.randn(s, generator=g) for n, s in (("q", (8, 6)), ("k", (4, 6)), ("c", (8, 3, 1, 2, 2)))
    }
    save_file(outside, tmp_path / "t.safetensors")
    perm = tuple(reversed(range(12)))
    rules = {
        "fused": (TensorRule(("q", "k"), ((8, 6), (4, 6))), torch.cat([outside["q"], outside["k"]])),
        "permuted": (
            TensorRule(("q", "k"), ((8, 6), (4, 6)), row_perm=perm),
            torch.cat([outside["q"], outside["k"]]).flip(0),
        ),
        "channels_last": (
            TensorRule(("c",), ((8, 3, 1, 2, 2),), inner_perm=(1, 2, 3, 0), flatten=True),
            outside["c"].permute(0, 2, 3, 4, 1).reshape(8, 12),
        ),
    }
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        for name, (rule, want) in rules.items():
            assert rule.target_shape() == tuple(want.shape), name
            reader = RuleReader(rule, [f.get_slice(s) for s in rule.sources])
            assert torch.equal(reader[(slice(3, 7), slice(1, 5))], want[3:7, 1:5]), name
            back = to_outside(rule, want)
            assert all(torch.equal(back[s], outside[s]) for s in rule.sources), name
