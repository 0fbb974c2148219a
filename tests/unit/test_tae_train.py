"""The TAE as a spec: `megagen train` lowers its loss, its checkpoints load with `load_tae`, and the
config is checked (no tensor/context parallelism, pixel sizes divisible by 8)."""

from __future__ import annotations

import statistics

import pytest
import torch

from megagen.checkpoint.export import export_safetensors
from megagen.config import ConfigError, load_config
from megagen.specs import get_spec
from megagen.specs.tae import TAE, encode_tiled, load_tae, tiny_tae_for_tests

EXAMPLE = "examples/configs/tae_tiny.yaml"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A tae_tiny synthetic dataset: 8-frame 32x32 clips and 32x32 images."""
    from megagen.data.synth import synth

    out = tmp_path_factory.mktemp("tae_data")
    synth(out, preset="tae_tiny", samples=32, seed=0, buckets="t8_h32_w32")
    return out


def _cfg(run_dir, data, *overrides):
    return load_config(
        EXAMPLE,
        [
            f"run.dir={run_dir}",
            f"data.path={data}",
            "metrics.progress=none",
            "metrics.jsonl=false",
            "data.loader=torch",
            "data.num_workers=0",
            *overrides,
        ],
    )


def test_megagen_train_lowers_the_tae_loss_and_load_tae_reads_the_checkpoint(tmp_path, clips):
    from megagen.train import train

    cfg = _cfg(tmp_path / "run", clips, "train.steps=50", "checkpoint.every=50")
    result = train(cfg)
    first, last = statistics.mean(result.losses[:5]), statistics.mean(result.losses[-10:])
    assert last < 0.8 * first, (first, last)

    tae, info = load_tae(tmp_path / "run" / "checkpoints")
    assert info["preset"] == "tiny" and info["latent_channels"] == 16 and info["compression"] == (8, 8, 8)
    trained = dict(result.model.named_parameters())
    for name, p in tae.named_parameters():
        torch.testing.assert_close(p, trained[name].detach(), rtol=0, atol=0)
    assert not tae.training
    assert encode_tiled(tae, torch.zeros(1, 3, 40, 32, 32)).shape == (1, 16, 5, 4, 4)

    exported = export_safetensors(tmp_path / "run" / "checkpoints", tmp_path / "tae.safetensors")
    from_file, file_info = load_tae(exported)
    assert file_info["preset"] == "tiny"
    for a, b in zip(tae.parameters(), from_file.parameters()):
        assert torch.equal(a, b)


def test_tiny_tae_for_tests_round_trips_through_load_tae(tmp_path):
    path = tiny_tae_for_tests(tmp_path)
    tae, info = load_tae(path)
    assert isinstance(tae, TAE) and info["preset"] == "tiny"
    again, _ = load_tae(tiny_tae_for_tests(tmp_path))
    for a, b in zip(tae.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_load_tae_refuses_another_spec(tmp_path):
    from megagen.checkpoint.export import WEIGHTS_FORMAT, write_safetensors
    from megagen.checkpoint.layout import CheckpointError

    path = write_safetensors({"w": torch.zeros(2)}, tmp_path / "x.safetensors", {"format": WEIGHTS_FORMAT})
    with pytest.raises(CheckpointError, match="not a TAE"):
        load_tae(path)


@pytest.mark.parametrize("field", ["parallel.tp", "parallel.cp"])
def test_validate_refuses_tensor_and_context_parallelism(tmp_path, field):
    cfg = _cfg(tmp_path, tmp_path, f"{field}=2")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        get_spec("tae").validate(cfg)


def test_validate_refuses_pixel_sizes_not_divisible_by_8(tmp_path):
    cfg = _cfg(tmp_path, tmp_path, "data.latent_height=12")
    with pytest.raises(ConfigError, match="data.latent_height"):
        get_spec("tae").validate(cfg)


def test_training_loss_is_a_sum_over_samples_with_seeded_posterior_noise(tmp_path):
    """Per-sample losses summed (the trainer divides by the global batch); a sample's noise depends on
    its position, not on which micro-batch carries it."""
    from types import SimpleNamespace

    spec = get_spec("tae")
    cfg = _cfg(tmp_path, tmp_path)
    torch.manual_seed(0)
    model = TAE(spec.arch(cfg))
    video = torch.rand(2, 3, 8, 16, 16) * 2 - 1

    def loss(samples: slice, positions: list[int]):
        req = SimpleNamespace(step=3, positions=positions)
        return spec.training_loss(cfg, model, {"latents": video[samples]}, req, None)

    both, unit = loss(slice(0, 2), [4, 5])
    one, _ = loss(slice(0, 1), [4])
    two, _ = loss(slice(1, 2), [5])
    assert unit == 1
    torch.testing.assert_close(both, one + two)


def test_flops_per_sample_counts_convolutions(tmp_path):
    spec = get_spec("tae")
    cfg = _cfg(tmp_path, tmp_path)
    small = spec.flops_per_sample(cfg, (3, 8, 32, 32))
    large = spec.flops_per_sample(cfg, (3, 16, 32, 32))
    assert small.forward > 0 and small.model == 3 * small.forward
    assert large.forward > 1.5 * small.forward
