"""megagen/media: MP4 and contact-sheet files come back as written; `megagen sample --tae` and
`megagen data stats --render` decode with the TAE into them; a wrong TAE is refused."""

import argparse
import json
import sys

import numpy as np
import pytest
import torch

from megagen.errors import ConfigError
from megagen.media.contact_sheet import contact_sheet, write_contact_sheet
from megagen.media.render import CONTACT_SHEET, to_uint8_frames
from megagen.media.video_file import write_video
from megagen.specs.tae.load import tiny_tae_for_tests

av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")


def _video(frames=9, height=32, width=48):
    return np.random.default_rng(0).integers(0, 255, (frames, height, width, 3), dtype=np.uint8)


def test_mp4_reads_back_with_frame_count_and_size(tmp_path):
    assert write_video(tmp_path / "a.mp4", _video(), fps=16)
    with av.open(str(tmp_path / "a.mp4")) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 9
    assert (frames[0].width, frames[0].height) == (48, 32)


def test_contact_sheet_grid_picks_first_and_last_frames(tmp_path):
    video = _video()
    sheet = contact_sheet([video, video, video], columns=4)
    assert sheet.shape == (3 * 32, 4 * 48, 3)
    assert np.array_equal(sheet[:32, :48], video[0])
    assert np.array_equal(sheet[:32, 3 * 48 :], video[-1])
    assert write_contact_sheet(tmp_path / "s.png", [video, video], columns=4)
    assert Image.open(tmp_path / "s.png").size == (4 * 48, 2 * 32)


# --- decoding with a TAE: `megagen sample --tae` and `megagen data stats --render` ---

EXAMPLE = "examples/configs/video_tiny.yaml"


def _sample_args(tmp_path, *extra):
    from megagen.config import load_config
    from megagen.data.prompts import write_prompt_embeddings
    from megagen.sample import add_sample_command

    prompts = tmp_path / "p.npz"
    if not prompts.exists():
        write_prompt_embeddings(load_config(EXAMPLE), str(prompts), 2, 0)
    parser = argparse.ArgumentParser(prog="megagen")
    add_sample_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["sample", EXAMPLE, "--prompt-embeddings", str(prompts), "--steps", "1", *extra])


def test_to_uint8_frames_maps_minus_one_to_zero_and_one_to_255():
    video = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 1, 1)
    (clip,) = to_uint8_frames(video)
    assert clip.shape == (4, 1, 1, 3) and clip[:, 0, 0, 0].tolist() == [0, 128, 255, 255]


def test_sample_with_tae_writes_mp4s_and_contact_sheet(tmp_path, capsys):
    from megagen.sample import run_sample_command

    tae = tiny_tae_for_tests(tmp_path)
    out = tmp_path / "out"
    assert (
        run_sample_command(_sample_args(tmp_path, "--out", str(out), "--tae", str(tae), "--fps", "16")) == 0
    )
    assert "sample_001.mp4" in capsys.readouterr().out
    record = json.loads((out / "sample.json").read_text())
    assert record["files"][2:] == ["sample_000.mp4", "sample_001.mp4", CONTACT_SHEET] and record["fps"] == 16
    latents = np.load(out / "latents.npy")  # (2, 16, 4, 8, 8): the TAE makes 8x frames and pixels
    with av.open(str(out / "sample_000.mp4")) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(video=0))
        assert stream.average_rate == 16
    assert len(frames) == 8 * latents.shape[2] and (frames[0].height, frames[0].width) == (64, 64)
    assert Image.open(out / CONTACT_SHEET).size == (8 * 64, 2 * 64)


def test_sample_refuses_a_tae_of_other_latent_channels_before_sampling(tmp_path):
    """8-channel latents (the spec would fail on them only later, in sampling) meet a 16-channel TAE."""
    from megagen.sample import run_sample_command

    tae = tiny_tae_for_tests(tmp_path)
    out = tmp_path / "out"
    args = _sample_args(tmp_path, "--out", str(out), "--tae", str(tae), "--latent-shape", "8,4,8,8")
    with pytest.raises(ConfigError, match=r"--tae: .*decodes 16 latent channels; spec video/tiny makes 8"):
        run_sample_command(args)
    assert not out.exists()


def test_sample_without_tae_writes_only_latents(tmp_path):
    from megagen.sample import run_sample_command

    out = tmp_path / "out"
    assert run_sample_command(_sample_args(tmp_path, "--out", str(out))) == 0
    assert sorted(p.name for p in out.iterdir()) == ["latents.npy", "latents.safetensors", "sample.json"]
    assert "tae" not in json.loads((out / "sample.json").read_text())


def test_data_stats_render_decodes_a_bucket(tmp_path, capsys):
    from megagen.data.cli import add_data_commands, run_data_command

    def data(*argv):
        parser = argparse.ArgumentParser(prog="megagen")
        add_data_commands(parser.add_subparsers(dest="command"))
        return run_data_command(parser.parse_args(["data", *argv]))

    ds, tae = str(tmp_path / "ds"), str(tiny_tae_for_tests(tmp_path))
    assert data("synth", "--out", ds, "--samples", "12", "--buckets", "t1_h8_w8,t2_h8_w8", "-q") == 0
    assert data("stats", ds, "--tae", tae, "--render", "2") == 0
    assert "rendered 2 sample(s) of t2_h8_w8 (ids [0, 5])" in capsys.readouterr().out
    out = tmp_path / "ds" / "renders" / "t2_h8_w8"
    from megagen.data.shard_reader import ShardReader

    recorded = float(ShardReader(ds).read("t2_h8_w8", 5)["fps"])
    with av.open(str(out / "sample_001.mp4")) as container:
        assert len(list(container.decode(video=0))) == 16
        assert container.streams.video[0].average_rate == recorded  # each sample at its own fps
    assert Image.open(out / CONTACT_SHEET).size == (8 * 64, 2 * 64)
    assert (
        data(
            "stats",
            ds,
            "--tae",
            tae,
            "--render",
            "1",
            "--bucket",
            "t1_h8_w8",
            "--render-out",
            str(tmp_path / "r"),
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [CONTACT_SHEET, "sample_000.mp4"]
    assert data("stats", ds, "--render", "1") == 1
    assert data("stats", ds, "--tae", tae, "--render", "1", "--bucket", "t9_h8_w8") == 1
    assert "no bucket 't9_h8_w8'" in capsys.readouterr().err


def test_missing_pyav_and_pillow_skip_files_with_one_log_line(tmp_path, monkeypatch, caplog):
    from megagen.media import contact_sheet as sheet_module
    from megagen.media import video_file

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    monkeypatch.setitem(sys.modules, "PIL", None)
    video_file._pyav.cache_clear()
    sheet_module._pillow_image.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not write_video(tmp_path / "a.mp4", _video(), fps=16)
            assert not write_video(tmp_path / "b.mp4", _video(), fps=16)
            assert not write_contact_sheet(tmp_path / "s.png", [_video()])
    finally:
        video_file._pyav.cache_clear()
        sheet_module._pillow_image.cache_clear()
    assert not list(tmp_path.iterdir())
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "PyAV (av) not installed",
        "Pillow not installed",
    ]
