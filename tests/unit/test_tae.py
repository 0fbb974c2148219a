"""The TAE spec's model, loss and temporal tiling (tiny preset, CPU, well under a second each)."""

from __future__ import annotations

import pytest
import torch

from megagen.specs.tae import TAE, TAE_PRESETS, blend_weights, decode_spans, decode_tiled, encode_tiled
from megagen.specs.tae.loss import kl_to_standard_normal, outlier_penalty

TINY = TAE_PRESETS["tiny"]


@pytest.fixture(scope="module")
def tae() -> TAE:
    torch.manual_seed(0)
    return TAE(TINY).eval()


def smooth_video(frames: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(1, 3, T, size, size) in [-1, 1]: slow sinusoids in t, h and w."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, frames).view(-1, 1, 1) * frames / 32
    y = torch.linspace(0, 1, size).view(1, -1, 1)
    x = torch.linspace(0, 1, size).view(1, 1, -1)
    phase = torch.rand(3, generator=gen) * 6.28
    channels = [0.8 * torch.sin(6.28 * (t + 0.5 * y + 0.3 * x) + p) for p in phase]
    return torch.stack(channels).unsqueeze(0)


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (8, 1), (9, 2), (16, 2), (32, 4)])
def test_shapes_8x_in_t_h_w_to_16_channels(tae, frames, latent_frames):
    video = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    with torch.no_grad():
        recon, mean, logvar = tae(video)
    assert mean.shape == logvar.shape == (2, 16, latent_frames, 2, 3)
    assert recon.shape == video.shape


def test_image_is_a_one_frame_video(tae):
    """T=1: one latent frame; its encoding does not depend on what other frames would follow it."""
    image = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, _ = tae.encode_moments(image)
        decoded = tae.decode(mean, frames=1)
    assert mean.shape[2] == 1 and decoded.shape == image.shape


def test_opl_zero_inside_radius_and_growing_outside():
    z = torch.linspace(-1, 1, 64).view(1, 1, 4, 4, 4).repeat(1, 2, 1, 1, 1)
    assert outlier_penalty(z, radius=3.0).item() == 0.0  # every value within 1.8σ of the mean
    values = []
    for spike in (2.0, 5.0, 10.0, 20.0):
        w = z.clone()
        w[0, 0, 0, 0, 0] = spike
        values.append(outlier_penalty(w, radius=3.0).item())
    assert values[0] == 0.0 or values[0] < values[1]
    assert all(a < b for a, b in zip(values[1:], values[2:])) and values[-1] > 0


def test_kl_matches_the_closed_form():
    mean, logvar = torch.randn(2, 16, 1, 2, 2), torch.randn(2, 16, 1, 2, 2)
    posterior = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    expected = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar), expected.flatten(1).mean(1))
    assert kl_to_standard_normal(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0.0


def test_tiled_encode_equals_untiled_within_one_tile(tae):
    video = smooth_video(24)
    with torch.no_grad():
        untiled = tae.encode_moments(video)[0]
    torch.testing.assert_close(encode_tiled(tae, video), untiled, rtol=0, atol=0)


def without_temporal_mixing(model: TAE) -> TAE:
    """A copy whose temporal convolutions read only their own frame and whose temporal attention adds
    nothing: its receptive field never crosses a 32-frame tile boundary."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in out.named_modules():
            if name.endswith("temporal") and isinstance(module, torch.nn.Conv3d):
                module.weight.zero_()
                module.weight[:, :, 1, 0, 0] = torch.eye(module.weight.shape[0])
                module.bias.zero_()
            if name.endswith("temporal_attn"):
                module.out.weight.zero_()
                module.out.bias.zero_()
    return out


def test_tiled_encode_equals_untiled_where_the_receptive_field_allows(tae):
    """Rule: tiles are 32-frame aligned, so a latent frame whose receptive field lies inside its tile is
    encoded exactly as untiled; with temporal mixing removed that holds for every latent frame."""
    local = without_temporal_mixing(tae)
    video = smooth_video(72)
    with torch.no_grad():
        untiled = local.encode_moments(video)[0]
    tiled = encode_tiled(local, video)
    assert tiled.shape == untiled.shape == (1, 16, 9, 2, 2)
    torch.testing.assert_close(tiled, untiled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("latent_frames", range(1, 14))
def test_blend_weights_sum_to_one(latent_frames):
    spans = decode_spans(latent_frames)
    assert spans[0][0] == 0 and spans[-1][1] == latent_frames
    total = torch.zeros(latent_frames * 8, dtype=torch.float64)
    for (lo, hi), w in zip(spans, blend_weights(spans, 8)):
        assert hi - lo <= 4 and w.min() > 0
        total[lo * 8 : hi * 8] += w
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
    for (_, prev_hi), (lo, _) in zip(spans, spans[1:]):
        assert prev_hi - lo == 2  # neighbouring tiles share 2 latent frames = 16 video frames


def frame_steps(video: torch.Tensor) -> torch.Tensor:
    """(T-1,) mean absolute change from each frame to the next."""
    return (video[:, :, 1:] - video[:, :, :-1]).abs().mean(dim=(0, 1, 3, 4))


def test_no_seam_spike_after_tiled_decode(tae):
    """On a smooth clip the frame-to-frame change at tile seams stays at the level the untiled decode
    shows anywhere: the linear cross-fade leaves no jump where one tile hands over to the next."""
    latents = encode_tiled(tae, smooth_video(96))
    tiled = decode_tiled(tae, latents)
    with torch.no_grad():
        untiled = tae.decode(latents)
    assert tiled.shape == untiled.shape == (1, 3, 96, 16, 16)
    steps, reference = frame_steps(tiled), frame_steps(untiled)
    assert steps.max() <= 1.5 * reference.max()
    hard = hard_cut_decode(tae, latents)
    assert frame_steps(hard).max() > steps.max()  # the test can see a seam when there is one


def hard_cut_decode(tae: TAE, latents: torch.Tensor) -> torch.Tensor:
    """Non-overlapping 4-latent-frame tiles concatenated: the seam the blend exists to avoid."""
    with torch.no_grad():
        parts = [tae.decode(latents[:, :, lo : lo + 4]) for lo in range(0, latents.shape[2], 4)]
    return torch.cat(parts, dim=2)


def test_perceptual_term_only_with_user_supplied_weights(tmp_path):
    from safetensors.torch import save_file

    from megagen.config import ConfigError
    from megagen.specs.tae.loss import LossWeights, tae_loss_per_sample
    from megagen.specs.tae.perceptual import VGGFeatures, perceptual_features

    assert perceptual_features("", torch.device("cpu")) is None
    video = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    recon, mean, logvar = video.flip(-1), torch.randn(1, 16, 1, 2, 2), torch.zeros(1, 16, 1, 2, 2)
    weights = LossWeights(perceptual=0.5)
    plain = tae_loss_per_sample(recon, video, mean, logvar, weights)
    assert "perceptual" not in plain  # absent, not a zero-weighted term
    torch.manual_seed(0)
    path = tmp_path / "vgg16_features.safetensors"
    save_file({k: v.contiguous() for k, v in VGGFeatures().features.state_dict().items()}, str(path))
    features = perceptual_features(str(path), torch.device("cpu"))
    full = tae_loss_per_sample(recon, video, mean, logvar, weights, features)
    assert full["perceptual"].item() > 0
    torch.testing.assert_close(full["total"], plain["total"] + 0.5 * full["perceptual"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ConfigError, match="tae.perceptual_weights"):
        perceptual_features(str(tmp_path / "bad.safetensors"), torch.device("cpu"))


def test_encoded_latents_fit_the_video_tiny_example(tae):
    """examples/configs/video_tiny.yaml trains on (16, 4, 8, 8) latents: 32 frames of 64x64 pixels."""
    from megagen.config import load_config
    from megagen.specs import get_spec

    cfg = load_config("examples/configs/video_tiny.yaml", [])
    expected = get_spec("video").sample_shapes(cfg)["latents"]
    latents = encode_tiled(tae, torch.zeros(1, 3, 32, 64, 64))
    assert tuple(latents.shape[1:]) == tuple(expected) == (16, 4, 8, 8)
