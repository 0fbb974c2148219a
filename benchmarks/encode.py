"""`megagen data encode` throughput: decode frames/s with DALI vs PyAV on the same clips, and encode clips/s.

It writes `--clips` clips (`--size` WxH, `--frames` frames at 16 fps, VP9 in MP4: a codec DALI's CPU
backend decodes, so both decoders see the same bytes) into `--root` (reused when present), then measures,
best of `--repeat`:

- decode: every clip decoded to RGB frames by DALI (CPU backend here, "mixed" on a GPU; one pipeline fed
  clip by clip, as the encode job does) and by PyAV (the fallback and the baseline), frames/s and the ratio;
- encode: the whole `megagen data encode` job (probe, decode, fps sampling, resize + crop, tiled TAE
  encode, shard writing, manifest) over the same clips, clips/s, once with each decoder. The TAE is
  `--tae` or a randomly initialised tiny one; the text is a pre-computed embedding per clip.

    python benchmarks/encode.py [--clips 16] [--size 256x256] [--frames 64] [--tae CKPT] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

from megagen.data.encode.ranks import Ranks
from megagen.data.encode.run import EncodeOptions, encode
from megagen.data.encode.video_dali import DaliVideoDecoder, dali_video_available
from megagen.data.encode.video_pyav import decode_pyav
from megagen.media.video_file import write_video

FPS = 16


def make_clips(root: str, clips: int, width: int, height: int, frames: int) -> list[str]:
    """VP9-in-MP4 clips of moving noise (hard to compress, like real video) + a ul2 embedding each."""
    src = os.path.join(root, f"clips-{clips}x{width}x{height}x{frames}")
    paths = [os.path.join(src, f"clip{i:04d}.mp4") for i in range(clips)]
    if all(os.path.exists(p) for p in paths):
        return paths
    os.makedirs(src, exist_ok=True)
    rng = np.random.default_rng(0)
    for path in paths:
        base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        video = np.stack([np.roll(base, 3 * k, axis=1) for k in range(frames)])
        if not write_video(path, video, FPS, codec="libvpx-vp9"):
            raise SystemExit("benchmarks/encode.py needs PyAV (pip install av)")
        np.save(path[:-4] + ".ul2.npy", rng.standard_normal((8, 24)).astype(np.float32))
    return paths


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def decode_rows(paths: list[str], repeat: int) -> list[dict]:
    decoders = {"pyav": decode_pyav}
    if dali_video_available():
        import torch

        dali = DaliVideoDecoder(0 if torch.cuda.is_available() else None)
        dali.decode(paths[0])  # the pipeline's build is a once-per-job cost
        decoders["dali"] = dali.decode
    rows = []
    for name, decode in decoders.items():
        seconds, frames = best_of(repeat, lambda decode=decode: sum(len(decode(p)) for p in paths))
        rows.append({"what": f"decode {name}", "seconds": seconds, "frames_per_s": frames / seconds})
    return rows


def encode_rows(paths: list[str], root: str, tae: str, width: int, height: int, frames: int, repeat: int):
    rows = []
    buckets = f"{width}x{height}@{frames / FPS:g}"
    for decoder in ["pyav"] + (["dali"] if dali_video_available() else []):
        out = os.path.join(root, f"ds-{decoder}")
        options = EncodeOptions(tae=tae, fps=FPS, buckets=buckets, text_len=8, decoder=decoder)

        def job(out=out, options=options):
            shutil.rmtree(out, ignore_errors=True)
            return encode(os.path.dirname(paths[0]), out, options, Ranks(), log=lambda msg: None)

        seconds, summary = best_of(repeat, job)
        assert summary.encoded == len(paths), summary.to_dict()
        rows.append(
            {
                "what": f"encode job ({decoder} decode)",
                "seconds": seconds,
                "clips_per_s": len(paths) / seconds,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/tmp/megagen-bench-encode", help="clips and outputs (reused)")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--size", default="256x256", help="WxH of the clips (multiples of 8)")
    ap.add_argument("--frames", type=int, default=64, help="frames per clip (at 16 fps)")
    ap.add_argument("--tae", default=None, help="TAE checkpoint (default: a random tiny TAE)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    paths = make_clips(args.root, args.clips, width, height, args.frames)
    if args.tae is None:
        from megagen.specs.tae.load import tiny_tae_for_tests

        args.tae = str(tiny_tae_for_tests(args.root))
    rows = decode_rows(paths, args.repeat)
    rows += encode_rows(paths, args.root, args.tae, width, height, args.frames, args.repeat)
    print(f"{args.clips} clips, {width}x{height}, {args.frames} frames (VP9 in MP4), best of {args.repeat}")
    print(f"{'':28s} {'seconds':>9s} {'frames/s':>10s} {'clips/s':>9s}")
    for r in rows:
        fps = f"{r['frames_per_s']:10.1f}" if "frames_per_s" in r else f"{'-':>10s}"
        cps = f"{r['clips_per_s']:9.2f}" if "clips_per_s" in r else f"{'-':>9s}"
        print(f"{r['what']:28s} {r['seconds']:9.3f} {fps} {cps}")
    rates = {r["what"]: r["frames_per_s"] for r in rows if "frames_per_s" in r}
    if "decode dali" in rates:
        print(f"DALI / PyAV decode: {rates['decode dali'] / rates['decode pyav']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"clips": args.clips, "size": args.size, "frames": args.frames, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
