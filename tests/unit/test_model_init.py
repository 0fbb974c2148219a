"""`model.qk_norm` (learned QK-norm in the built-in specs) and the test-only `model.init=live`."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from megagen.config import ConfigError, load_config
from megagen.specs import get_spec
from megagen.specs.base import init_model

SPECS = ["video", "upsampler", "audio"]


def _built(spec_name: str, *overrides: str):
    cfg = load_config("examples/configs/video_tiny.yaml", [f"model.spec={spec_name}", *overrides])
    spec = get_spec(spec_name)
    torch.manual_seed(cfg.run.seed)
    model = spec.build(cfg)
    init_model(spec, model, cfg)
    return cfg, spec, model


@pytest.mark.parametrize("name", SPECS)
def test_qk_norm_adds_one_head_dim_weight_per_query_and_key(name):
    _, _, plain = _built(name)
    _, _, normed = _built(name, "model.qk_norm=true")
    extra = {n: p.shape for n, p in normed.named_parameters() if n not in dict(plain.named_parameters())}
    head_dim = plain.blocks[0].attn.head_dim
    layers = len(plain.blocks)
    expected = {
        f"blocks.{i}.{a}.{q}_norm.weight" for i in range(layers) for a in ("attn", "cross_attn") for q in "qk"
    }
    assert set(extra) == expected and all(s == (head_dim,) for s in extra.values())
    assert all(torch.equal(normed.get_parameter(n), torch.ones(head_dim)) for n in extra)


def test_a_spec_without_qk_norm_refuses_the_key():
    from megagen.specs.video.spec import VideoSpec

    @dataclass(frozen=True)
    class NoQK:
        dim: int = 8

    class Plain(VideoSpec):
        name = "plain"
        presets = {"tiny": NoQK()}

    cfg = load_config("examples/configs/video_tiny.yaml", ["model.qk_norm=true"])
    with pytest.raises(ConfigError) as info:
        Plain().arch(cfg)
    assert info.value.key == "model.qk_norm" and "'plain'" in str(info.value)
    cfg.model.qk_norm = False
    assert Plain().arch(cfg) == NoQK()


@pytest.mark.parametrize("name", SPECS)
def test_live_init_moves_every_parameter_and_is_seeded(name):
    _, _, default = _built(name, "model.qk_norm=true")
    cfg, spec, live = _built(name, "model.qk_norm=true", "model.init=live")
    _, _, again = _built(name, "model.qk_norm=true", "model.init=live")
    ref = dict(default.named_parameters())
    for n, p in live.named_parameters():
        assert torch.all(p != ref[n]), f"{n}: some elements keep their default init"
        assert torch.equal(p, again.get_parameter(n)), f"{n}: live init is not deterministic"
    # the output layer, zero by default, now makes a non-zero prediction: every path has a gradient
    batch = {k: torch.randn(2, *s) for k, s in spec.sample_shapes(cfg).items()}
    drop = {c: torch.tensor([True, False]) for c in spec.condition_names(cfg)}
    out = live(**spec.model_inputs(batch, batch["latents"], torch.rand(2), drop))
    out.square().mean().backward()
    silent = [n for n, p in live.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert silent == []
