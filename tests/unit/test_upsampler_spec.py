"""The Movie Gen spatial-upsampler spec: zero-init conditioning, parent weights, presets, MultiDiffusion."""

import fnmatch

import pytest
import torch

from megagen.config import load_config
from megagen.specs import get_spec
from megagen.specs.base import ModelSpec
from megagen.specs.upsampler import (
    LOWRES,
    blend_weights,
    upsampler_from_parent,
    window_profile,
    window_spans,
)
from tests.unit.spec_helpers import make_batch, randomized, train_from_synth_shards

EXAMPLE = "examples/configs/upsampler_tiny.yaml"


@pytest.fixture
def cfg():
    return load_config(EXAMPLE, [])


def test_forward_shape_zero_output_and_zero_conditioning_columns(cfg):
    spec = get_spec("upsampler")
    model = spec.build(cfg)
    spec.init_weights(model, cfg)
    batch = make_batch(spec, cfg)
    assert batch[LOWRES].shape == batch["latents"].shape
    inputs = spec.model_inputs(batch, batch["latents"], torch.rand(2), None)
    assert inputs["tokens"].shape == (2, 4 * 4 * 4, 2 * 64)
    out = model(**inputs)
    assert out.shape == (2, 4 * 4 * 4, 64)
    assert torch.count_nonzero(out) == 0
    w = model.patch_embed.weight
    assert w.shape == (64, 128)
    assert torch.count_nonzero(w[:, 64:]) == 0 and torch.count_nonzero(w[:, :64]) > 0


def test_zero_init_upsampler_equals_its_parent_at_step_0(cfg, tmp_path):
    """A video tiny model with weights W, exported; an upsampler started from it by `checkpoint.init_from`
    computes the parent's velocity for any low-res conditioning latent."""
    from megagen.checkpoint.export import write_safetensors
    from megagen.checkpoint.init_from import init_from_checkpoint, rules_for

    video_cfg = load_config("examples/configs/video_tiny.yaml", [])
    video = get_spec("video")
    torch.manual_seed(0)
    parent = randomized(video.build(video_cfg))
    path = write_safetensors(parent.state_dict(), tmp_path / "parent.safetensors", {"spec": "video"})
    spec = get_spec("upsampler")
    up = spec.build(cfg)
    spec.init_weights(up, cfg)
    fresh = {k: v.clone() for k, v in up.state_dict().items()}
    report = init_from_checkpoint(up, path, rules_for(spec))
    assert set(report.grown) == {"patch_embed.weight", "pos_t.weight"} and not report.missing
    in_memory = upsampler_from_parent(parent.state_dict(), fresh)  # the same start without a file
    assert all(torch.equal(v, in_memory[k]) for k, v in up.state_dict().items())
    assert torch.count_nonzero(up.patch_embed.weight[:, 64:]) == 0
    # the grown position table keeps the parent's rows and the upsampler's fresh init beyond them
    assert up.pos_t.weight.shape[0] > parent.pos_t.weight.shape[0]
    assert torch.equal(up.pos_t.weight[: parent.pos_t.weight.shape[0]], parent.pos_t.weight)
    batch = make_batch(spec, cfg)
    t = torch.rand(2)
    with torch.no_grad():
        want = parent(**video.model_inputs(batch, batch["latents"], t, None))
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            batch[LOWRES] = torch.randn(batch[LOWRES].shape, generator=gen) * 5
            got = up(**spec.model_inputs(batch, batch["latents"], t, None))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(want) > 0


def test_upsampler_from_parent_rejects_other_shapes(cfg):
    spec = get_spec("upsampler")
    target = spec.build(cfg).state_dict()
    parent = {k: v.clone() for k, v in target.items()}
    parent["blocks.0.mlp.w1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="blocks.0.mlp.w1.weight"):
        upsampler_from_parent(parent, target)
    del parent["blocks.0.mlp.w1.weight"]
    with pytest.raises(KeyError):
        upsampler_from_parent(parent, target)


def test_7b_preset_on_meta(cfg):
    cfg.model.preset = "7b"
    with torch.device("meta"):
        model = get_spec("upsampler").build(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 7e9 * 0.95 <= n <= 7e9 * 1.05, n
    assert all(p.is_meta for p in model.parameters())


def test_plan_patterns_match_real_modules(cfg):
    spec = get_spec("upsampler")
    model = spec.build(cfg)
    plan = spec.parallel_plan(cfg)
    names = [n for n, _ in model.named_modules()]
    for pattern in (*plan.colwise, *plan.rowwise, *plan.regions, *plan.self_attention):
        assert fnmatch.filter(names, pattern), f"plan pattern {pattern!r} matches no module"


@pytest.mark.parametrize(
    "n, spans",
    [
        (4, [(0, 4)]),
        (14, [(0, 14)]),
        (24, [(0, 14), (10, 24)]),
        (34, [(0, 14), (10, 24), (20, 34)]),
        (30, [(0, 14), (10, 24), (16, 30)]),  # the last window is aligned to the end
    ],
)
def test_window_spans(n, spans):
    assert window_spans(n, 14, 4) == spans


def test_weight_profiles():
    assert window_profile(5, 2, "uniform").tolist() == [1.0] * 5
    assert window_profile(8, 3, "triangular").tolist() == [0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25]
    # normalised weights of every frame sum to 1
    spans = window_spans(34, 14, 4)
    total = torch.zeros(34, dtype=torch.float64)
    for (a, b), w in zip(spans, blend_weights(34, spans, 4, "triangular")):
        total[a:b] += w
    torch.testing.assert_close(total, torch.ones(34, dtype=torch.float64))


def test_multidiffusion_in_one_window_equals_the_plain_sampler(cfg):
    spec = get_spec("upsampler")
    torch.manual_seed(0)
    model = randomized(spec.build(cfg))
    batch = make_batch(spec, cfg)  # 4 latent frames: one window of 14
    kw = dict(steps=3, cfg_scale=2.0)
    got = spec.sample(model, cfg, batch, generator=torch.Generator().manual_seed(5), **kw)
    want = ModelSpec.sample(spec, model, cfg, batch, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(got, want)


class CallCounter(torch.nn.Module):
    """Predicts the constant k + 1 on the k-th call (k = 0, 1, ...), so each window's prediction is known."""

    def __init__(self, out_dim):
        super().__init__()
        self.out_dim, self.calls, self.lengths = out_dim, 0, []

    def forward(self, tokens, **_):
        self.calls += 1
        self.lengths.append(tokens.shape[1])
        return torch.full((*tokens.shape[:2], self.out_dim), float(self.calls))


def test_multidiffusion_blends_overlapping_windows_uniformly(cfg):
    """24 latent frames → windows [0, 14) and [10, 24); frames 10..13 get the average of both predictions."""
    spec = get_spec("upsampler")
    cfg.data.latent_frames, cfg.data.latent_height, cfg.data.latent_width = 24, 4, 4
    batch = make_batch(spec, cfg, b=1)
    model = CallCounter(out_dim=64)
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(3))
    x = spec.sample(model, cfg, batch, steps=1, generator=torch.Generator().manual_seed(3))
    assert model.lengths == [14 * 2 * 2, 14 * 2 * 2]  # two windows of 14 frames (2×2 patches per frame)
    v = x - noise  # one Euler step from t=0 to t=1
    expected = torch.tensor([1.0] * 10 + [1.5] * 4 + [2.0] * 10)
    torch.testing.assert_close(v[0, 0, :, 0, 0], expected)
    torch.testing.assert_close(v, expected.view(1, 1, -1, 1, 1).expand_as(v))


# --------------------------------------------------------------------------------------------- data


def test_synth_upsampler_tiny_stores_a_blurred_lowres_latent(tmp_path):
    import numpy as np

    from megagen.data.shard_reader import ShardReader
    from megagen.data.synth import class_latent, lowres_of, synth

    m = synth(tmp_path / "ds", preset="upsampler_tiny", samples=8, classes=3, seed=2).manifest
    assert m.spec == "upsampler"
    assert [(b.name, b.field_shapes) for b in m.buckets] == [
        ("t4_h8_w8", {LOWRES: (16, 4, 8, 8)}),
        ("t8_h8_w12", {LOWRES: (16, 8, 8, 12)}),
    ]
    reader = ShardReader(tmp_path / "ds")
    s = reader.read("t4_h8_w8", 0)
    pattern = class_latent(2, int(s["caption_id"]), (16, 4, 8, 8)).astype(np.float16)
    assert np.array_equal(s["latents"], pattern)
    assert np.array_equal(s[LOWRES], lowres_of(pattern).astype(np.float16))
    assert np.array_equal(s[LOWRES][:, :, 0, 0], s[LOWRES][:, :, 1, 1])  # constant on 2×2 blocks
    batch = reader.to_model_batch(reader.read_batch("t4_h8_w8", [0, 1]))
    assert batch[LOWRES].shape == batch["latents"].shape and batch[LOWRES].dtype == torch.float32


def test_pack_crops_lowres_latents_with_the_latents(tmp_path):
    import json

    import numpy as np

    from megagen.data.pack import pack
    from megagen.data.shard_reader import ShardReader

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, shape in enumerate([(16, 4, 8, 8), (16, 5, 10, 8)]):
        np.save(src / f"hi{i}.npy", rng.standard_normal(shape).astype(np.float32))
        np.save(src / f"lo{i}.npy", rng.standard_normal(shape).astype(np.float32))
        np.save(src / f"ul2_{i}.npy", rng.standard_normal((3, 24)).astype(np.float32))
        rec = {
            "id": i,
            "latent": f"hi{i}.npy",
            "text": {"ul2": f"ul2_{i}.npy"},
            "fields": {LOWRES: f"lo{i}.npy"},
        }
        lines.append(json.dumps(rec))
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    m = pack(src, tmp_path / "ds", buckets="t4_h8_w8", spec="upsampler").manifest
    assert [(b.name, b.samples) for b in m.buckets] == [("t4_h8_w8", 2)]
    assert m.fields[LOWRES].per_sample_shape == (16, 4, 8, 8)
    s = ShardReader(tmp_path / "ds").read("t4_h8_w8", 1)
    hi, lo = np.load(src / "hi1.npy"), np.load(src / "lo1.npy")
    assert np.array_equal(s["latents"], hi[:, :4, 1:9, :].astype(np.float16))  # leading frames, centred
    assert np.array_equal(s[LOWRES], lo[:, :4, 1:9, :])  # the same crop


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_upsampler_trains_from_shards_with_both_loaders(tmp_path_factory, loader):
    train_from_synth_shards(tmp_path_factory, "upsampler_tiny", loader, EXAMPLE)
