"""The `megagen data encode` job: each rank encodes its share of the inputs, rank 0 writes the manifest.

Inputs are split rank-strided (input i goes to rank i mod world); an input finished by an earlier run of
the same job is skipped; a clip that cannot be used is logged, counted by reason and recorded as done,
never fatal. The manifest is written last, after every rank has written its shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from megagen.data.encode import progress as prog
from megagen.data.encode.buckets import BucketSet, parse_buckets
from megagen.data.encode.decode import VideoDecoder
from megagen.data.encode.frames import clip_for_bucket
from megagen.data.encode.inputs import EncodeInput, list_inputs
from megagen.data.encode.ranks import Ranks
from megagen.data.encode.shards import EncodedClip, RankShardWriter, build_manifest
from megagen.data.encode.summary import EncodeSummary
from megagen.data.encode.text import TextEmbedder
from megagen.data.encode.video_pyav import BadVideo
from megagen.data.format import DEFAULT_SHARD_MB, FORMAT_VERSION, LATENT_DTYPES
from megagen.data.manifest import TextEncoderInfo, write_manifest
from megagen.specs.tae.load import load_tae
from megagen.specs.tae.tiling import encode_tiled

FPS_RANGE = (16.0, 32.0)
"""Movie Gen samples training video at 16–32 fps; the rate is recorded per sample."""


@dataclass
class EncodeOptions:
    tae: str
    fps: float = 24.0
    buckets: str = "moviegen"
    text_encoders: dict[str, str] = field(default_factory=dict)
    text_len: int = 256
    latent_dtype: str = "float16"
    shard_mb: float = DEFAULT_SHARD_MB
    decoder: str = "auto"
    overwrite: bool = False

    def check(self) -> BucketSet:
        if not FPS_RANGE[0] <= self.fps <= FPS_RANGE[1]:
            raise ValueError(f"fps {self.fps:g} is outside {FPS_RANGE[0]:g}–{FPS_RANGE[1]:g}")
        if self.latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"latent dtype {self.latent_dtype!r} is not one of {', '.join(LATENT_DTYPES)}")
        if self.shard_mb <= 0:
            raise ValueError(f"shard size must be positive, got {self.shard_mb} MB")
        return parse_buckets(self.buckets)

    def plan_key(self, src: str) -> str:
        """What makes two runs the same job (a rerun resumes): everything but overwrite and the decoder."""
        opts = {k: v for k, v in asdict(self).items() if k not in ("overwrite", "decoder")}
        opts |= {"src": os.path.abspath(src), "format_version": FORMAT_VERSION}
        return "encode:" + hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()


@dataclass
class _Encoder:
    """Everything one clip goes through, built once per rank."""

    decoder: VideoDecoder
    buckets: BucketSet
    embedder: TextEmbedder
    tae: torch.nn.Module
    options: EncodeOptions
    device: torch.device

    @torch.no_grad()
    def clip(self, inp: EncodeInput) -> tuple[EncodedClip, str]:
        """One input → its encoded sample and the decoder used; BadVideo when it cannot be used."""
        text = self.embedder.embed(inp)
        video = self.decoder.decode(inp.path, max_seconds=max(self.buckets.durations))
        n, h, w = video.frames.shape[:3]
        bucket = self.buckets.choose(w, h, n / video.fps)
        if bucket is None:
            shortest = min(self.buckets.durations)
            raise BadVideo("too_short", f"{n / video.fps:.2f} s, the shortest bucket is {shortest:g} s")
        pixels = clip_for_bucket(video.frames, video.fps, self.options.fps, bucket)
        latent = encode_tiled(self.tae, pixels[None].to(self.device))[0].float().cpu().numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            latent = latent.astype(self.options.latent_dtype)
        if not np.isfinite(latent).all():
            raise BadVideo("nonfinite", f"its latent holds NaN or inf in {self.options.latent_dtype}")
        duration = bucket.frames(self.options.fps) / self.options.fps
        return EncodedClip(inp.key, latent, text, self.options.fps, duration, inp.index), video.backend


def encode(
    src: str, out: str, options: EncodeOptions, ranks: Ranks | None = None, log: Callable[[str], None] = print
) -> EncodeSummary:
    """Encode SRC's videos into the shard dataset OUT (see the module doc); the job's summary on rank 0,
    this rank's share of it elsewhere. No manifest (summary.samples 0) when nothing could be encoded."""
    start = time.perf_counter()
    ranks = ranks or Ranks()
    inputs = list_inputs(src)
    encoder = _build_encoder(inputs, options, log)  # every bad option fails here, before OUT is touched
    text = {enc: TextEncoderInfo(dim, options.text_len) for enc, dim in encoder.embedder.dims.items()}
    if ranks.rank == 0:
        prog.prepare_output(out, options.plan_key(src), options.overwrite)
    ranks.barrier()
    summary = _encode_share(inputs, out, ranks, encoder, text, log)
    ranks.barrier()
    summary.seconds = time.perf_counter() - start
    total = EncodeSummary.merged(ranks.gather(summary))
    if ranks.rank != 0:
        return summary
    total.samples = _write_manifest(out, options, text)
    return total


def _build_encoder(inputs: list[EncodeInput], options: EncodeOptions, log) -> _Encoder:
    buckets = options.check()
    device = _device()
    embedder = TextEmbedder(inputs, options.text_encoders, options.text_len, device)
    tae, _ = load_tae(options.tae, device)
    device_id = (device.index or 0) if device.type == "cuda" else None
    return _Encoder(VideoDecoder(options.decoder, device_id, log), buckets, embedder, tae, options, device)


def _device() -> torch.device:
    """This rank's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def _encode_share(inputs, out, ranks: Ranks, encoder: _Encoder, text, log) -> EncodeSummary:
    """This rank's inputs (rank-strided), minus those done earlier: encoded, or recorded as bad."""
    share = inputs[ranks.rank :: ranks.world]
    finished = prog.read_progress(out).finished()
    todo = [i for i in share if i.key not in finished]
    summary = EncodeSummary(inputs=len(share), skipped_done=len(share) - len(todo), out=out)
    first = prog.shards_written(out, ranks.rank)
    writer = RankShardWriter(out, ranks.rank, first, text, encoder.options.shard_mb * 2**20)
    for inp in todo:
        try:
            clip, backend = encoder.clip(inp)
        except BadVideo as exc:
            log(f"skipping {inp.key}: {exc}")
            writer.done.bad(inp.key, exc.reason)
            summary.bad[exc.reason] += 1
            continue
        writer.add(clip)
        summary.encoded += 1
        summary.decoded_with[backend] += 1
    writer.close()
    return summary


def _write_manifest(out: str, options: EncodeOptions, text: dict[str, TextEncoderInfo]) -> int:
    """Rank 0, after every rank finished: drop unlisted shard files, write the one manifest; its samples."""
    records = prog.read_progress(out).shards
    prog.remove_unlisted_shards(out, keep={r.info.file for r in records})
    if not records:
        return 0  # no manifest: nothing could be encoded, and an empty dataset is no dataset
    extra = {"encoded_from_videos": {"tae": os.path.abspath(options.tae), "fps": options.fps}}
    manifest = build_manifest(records, options.latent_dtype, text, extra)
    write_manifest(out, manifest)
    return manifest.num_samples
