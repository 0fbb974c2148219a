"""The Movie Gen Audio spec: inputs, resampling, context masks and their loss, presets, long-audio sampler."""

import fnmatch

import pytest
import torch

from megagen.config import load_config
from megagen.specs import get_spec
from megagen.specs.audio import CONTEXT_MASK, VIDEO_FEATURES, draw_context_mask, resample_frames
from megagen.specs.base import ModelSpec
from megagen.train.objective import draw_for_samples, flow_matching_micro_step
from tests.unit.spec_helpers import (
    assert_validate_names_the_key,
    make_batch,
    randomized,
    train_from_synth_shards,
)

EXAMPLE = "examples/configs/audio_tiny.yaml"


@pytest.fixture
def cfg():
    return load_config(EXAMPLE, [])


def test_shapes_forward_and_zero_init_output(cfg):
    spec = get_spec("audio")
    shapes = spec.sample_shapes(cfg)
    assert shapes == {"latents": (128, 32), VIDEO_FEATURES: (31, 16), "text.t5": (8, 24)}
    model = spec.build(cfg)
    spec.init_weights(model, cfg)
    batch = make_batch(spec, cfg)
    inputs = spec.model_inputs(batch, batch["latents"], torch.rand(2), None)
    assert inputs["tokens"].shape == (2, 32, 2 * 128 + 1)
    assert inputs["video"].shape == (2, 32, 16)
    out = model(**inputs)
    assert out.shape == (2, 32, 128)
    assert torch.count_nonzero(out) == 0
    assert torch.equal(spec.from_tokens(spec.to_tokens(batch["latents"]), (128, 32)), batch["latents"])


def test_token_layout_is_noisy_latent_masked_context_and_mask(cfg):
    spec = get_spec("audio")
    batch = make_batch(spec, cfg)
    x_t = torch.randn(2, 128, 32)
    mask = torch.zeros(2, 32)
    mask[0, :10] = 1
    batch[CONTEXT_MASK] = mask
    tokens = spec.model_inputs(batch, x_t, torch.rand(2), None)["tokens"]
    assert torch.equal(tokens[..., :128], x_t.transpose(1, 2))
    assert torch.equal(tokens[0, :10, 128:256], batch["latents"][0, :, :10].T)
    assert (
        torch.count_nonzero(tokens[0, 10:, 128:256]) == 0 and torch.count_nonzero(tokens[1, :, 128:256]) == 0
    )
    assert torch.equal(tokens[..., 256], mask)


def test_video_features_are_linearly_resampled_to_the_audio_rate():
    feats = torch.tensor([[0.0, 10.0, 20.0]]).unsqueeze(-1)  # 3 video frames → 6 audio frames
    out = resample_frames(feats, 6)[0, :, 0]
    # audio frame i reads video position (i + 0.5) / 2 - 0.5, clamped: -0.25, 0.25, 0.75, 1.25, 1.75, 2.25
    torch.testing.assert_close(out, torch.tensor([0.0, 2.5, 7.5, 12.5, 17.5, 20.0]))
    assert resample_frames(feats, 3) is feats


def test_context_masks_cover_the_three_tasks():
    seen = {"generation": 0, "extension": 0, "infilling": 0}
    for i in range(400):
        m = draw_context_mask(torch.Generator().manual_seed(i), 20, (0.5, 0.25, 0.25))
        given = m.bool()
        if not given.any():
            seen["generation"] += 1
        elif given[0] and not given[-1]:
            k = int(given.sum())
            assert 1 <= k <= 19 and given[:k].all()  # a prefix is given
            seen["extension"] += 1
        else:
            assert given[0] and given[-1] and not given.all()
            gap = (~given).nonzero().flatten()
            assert torch.equal(gap, torch.arange(int(gap[0]), int(gap[-1]) + 1))  # one middle span missing
            seen["infilling"] += 1
    assert 160 < seen["generation"] < 240 and seen["extension"] > 60 and seen["infilling"] > 60
    same = draw_context_mask(torch.Generator().manual_seed(7), 20, (0.5, 0.25, 0.25))
    assert torch.equal(same, draw_context_mask(torch.Generator().manual_seed(7), 20, (0.5, 0.25, 0.25)))


def test_masks_are_keyed_by_seed_step_and_position(cfg):
    spec = get_spec("audio")
    shape = (128, 32)
    a = draw_for_samples(cfg, spec, 3, [0, 1, 2, 3], shape).extra[CONTEXT_MASK]
    b = draw_for_samples(cfg, spec, 3, [2, 3], shape).extra[CONTEXT_MASK]
    assert torch.equal(a[2:], b)  # whichever micro-batch or rank draws position 2, 3
    c = draw_for_samples(cfg, spec, 4, [0, 1, 2, 3], shape).extra[CONTEXT_MASK]
    assert not torch.equal(a, c)
    assert (
        draw_for_samples(
            load_config("examples/configs/video_tiny.yaml", []), get_spec("video"), 3, [0], (16, 4, 8, 8)
        ).extra
        is None
    )


def test_loss_counts_only_the_frames_to_generate(cfg):
    """Each sample's loss is the mean squared error over its generated frames; given frames weigh 0."""
    spec = get_spec("audio")
    torch.manual_seed(0)
    model = randomized(spec.build(cfg))
    batch = make_batch(spec, cfg)
    draws = draw_for_samples(cfg, spec, 0, [0, 1], (128, 32))
    mask = torch.zeros(2, 32)
    mask[0, :12] = 1  # sample 0: extension from a 12-frame prefix; sample 1: generation
    draws.extra = {CONTEXT_MASK: mask}
    loss_sum, _, tokens = flow_matching_micro_step(cfg, spec, model, batch, draws)
    from megagen.diffusion import interpolate, velocity_target

    x1, x0, t = batch["latents"], draws.noise, draws.t
    with torch.no_grad():
        pred = model(
            **spec.model_inputs({**batch, CONTEXT_MASK: mask}, interpolate(x0, x1, t), t, draws.drop)
        )
    err = (pred - spec.to_tokens(velocity_target(x0, x1))).square().mean(-1)  # (B, T)
    want = 32 * (err[0, 12:].mean() + err[1].mean())
    assert tokens == 32
    torch.testing.assert_close(loss_sum.detach(), want, rtol=1e-5, atol=0)
    # given frames carry no gradient to the output layer through the loss
    loss_sum.backward()
    assert model.out_proj.weight.grad is not None


def test_null_embeddings_for_text_and_video(cfg):
    spec = get_spec("audio")
    assert spec.condition_names(cfg) == ["t5", "video"]
    torch.manual_seed(0)
    model = randomized(spec.build(cfg))
    batch = make_batch(spec, cfg)
    t = torch.rand(2)
    drop = {"t5": torch.tensor([False, False]), "video": torch.tensor([True, False])}
    with torch.no_grad():
        base = model(**spec.model_inputs(batch, batch["latents"], t, drop))
        other = dict(batch)
        other[VIDEO_FEATURES] = torch.randn_like(batch[VIDEO_FEATURES])
        changed = model(**spec.model_inputs(other, batch["latents"], t, drop))
    assert torch.equal(base[0], changed[0])  # sample 0's video is dropped: its features are not read
    assert not torch.allclose(base[1], changed[1])


def test_13b_preset_on_meta(cfg):
    cfg.model.preset = "13b"
    with torch.device("meta"):
        model = get_spec("audio").build(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 12.0e9 <= n <= 13.5e9, n
    arch = model.arch
    assert (arch.layers, arch.dim, arch.ffn) == (36, 4608, 18432)


def test_plan_patterns_match_real_modules(cfg):
    spec = get_spec("audio")
    model = spec.build(cfg)
    plan = spec.parallel_plan(cfg)
    names = [n for n, _ in model.named_modules()]
    for pattern in (*plan.colwise, *plan.rowwise, *plan.regions, *plan.self_attention):
        assert fnmatch.filter(names, pattern), f"plan pattern {pattern!r} matches no module"
    inputs = spec.model_inputs(make_batch(spec, cfg), torch.randn(2, 128, 32), torch.rand(2), None)
    for name, dim in plan.sequence_inputs.items():
        assert inputs[name].shape[dim] == 32


@pytest.mark.parametrize(
    "override, key", [("parallel.tp=3", "parallel.tp"), ("data.latent_frames=65", "data.latent_frames")]
)
def test_validate_names_the_key(cfg, override, key):
    assert_validate_names_the_key("audio", cfg, override, key)


def test_long_audio_sampler_in_one_window_equals_the_plain_sampler(cfg):
    spec = get_spec("audio")
    cfg.data.latent_frames = 12  # the tiny window is 16 frames
    torch.manual_seed(0)
    model = randomized(spec.build(cfg))
    batch = make_batch(spec, cfg)
    kw = dict(steps=3, cfg_scale=2.0)
    got = spec.sample(model, cfg, batch, generator=torch.Generator().manual_seed(5), **kw)
    want = ModelSpec.sample(spec, model, cfg, batch, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(got, want)


class CallCounter(torch.nn.Module):
    """Predicts the constant k + 1 on the k-th call."""

    def __init__(self):
        super().__init__()
        self.calls, self.lengths = 0, []

    def forward(self, tokens, **_):
        self.calls += 1
        self.lengths.append(tokens.shape[1])
        return torch.full((*tokens.shape[:2], 128), float(self.calls))


def test_long_audio_windows_cross_fade_with_triangular_weights(cfg):
    """40 frames, windows of 16 overlapping by 4: [0,16), [12,28), [24,40). In an overlap the left
    window's weights fall 4/5, 3/5, 2/5, 1/5 while the right one's rise 1/5 … 4/5."""
    spec = get_spec("audio")
    cfg.data.latent_frames = 40
    batch = make_batch(spec, cfg, b=1)
    model = CallCounter()
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(3))
    x = spec.sample(model, cfg, batch, steps=1, generator=torch.Generator().manual_seed(3))
    assert model.lengths == [16, 16, 16]
    v = (x - noise)[0, 0]
    fade = torch.tensor([4, 3, 2, 1]) / 5
    expected = torch.cat(
        [
            torch.full((12,), 1.0),
            fade * 1 + (1 - fade) * 2,
            torch.full((8,), 2.0),
            fade * 2 + (1 - fade) * 3,
            torch.full((12,), 3.0),
        ]
    )
    torch.testing.assert_close(v, expected)


def test_sampler_keeps_the_given_context_frames(cfg):
    spec = get_spec("audio")
    torch.manual_seed(0)
    model = randomized(spec.build(cfg))
    batch = make_batch(spec, cfg, b=1)
    mask = torch.zeros(1, 32)
    mask[0, :8] = 1
    batch[CONTEXT_MASK] = mask
    x = spec.sample(model, cfg, batch, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[..., :8], batch["latents"][..., :8])
    assert not torch.allclose(x[..., 8:], batch["latents"][..., 8:])


# --------------------------------------------------------------------------------------------- data


def test_synth_audio_tiny_has_1d_buckets_and_class_video_features(tmp_path):
    from megagen.data.shard_reader import ShardReader
    from megagen.data.synth import synth

    m = synth(tmp_path / "ds", preset="audio_tiny", samples=16, classes=4).manifest
    assert m.spec == "audio" and m.latent_channels == 128 and list(m.text_encoders) == ["t5"]
    got = [(b.name, tuple(b.latent_shape), b.field_shapes) for b in m.buckets]
    assert got == [
        ("t32", (128, 32), {VIDEO_FEATURES: (31, 16)}),
        ("t48", (128, 48), {VIDEO_FEATURES: (46, 16)}),
    ]
    reader = ShardReader(tmp_path / "ds")
    batch = reader.to_model_batch(reader.read_batch("t32", range(8)))
    assert batch["latents"].shape == (8, 128, 32) and batch[VIDEO_FEATURES].dtype == torch.float32
    assert batch["text_valid.t5"].shape == (8, 8)
    by_class = {}
    for i, c in enumerate(batch["caption_id"].tolist()):  # the video features identify the class
        if c in by_class:
            assert torch.equal(batch[VIDEO_FEATURES][i], batch[VIDEO_FEATURES][by_class[c]])
        by_class[c] = i
    assert len(by_class) > 1
    torch.testing.assert_close(batch["duration"], torch.full((8,), 32 / 25))


def _audio_source(src, frames, video_frames):
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    src.mkdir()
    lines = []
    for i, (t, fv) in enumerate(zip(frames, video_frames)):
        np.save(src / f"lat{i}.npy", rng.standard_normal((128, t)).astype(np.float32))
        np.save(src / f"vid{i}.npy", rng.standard_normal((fv, 16)).astype(np.float32))
        np.save(src / f"t5_{i}.npy", rng.standard_normal((3 + i, 24)).astype(np.float32))
        rec = {
            "id": i,
            "latent": f"lat{i}.npy",
            "text": {"t5": f"t5_{i}.npy"},
            "fps": 24,
            "duration": t / 25,
            "fields": {VIDEO_FEATURES: f"vid{i}.npy"},
        }
        lines.append(json.dumps(rec))
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_pack_1d_audio_latents(tmp_path):
    import numpy as np

    from megagen.data.pack import pack
    from megagen.data.shard_reader import ShardReader

    _audio_source(tmp_path / "src", [32, 20, 32], [31, 19, 31])
    m = pack(tmp_path / "src", tmp_path / "ds", spec="audio").manifest
    assert m.spec == "audio"
    assert [(b.name, b.samples, b.field_shapes) for b in m.buckets] == [
        ("t20", 1, {VIDEO_FEATURES: (19, 16)}),
        ("t32", 2, {VIDEO_FEATURES: (31, 16)}),
    ]
    s = ShardReader(tmp_path / "ds").read("t32", 1)
    want = np.load(tmp_path / "src" / "lat2.npy").astype(np.float16)
    assert np.array_equal(s["latents"], want)
    with pytest.raises(ValueError, match="t<T>"):
        pack(tmp_path / "src", tmp_path / "ds2", spec="audio", buckets="t20_h8_w8")


LOADERS = ["torch", "dali"]


@pytest.mark.parametrize("loader", LOADERS)
def test_audio_trains_from_shards_with_both_loaders(tmp_path_factory, loader):
    train_from_synth_shards(tmp_path_factory, "audio_tiny", loader, EXAMPLE)
