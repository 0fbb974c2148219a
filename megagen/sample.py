"""`megagen sample CKPT|CONFIG --prompt-embeddings FILE --steps N --cfg S --out DIR`: generate latents.

CKPT|CONFIG (the source) is one of
  CONFIG.yaml         the config's spec and preset with freshly initialised weights (seeded by run.seed);
                      for smoke tests, or with --weights FILE.safetensors for trained weights
  CKPT (directory)    a megagen checkpoint (or a checkpoint directory holding `latest`); its config comes
                      from the checkpoint, its weights (or the EMA weights, --ema) are loaded
  WEIGHTS.safetensors an exported weights file (`megagen ckpt export`); its config comes from the file's
                      header, or from --config

Dotted `key=value` overrides apply on top of the config (e.g. `data.latent_frames=8` for a longer sample).
A dotted-path spec (`model.spec=pkg.module:NAME`) found inside a checkpoint or weights file is not imported
unless the same value is given again on the command line: megagen imports code only when the user names it.

The prompt-embeddings FILE (`.safetensors`, `.npz`, or a `.npy` holding a dict, read without executing
pickled code) maps names to arrays: `text.<encoder>` (B, L, width) for every text encoder of the spec
(`megagen specs`; see the spec's `sample_shapes`), optionally `text_valid.<encoder>` (B, L) key masks, and
whatever other condition the spec needs (the upsampler's `lowres_latents`, the audio spec's
`video_features` / `context_mask`). Without the leading batch dimension the file holds one prompt. A
`latents` array, when present, is passed as given (the audio spec reads it as the known context) and sets
the output shape; otherwise the shape is `--latent-shape` or the spec's shape for the config's data keys.

The spec's sampler runs (default: Euler over Movie Gen's linear-quadratic schedule with classifier-free
guidance; windowed MultiDiffusion for the specs that define it), and DIR receives `latents.npy` and
`latents.safetensors` (B, C, ...) float32, and `sample.json` describing the run. With `--tae CKPT` the
latents are also decoded by that temporal autoencoder (tiled over time) into `sample_<i>.mp4` per sample
(at `--fps`, default 24) and `contact_sheet.png` (rows = samples, columns = evenly spaced frames); a TAE
whose latent channels differ from the model's is refused before sampling.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megagen.config import ConfigError
from megagen.sample_inputs import make_batch, read_prompt_file
from megagen.sample_model import load_model

log = logging.getLogger("megagen")

DEFAULT_FPS = 24.0
"""Frame rate of `--tae` videos when `--fps` is not given (the configs record none)."""


def sample_latents(
    source: str,
    prompt_file: str,
    out: str,
    steps: int = 50,
    cfg_scale: float = 1.0,
    seed: int = 0,
    overrides: list[str] = (),
    config: str | None = None,
    weights: str | None = None,
    ema: bool = False,
    latent_shape: tuple[int, ...] | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    tae: str | None = None,
    fps: float = DEFAULT_FPS,
) -> dict:
    """Load, sample, write (with `tae`: also decode to MP4s + a contact sheet); returns the `sample.json`
    record."""
    out_dir = Path(out)
    targets = [out_dir / "latents.npy", out_dir / "latents.safetensors", out_dir / "sample.json"]
    if not overwrite and any(t.exists() for t in targets):
        raise ConfigError("--out", f"{out_dir} already holds samples; pass --overwrite to replace them")
    cfg, spec, model, origin = load_model(source, overrides, config, weights, ema)
    batch = make_batch(spec, cfg, read_prompt_file(prompt_file), latent_shape)
    decoder = None
    if tae:
        from megagen.media.render import load_decoder

        producer = f"spec {cfg.model.spec}/{cfg.model.preset}"
        decoder = load_decoder(tae, tuple(batch["latents"].shape), producer, device=device)
    dev = torch.device(device)
    model.to(dev)
    batch = {k: v.to(dev) for k, v in batch.items()}
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        latents = spec.sample(model, cfg, batch, steps=steps, cfg_scale=cfg_scale, generator=generator)
    seconds = time.perf_counter() - start
    array = latents.detach().float().cpu().contiguous()
    record = {
        "spec": cfg.model.spec,
        "preset": cfg.model.preset,
        "weights": origin,
        "prompt_embeddings": str(prompt_file),
        "steps": steps,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "shape": list(array.shape),
        "seconds": round(seconds, 3),
        "files": ["latents.npy", "latents.safetensors"],
    }
    if decoder is not None:
        _decode_videos(record, decoder, array, out_dir, tae, fps)
    _write(out_dir, array, record)
    return record


def _decode_videos(record: dict, decoder, latents: torch.Tensor, out_dir: Path, tae: str, fps: float) -> None:
    """`--tae`: the MP4s and contact sheet beside the latents, recorded in `sample.json`."""
    from megagen.media.render import render_latents

    start = time.perf_counter()
    files = render_latents(decoder, latents, out_dir, fps)
    record.update(tae=str(tae), fps=fps, decode_seconds=round(time.perf_counter() - start, 3))
    record["files"] += files


def _write(out_dir: Path, latents: torch.Tensor, record: dict) -> None:
    """Each file is written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in record.items() if k != "files"}
    writers = {
        "latents.npy": lambda f: np.save(f, latents.numpy()),
        "latents.safetensors": lambda f: save_file({"latents": latents}, f, metadata=meta),
    }
    for name, write in writers.items():
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        try:
            if name.endswith(".npy"):
                with open(tmp, "wb") as fh:
                    write(fh)
            else:
                write(str(tmp))
            os.replace(tmp, out_dir / name)
        finally:
            tmp.unlink(missing_ok=True)
    tmp = out_dir / f".sample.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "sample.json")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated shape such as 16,4,8,8")
    return shape


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return v


def add_sample_command(subparsers) -> argparse.ArgumentParser:
    """Register `sample` on the top-level argparse subparsers; returns its parser."""
    p = subparsers.add_parser(
        "sample",
        help="generate latents from prompt embeddings with a spec's sampler",
        description=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source", metavar="CKPT|CONFIG", help="checkpoint dir, exported .safetensors, or YAML config"
    )
    p.add_argument(
        "overrides", metavar="OVERRIDE", nargs="*", help="dotted overrides, e.g. data.latent_frames=8"
    )
    p.add_argument(
        "--prompt-embeddings", required=True, metavar="FILE", help=".safetensors / .npz / dict .npy"
    )
    p.add_argument("--steps", type=_positive_int, default=50, help="sampler steps (default 50)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (default 1: off)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--latent-shape", type=_shape, metavar="C,T,H,W", help="output latent shape per sample")
    p.add_argument("--config", metavar="CONFIG", help="config for a checkpoint / weights file (else its own)")
    p.add_argument("--weights", metavar="FILE", help="with a CONFIG: load these .safetensors weights")
    p.add_argument("--ema", action="store_true", help="with a checkpoint: use its EMA weights")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace samples already in DIR")
    p.add_argument(
        "--tae",
        metavar="CKPT",
        help="decode the latents with this TAE: one MP4 per sample + contact_sheet.png",
    )
    p.add_argument(
        "--fps",
        type=_positive_float,
        default=DEFAULT_FPS,
        help=f"with --tae: video frame rate (default {DEFAULT_FPS:g})",
    )
    return p


def run_sample_command(args) -> int:
    """Run a parsed `megagen sample`; ConfigError propagates (the CLI prints it and exits 2)."""
    try:
        record = sample_latents(
            args.source,
            args.prompt_embeddings,
            args.out,
            steps=args.steps,
            cfg_scale=args.cfg,
            seed=args.seed,
            overrides=args.overrides,
            config=args.config,
            weights=args.weights,
            ema=args.ema,
            latent_shape=args.latent_shape,
            device=args.device,
            overwrite=args.overwrite,
            tae=args.tae,
            fps=args.fps,
        )
    except ConfigError:
        raise
    except OSError as exc:
        print(f"megagen sample: {exc}", file=sys.stderr)
        return 1
    what = f"{record['spec']}/{record['preset']}, {record['steps']} steps, cfg {record['cfg_scale']}"
    files = f"{args.out}/latents.npy and latents.safetensors {tuple(record['shape'])}"
    if args.tae:
        videos = [f for f in record["files"] if not f.startswith("latents.")]
        files += f"; decoded with {args.tae}: {', '.join(videos) or 'nothing (PyAV / Pillow missing)'}"
    print(f"megagen sample: {what} → {files} in {record['seconds']} s")
    return 0
