"""`megagen data encode`: clips made here with PyAV (VP9 in MP4 for DALI, H.264 for the PyAV fallback, a
corrupt file, a too-short clip) → encode → `megagen data check` passes → `megagen train` trains on it;
a rerun skips what is done."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megagen.cli import main
from megagen.data.encode.buckets import parse_buckets
from megagen.data.encode.frames import fit_to_bucket, sample_times
from megagen.data.encode.video_dali import dali_video_available
from megagen.media.video_file import write_video
from megagen.specs.tae.load import tiny_tae_for_tests

WORDS = "a red green blue cat dog runs jumps over the".split()
ENCODE_ARGS = ["--fps", "16", "--buckets", "tiny", "--text-len", "8", "--shard-mb", "0.002"]
"""Tiny buckets at 16 fps; ~2 KB shards: one sample per shard, so a bucket has several."""


def make_clip(path, codec, frames, width=64, height=64, fps=16, seed=0):
    """A small clip of moving colour bars, written with PyAV."""
    base = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    video = np.stack([np.roll(base, 4 * i, axis=1) for i in range(frames)])
    assert write_video(path, video, fps, codec=codec)


def make_text_encoder(path):
    """A tiny randomly initialised T5 encoder (width 24: the tiny video spec's ul2) and a word-level
    tokenizer, saved to `path`: everything offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(vocab), d_model=24, d_kv=8, num_heads=2, num_layers=1, d_ff=32)
    T5EncoderModel(cfg).save_pretrained(path)
    return str(path)


def make_source(root, good=4, ul2=False):
    """SRC with `good` usable clips (VP9 in MP4 and WebM at 64x64 / 96x64, one H.264), a corrupt file, a
    truncated one and a too-short clip; captions and pre-computed byt5/metaclip (with `ul2`, also ul2)
    embeddings beside each."""
    src = root / "videos"
    src.mkdir()
    clips = []
    for i in range(good):
        codec, suffix = ("libx264", "mp4") if i == 1 else ("libvpx-vp9", "webm" if i == 2 else "mp4")
        width, frames = (96, 16) if i % 2 else (64, 8)
        name = f"clip{i}.{suffix}"
        make_clip(src / name, codec, frames, width=width, seed=i)
        clips.append(name)
    make_clip(src / "short.mp4", "libvpx-vp9", 3)
    (src / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    make_clip(root / "whole.webm", "libvpx-vp9", 32)
    whole = (root / "whole.webm").read_bytes()
    (src / "truncated.webm").write_bytes(whole[: len(whole) * 4 // 5])  # declares 32 frames, decodes fewer
    rng = np.random.default_rng(1)
    for name in [*clips, "short.mp4", "corrupt.mp4", "truncated.webm"]:
        stem = os.path.splitext(name)[0]
        (src / f"{stem}.txt").write_text(" ".join(rng.choice(WORDS, 5)))
        np.save(src / f"{stem}.byt5.npy", rng.standard_normal((6, 16)).astype(np.float32))
        np.save(src / f"{stem}.metaclip.npy", rng.standard_normal((4, 12)).astype(np.float32))
        if ul2:  # pre-computed too: no text encoder to load
            np.save(src / f"{stem}.ul2.npy", rng.standard_normal((5, 24)).astype(np.float32))
    return src


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    src = make_source(root)
    tae = str(tiny_tae_for_tests(root))
    t5 = make_text_encoder(root / "t5")
    out = root / "ds"
    args = ["data", "encode", str(src), "--tae", tae, "--out", str(out), *ENCODE_ARGS, "--text-encoder", t5]
    return root, src, out, args


def _run_json(args, capsys) -> dict:
    capsys.readouterr()
    assert main([*args, "--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)


def test_encode_check_train_rerun(encoded, capsys):
    root, src, out, args = encoded
    summary = _run_json(args, capsys)
    assert summary["inputs"] == 7 and summary["encoded"] == 4 and summary["skipped_done"] == 0
    assert summary["bad"] == {"corrupt": 1, "too_short": 1, "truncated": 1}
    # the H.264 clip goes to PyAV: DALI's CPU backend refuses the codec
    assert summary["decoded_with"] == ({"dali": 3, "pyav": 1} if dali_video_available() else {"pyav": 4})
    assert summary["samples"] == 4

    assert main(["data", "check", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {b["name"]: b["samples"] for b in manifest["buckets"]} == {"t1_h8_w8": 2, "t2_h8_w12": 2}
    assert [len(b["shards"]) for b in manifest["buckets"]] == [2, 2]
    assert manifest["fps_values"] == [16.0]
    assert set(manifest["text_encoders"]) == {"ul2", "byt5", "metaclip"}

    rerun = _run_json(args, capsys)
    assert rerun["skipped_done"] == 7 and rerun["encoded"] == 0 and rerun["samples"] == 4
    assert main(["data", "check", str(out)]) == 0

    run_dir = root / "run"
    overrides = [f"data.path={out}", "data.synthetic=false", "train.steps=2", f"run.dir={run_dir}"]
    overrides += ["train.global_batch_size=2", "metrics.tensorboard=false", "data.num_workers=0"]
    assert main(["train", "examples/configs/video_tiny.yaml", *overrides]) == 0


def test_buckets_and_frames():
    buckets = parse_buckets("64x64,96x64@0.5,1")
    assert buckets.choose(200, 130, 3.0).width == 96  # nearest aspect ratio, longest duration covered
    assert buckets.choose(60, 64, 0.6).duration == 0.5
    assert buckets.choose(64, 64, 0.4) is None  # too short for every bucket
    assert sample_times(10, 30.0, 15.0, 4) == [0, 2, 4, 6]
    assert sample_times(3, 10.0, 20.0, 6) == [0, 0, 1, 1, 2, 2]
    frames = np.full((2, 50, 100, 3), 255, dtype=np.uint8)
    x = fit_to_bucket(frames, buckets.choose(100, 50, 1.0))
    assert tuple(x.shape) == (3, 2, 64, 96) and float(x.min()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        parse_buckets("60x64@1")


def test_decoder_falls_back_to_pyav_once_per_codec(tmp_path):
    from megagen.data.encode.decode import VideoDecoder
    from megagen.data.encode.video_pyav import decode_pyav

    for name, codec in [("a.mp4", "libx264"), ("b.mp4", "libx264"), ("c.mp4", "libvpx-vp9")]:
        make_clip(tmp_path / name, codec, 8)
    logged = []
    decoder = VideoDecoder("auto", log=logged.append)
    got = [decoder.decode(str(tmp_path / n)) for n in ("a.mp4", "b.mp4", "c.mp4")]
    assert all(v.frames.shape == (8, 64, 64, 3) and v.fps == 16.0 for v in got)
    # a long clip is decoded only as far as the longest bucket needs: 0.25 s at 16 fps, + 1 frame
    assert [len(decoder.decode(str(tmp_path / n), max_seconds=0.25).frames) for n in ("a.mp4", "c.mp4")] == [
        5,
        5,
    ]
    if not dali_video_available():
        pytest.skip("DALI is not installed: everything is decoded with PyAV")
    assert [v.backend for v in got] == ["pyav", "pyav", "dali"]  # DALI's CPU backend has no H.264
    assert len(logged) == 1 and "h264" in logged[0]
    # the same frames in the same order (their chroma upsampling differs: compare 8x8 block means)
    blocks = [
        f.reshape(8, 8, 8, 8, 8, 3).mean(axis=(2, 4))
        for f in (got[2].frames, decode_pyav(str(tmp_path / "c.mp4")))
    ]
    assert np.abs(blocks[0] - blocks[1]).mean() < 3


def test_list_file_inputs(tmp_path):
    from megagen.data.encode.inputs import list_inputs
    from megagen.data.format import DataError

    (tmp_path / "list.jsonl").write_text(
        '{"path": "v/a.mp4", "caption": "a cat"}\n\n{"path": "b.webm", "text": {"byt5": "b.npy"}}\n'
    )
    a, b = list_inputs(str(tmp_path / "list.jsonl"))
    assert (a.key, a.caption, a.index, a.path) == ("v/a.mp4", "a cat", 0, str(tmp_path / "v/a.mp4"))
    assert b.text_files == {"byt5": str(tmp_path / "b.npy")} and b.caption is None and b.index == 1
    (tmp_path / "bad.jsonl").write_text('{"caption": "no path"}\n')
    with pytest.raises(DataError, match="line 1"):
        list_inputs(str(tmp_path / "bad.jsonl"))


def test_bad_options_fail_in_one_line_before_out_is_touched(tmp_path, capsys):
    (tmp_path / "a.mp4").write_bytes(b"not a video")
    np.save(tmp_path / "a.ul2.npy", np.zeros((3, 24), np.float32))
    out = tmp_path / "out"
    base = ["data", "encode", str(tmp_path), "--out", str(out), "--buckets", "tiny"]
    for extra, message in [
        (["--tae", str(tmp_path / "missing.safetensors")], "missing.safetensors"),
        (["--tae", "x", "--fps", "40"], "outside 16"),
        (["--tae", "x", "--buckets", "64x60@1"], "multiple of 8"),
    ]:
        capsys.readouterr()
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_progress_ignores_cut_lines_and_lost_shards(tmp_path):
    """A crash can cut the done-list's last line or lose a shard file: those inputs are simply not done."""
    from megagen.data.encode import progress
    from megagen.data.format import DataError

    progress.prepare_output(str(tmp_path), "encode:key", overwrite=False)
    (tmp_path / "t1_h8_w8").mkdir()
    (tmp_path / "t1_h8_w8" / "shard-r00000-00000.safetensors").write_bytes(b"x" * 10)
    shard = {"file": "t1_h8_w8/shard-r00000-00000.safetensors", "samples": 1, "bytes": 10, "sha256": "0" * 64}
    shard |= {"bucket": "t1_h8_w8", "latent_shape": [16, 1, 8, 8]}
    lost = shard | {"file": "t1_h8_w8/shard-r00000-00001.safetensors"}
    lines = [
        json.dumps({"shard": shard, "inputs": ["a.mp4"], "fps": [16.0]}),
        json.dumps({"shard": lost, "inputs": ["b.mp4"], "fps": [16.0]}),
        json.dumps({"bad": "c.mp4", "reason": "corrupt"}),
        '{"shard": {"file": "t1_h8_w8/shard-r00000-00002.safe',
    ]
    (tmp_path / progress.DONE_DIR / "rank-00000.jsonl").write_text("\n".join(lines))
    done = progress.read_progress(str(tmp_path))
    assert done.finished() == {"a.mp4", "c.mp4"} and done.bad == {"c.mp4": "corrupt"}
    assert progress.shards_written(str(tmp_path), 0) == 3  # the next shard never reuses a name
    with pytest.raises(DataError, match="another dataset or encode job"):
        progress.prepare_output(str(tmp_path), "encode:other", overwrite=False)
