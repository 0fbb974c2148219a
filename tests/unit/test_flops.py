"""FLOP counts against torch's FlopCounterMode and against a hand count of one block."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megagen.config import load_config
from megagen.metrics.flops import FlopCount, combine
from megagen.specs import get_spec

EXAMPLE = "examples/configs/video_tiny.yaml"
EXAMPLES = {name: f"examples/configs/{name}_tiny.yaml" for name in ("video", "audio", "upsampler")}


def measured(spec_name, overrides=()):
    cfg = load_config(EXAMPLES[spec_name], [f"model.spec={spec_name}", *overrides])
    spec = get_spec(spec_name)
    model = spec.build(cfg)
    spec.init_weights(model, cfg)
    shapes = spec.sample_shapes(cfg)
    batch = {k: torch.randn(2, *s) for k, s in shapes.items()}
    t = torch.rand(2)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(**spec.model_inputs(batch, batch["latents"], t, None))
        forward = counter.get_total_flops()
        out.square().sum().backward()
    return cfg, spec, forward / 2, counter.get_total_flops() / 2


@pytest.mark.parametrize("spec_name", ["video", "audio", "upsampler"])
def test_forward_and_model_flops_match_flop_counter(spec_name):
    cfg, spec, forward, total = measured(spec_name)
    count = spec.flops_per_sample(cfg)
    assert count.forward == pytest.approx(forward, rel=0.01)
    assert count.model == pytest.approx(total, rel=0.01)


def test_hand_count_of_one_video_block():
    cfg = load_config(EXAMPLE, [])
    spec = get_spec("video")
    arch = spec.arch(cfg)
    d, f, s, lc = arch.dim, arch.ffn, 4 * 4 * 4, 3 * cfg.data.text_tokens
    self_attn = 2 * s * d * d * 4 + 2 * 2 * s * s * d  # q,k,v,o + QKᵀ + AV
    cross_attn = 2 * s * d * d * 2 + 2 * lc * d * d * 2 + 2 * 2 * s * lc * d
    mlp = 2 * s * d * f * 3
    one_block = self_attn + cross_attn + mlp
    two_layers = spec.flops_per_sample(cfg)
    cfg.model.preset = "tiny"
    # removing one layer's worth from a 2-layer count leaves the 1-layer count
    one_layer_arch = type(arch)(**{**arch.__dict__, "layers": 1})
    spec.presets["tiny-1layer"] = one_layer_arch
    try:
        cfg.model.preset = "tiny-1layer"
        one = spec.flops_per_sample(cfg)
    finally:
        del spec.presets["tiny-1layer"]
    assert two_layers.forward - one.forward == pytest.approx(one_block)


def test_recompute_adds_hardware_flops_only():
    c_none = combine(10.0, 100.0, 20.0, 2, "none")
    c_full = combine(10.0, 100.0, 20.0, 2, "full")
    c_sel = combine(10.0, 100.0, 20.0, 2, "selective")
    assert c_none == FlopCount(250.0, 750.0, 750.0)
    assert combine(10.0, 100.0, 20.0, 2, "none", input_layers=10.0).model == 740.0
    assert c_full.model == c_sel.model == 750.0
    assert c_full.hardware == 750.0 + 240.0
    assert c_sel.hardware == 750.0 + 40.0


def test_30b_flops_per_token_is_about_6n():
    cfg = load_config(EXAMPLE, ["model.preset=30b", "data.latent_frames=16", "data.latent_height=32",
                                "data.latent_width=32", "data.text_tokens=128"])
    spec = get_spec("video")
    with torch.device("meta"):
        n = sum(p.numel() for p in spec.build(cfg).parameters())
    count = spec.flops_per_sample(cfg)
    tokens = 16 * 16 * 16
    per_token = count.model / tokens
    assert 6 * n * 0.9 < per_token < 6 * n * 1.5  # 6N plus attention
