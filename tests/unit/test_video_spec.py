"""The Movie Gen Video spec: shapes, presets, patchify, null embeddings, declared plan."""

import fnmatch

import pytest
import torch

from megagen.config import ConfigError, load_config
from megagen.specs import get_spec
from megagen.specs.video import patchify, unpatchify
from tests.unit.spec_helpers import assert_validate_names_the_key


@pytest.fixture
def cfg():
    return load_config("examples/configs/video_tiny.yaml", ["train.cond_dropout=0.5"])


def test_patchify_round_trip_and_order():
    x = torch.randn(2, 16, 4, 6, 8)
    tokens = patchify(x, (1, 2, 2))
    assert tokens.shape == (2, 4 * 3 * 4, 64)
    assert torch.equal(unpatchify(tokens, (1, 2, 2), (16, 4, 6, 8)), x)
    # token 1 is (t=0, h=0, w=1): channel 0 of its first pixel is x[..., 0, 0, 0, 2]
    assert tokens[0, 1, 0] == x[0, 0, 0, 0, 2]


def test_forward_shape_and_zero_init_output(cfg):
    spec = get_spec("video")
    model = spec.build(cfg)
    spec.init_weights(model, cfg)
    shapes = spec.sample_shapes(cfg)
    batch = {k: torch.randn(2, *s) for k, s in shapes.items()}
    t = torch.rand(2)
    out = model(**spec.model_inputs(batch, batch["latents"], t, None))
    assert out.shape == (2, 4 * 4 * 4, 64)
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer: v̂ = 0 at the start


def test_null_embedding_replaces_dropped_condition(cfg):
    spec = get_spec("video")
    model = spec.build(cfg)
    spec.init_weights(model, cfg)
    proj = model.text["ul2"]
    emb = torch.randn(3, 5, 24)
    drop = torch.tensor([True, False, True])
    out = proj(emb, drop)
    assert torch.equal(out[0], proj.null.expand(5, -1))
    assert torch.equal(out[1], proj(emb, None)[1])


@pytest.mark.parametrize(
    "preset, low, high", [("1b", 0.8e9, 1.2e9), ("5b", 4.5e9, 5.5e9), ("30b", 29e9, 30e9)]
)
def test_large_presets_on_meta(cfg, preset, low, high):
    cfg.model.preset = preset
    with torch.device("meta"):
        model = get_spec("video").build(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert low <= n <= high
    assert all(p.is_meta for p in model.parameters())


def test_plan_patterns_match_real_modules(cfg):
    spec = get_spec("video")
    model = spec.build(cfg)
    plan = spec.parallel_plan(cfg)
    names = [n for n, _ in model.named_modules()]
    for pattern in (*plan.colwise, *plan.rowwise, *plan.regions, *plan.self_attention):
        hits = fnmatch.filter(names, pattern)
        assert hits, f"plan pattern {pattern!r} matches no module"
    assert isinstance(getattr(model, plan.blocks), torch.nn.ModuleList)


@pytest.mark.parametrize(
    "override, key",
    [
        ("parallel.tp=3", "parallel.tp"),
        ("data.latent_height=7", "data.latent_height"),
        ("data.latent_frames=99", "data.latent_frames"),
    ],
)
def test_validate_names_the_key(cfg, override, key):
    assert_validate_names_the_key("video", cfg, override, key)


def test_ulysses_needs_heads_divisible_by_cp_tp(cfg):
    cfg.parallel.cp_kind, cfg.parallel.cp, cfg.parallel.tp = "ulysses", 16, 1
    with pytest.raises(ConfigError, match="ulysses"):
        get_spec("video").validate(cfg)


def test_unknown_spec_and_preset(cfg):
    with pytest.raises(ConfigError, match="model.spec"):
        get_spec("nope")
    cfg.model.preset = "huge"
    with pytest.raises(ConfigError, match="model.preset"):
        get_spec("video").arch(cfg)
