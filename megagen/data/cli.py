"""`megagen data pack|synth|encode|check|stats`: build, verify and summarise latent-shard datasets.

`add_data_commands(subparsers)` registers `data` on the top-level argparse subparsers; `run_data_command`
runs the parsed command. Bad input or bad data ends in one line on stderr naming the file (and sample)
and a non-zero exit; `check` lists every problem, one per line.
"""

from __future__ import annotations

import argparse
import json
import sys

from megagen.data.format import DEFAULT_SHARD_MB, LATENT_DTYPES, DataError

DATA_DESCRIPTION = """build, verify and summarise latent-shard datasets (docs/data-format.md)

commands:
  synth   write a synthetic dataset with learnable structure (several buckets)
  pack    pack per-sample latents + text embeddings (SRC/metadata.jsonl) into bucketed shards
  encode  decode videos, encode them with the TAE and write bucketed latent shards
  check   verify manifest, sizes, checksums, shapes and values; print every problem
  stats   print buckets, sample counts, tokens and bytes (--tae CKPT --render N: decode N samples to MP4)
"""


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def _patch(text: str) -> tuple[int, ...]:
    try:
        p = tuple(int(x) for x in text.split(","))
    except ValueError:
        p = ()
    if len(p) != 3 or min(p) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not pt,ph,pw (e.g. 1,2,2)")
    return p


_SHARD_HELP = (
    f"target shard file size in MB (default {DEFAULT_SHARD_MB:g}); a bucket gets as few files as fit"
)
_OVERWRITE_HELP = "replace a different dataset already in DIR (rerunning the same command resumes instead)"


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Register `data` and its sub-commands on an argparse subparsers object; returns the `data` parser."""
    data = subparsers.add_parser(
        "data",
        help="build, verify and summarise latent-shard datasets",
        description=DATA_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data.set_defaults(data_parser=data)
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    for add in (_add_synth, _add_pack, _add_encode, _add_check, _add_prompts, _add_stats):
        add(sub)
    return data


def _add_synth(sub) -> None:
    from megagen.data.synth import SYNTH_PRESETS

    s = sub.add_parser(
        "synth",
        help="write a synthetic dataset",
        description=(
            "Write a seeded synthetic dataset: each sample is one of --classes (caption, video) pairs, "
            "its text embeddings the class's and its latents the class's smooth pattern, so a model can "
            "learn it. "
            "Interrupted runs resume."
        ),
    )
    s.add_argument(
        "--preset", default="video_tiny", choices=sorted(SYNTH_PRESETS), help="shapes and encoders"
    )
    s.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    s.add_argument(
        "--samples", type=_positive_int, default=256, help="total samples, split evenly over buckets"
    )
    s.add_argument(
        "--buckets",
        default=None,
        metavar="LIST",
        help="comma-separated t<T>_h<H>_w<W> latent buckets (default: the preset's, "
        "an image bucket and two video buckets)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed")
    s.add_argument("--classes", type=_positive_int, default=8, help="distinct (caption, video) pairs")
    s.add_argument("--shard-mb", type=_positive_float, default=DEFAULT_SHARD_MB, help=_SHARD_HELP)
    s.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    s.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")


def _add_pack(sub) -> None:
    p = sub.add_parser(
        "pack",
        help="pack per-sample arrays into shards",
        description=(
            "Pack SRC/metadata.jsonl (one JSON object per sample: id, latent, text {encoder: file}, fps, "
            "duration, caption_id, optional fields {name: file}; arrays in .npy or .safetensors) into a "
            "bucketed shard dataset. An interrupted pack resumes: rerun the same command."
        ),
    )
    p.add_argument("src", metavar="SRC", help="source directory holding metadata.jsonl")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument(
        "--buckets",
        default=None,
        metavar="RULES",
        help="comma-separated t<T>_h<H>_w<W> buckets; a latent goes to the bucket of its shape, else "
        "to the largest listed bucket that fits inside it (cropped: leading frames, centred "
        "window). Default: one bucket per distinct latent shape",
    )
    p.add_argument(
        "--drop-unfit", action="store_true", help="leave out latents that fit no bucket (else error)"
    )
    p.add_argument(
        "--max-len",
        default=None,
        metavar="N|ENC=N,...",
        help="text padding length, for every encoder or per encoder (default: the longest in SRC)",
    )
    p.add_argument("--latent-dtype", default="float16", choices=LATENT_DTYPES, help="stored latent dtype")
    p.add_argument("--spec", default="video", help="spec the data is for (recorded in the manifest)")
    p.add_argument("--shard-mb", type=_positive_float, default=DEFAULT_SHARD_MB, help=_SHARD_HELP)
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")


def _add_encode(sub) -> None:
    from megagen.data.encode.buckets import PRESETS

    e = sub.add_parser(
        "encode",
        help="encode video files into latent shards",
        description=(
            "Decode SRC's videos (a directory with <stem>.txt captions / <stem>.<encoder>.npy embeddings, or "
            "a .jsonl list), sample them at --fps, resize and crop them into aspect-ratio x duration "
            "buckets, encode them with the TAE and write a bucketed shard dataset. Under torchrun each rank "
            "encodes its share; a rerun skips finished inputs; bad videos are counted, never fatal."
        ),
    )
    e.add_argument("src", metavar="SRC", help="directory of videos, or a .jsonl list of them")
    e.add_argument("--tae", required=True, metavar="CKPT", help="TAE checkpoint")
    e.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    e.add_argument(
        "--fps", type=_positive_float, default=24.0, help="recorded frame rate, 16-32 (default 24)"
    )
    e.add_argument(
        "--buckets",
        default="moviegen",
        metavar="SPEC",
        help=f"a preset ({', '.join(PRESETS)}) or WxH,WxH,...@SECONDS,... (default moviegen: "
        f"{PRESETS['moviegen']})",
    )
    e.add_argument(
        "--text-encoder",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a local Hugging Face T5 encoder + tokenizer run on the captions, as text.NAME (default "
        "name ul2); repeatable. Other encoders come from pre-computed embedding files",
    )
    e.add_argument("--text-len", type=_positive_int, default=256, help="text padding length (default 256)")
    e.add_argument("--latent-dtype", default="float16", choices=LATENT_DTYPES, help="stored latent dtype")
    e.add_argument("--decoder", default="auto", choices=("auto", "dali", "pyav"), help="video decoder")
    e.add_argument("--shard-mb", type=_positive_float, default=DEFAULT_SHARD_MB, help=_SHARD_HELP)
    e.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    e.add_argument("-q", "--quiet", action="store_true", help="print only the summary")


def _add_check(sub) -> None:
    c = sub.add_parser(
        "check",
        help="verify a dataset; print every problem",
        description=(
            "Verify the manifest, every shard's presence, size, sha256 and header (fields, dtypes, "
            "per-bucket shapes), and every sample's values (NaN/inf latents or text, text lengths). Prints "
            "every problem with its file and sample; exits 1 if there is any."
        ),
    )
    c.add_argument("dir", metavar="DIR", help="dataset directory")
    c.add_argument("--threads", type=_positive_int, default=None, help="files verified in parallel")


def _add_prompts(sub) -> None:
    pr = sub.add_parser(
        "prompts",
        help="write stand-in prompt embeddings for `megagen sample`",
        description="Write seeded random text embeddings with the names and shapes CONFIG's spec reads "
        "(text.<encoder> (B, L, width) and text_valid.<encoder>): a file `megagen sample "
        "--prompt-embeddings` accepts, until real embeddings come from the text encoders.",
    )
    from megagen.cli import add_config_arguments

    add_config_arguments(pr)
    pr.add_argument("--out", required=True, metavar="FILE", help="output .npz or .safetensors file")
    pr.add_argument("--count", type=_positive_int, default=2, help="prompts in the batch (default 2)")
    pr.add_argument("--seed", type=int, default=0, help="seed of the random embeddings (default 0)")


def _add_stats(sub) -> None:
    t = sub.add_parser(
        "stats",
        help="print buckets, counts, tokens, bytes",
        description=(
            "Print each bucket's latent shape, samples, shards, tokens per sample (T/pt*H/ph*W/pw), "
            "total tokens and bytes, from the manifest. With --tae CKPT --render N, also decode N evenly "
            "spaced samples of one bucket (--bucket) to one MP4 each (at their recorded fps) and a "
            "contact_sheet.png, as `megagen sample --tae` does."
        ),
    )
    t.add_argument("dir", metavar="DIR", help="dataset directory")
    t.add_argument(
        "--patch",
        type=_patch,
        default=(1, 2, 2),
        metavar="PT,PH,PW",
        help="patch size for token counts (default 1,2,2: the video spec)",
    )
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_render_arguments(t)


def _add_render_arguments(t) -> None:
    """`stats --tae CKPT --render N`: look at a bucket's samples as the TAE decodes them."""
    t.add_argument("--tae", metavar="CKPT", help="with --render: the TAE that decodes the latents")
    t.add_argument(
        "--render",
        type=_positive_int,
        metavar="N",
        help="decode N evenly spaced samples of a bucket to MP4s + contact_sheet.png (needs --tae)",
    )
    t.add_argument(
        "--bucket", metavar="KEY", help="with --render: bucket name (default: the one with most frames)"
    )
    t.add_argument(
        "--render-out", metavar="OUT", help="with --render: output directory (default DIR/renders/KEY)"
    )
    t.add_argument(
        "--fps",
        type=_positive_float,
        default=24.0,
        help="with --render: frame rate of samples that record none (default 24)",
    )


def _summary(res, verb: str) -> str:
    m = res.manifest
    shards = sum(len(b.shards) for b in m.buckets)
    mb = sum(b.bytes for b in m.buckets) / 2**20
    line = (
        f"{verb} {res.out}: {m.num_samples} samples in {len(m.buckets)} bucket(s) "
        f"({', '.join(f'{b.name}: {b.samples}' for b in m.buckets)}), {shards} shard(s), {mb:.2f} MB"
    )
    if res.reused:
        line += f"; {len(res.reused)} shard(s) kept from an interrupted run"
    if res.dropped:
        line += f"; {len(res.dropped)} sample(s) fit no bucket and were left out"
    return line


def _cmd_synth(args) -> int:
    from megagen.data.synth import synth

    log = None if args.quiet else print
    res = synth(
        args.out,
        preset=args.preset,
        samples=args.samples,
        buckets=args.buckets,
        seed=args.seed,
        shard_mb=args.shard_mb,
        classes=args.classes,
        overwrite=args.overwrite,
        log=log,
    )
    print(_summary(res, "synth"))
    return 0


def _cmd_pack(args) -> int:
    from megagen.data.pack import pack

    log = None if args.quiet else print
    res = pack(
        args.src,
        args.out,
        buckets=args.buckets,
        shard_mb=args.shard_mb,
        max_len=args.max_len,
        latent_dtype=args.latent_dtype,
        spec=args.spec,
        drop_unfit=args.drop_unfit,
        overwrite=args.overwrite,
        log=log,
    )
    print(_summary(res, "packed"))
    return 0


def _cmd_encode(args) -> int:
    from megagen.data.encode.ranks import ranks_from_env
    from megagen.data.encode.run import EncodeOptions, encode
    from megagen.data.encode.text import parse_text_encoders

    options = EncodeOptions(
        tae=args.tae,
        fps=args.fps,
        buckets=args.buckets,
        text_encoders=parse_text_encoders(args.text_encoder),
        text_len=args.text_len,
        latent_dtype=args.latent_dtype,
        shard_mb=args.shard_mb,
        decoder=args.decoder,
        overwrite=args.overwrite,
    )
    ranks = ranks_from_env()
    prefix = f"[rank {ranks.rank}] " if ranks.world > 1 else ""
    log = (lambda msg: None) if args.quiet else (lambda msg: print(prefix + msg, flush=True))
    try:
        summary = encode(args.src, args.out, options, ranks, log=log)
    finally:
        ranks.close()
    if ranks.rank != 0:
        return 0
    print(json.dumps(summary.to_dict(), indent=1) if args.json else summary.format())
    if not summary.samples:
        print(f"megagen data encode: no clip could be encoded; no dataset in {args.out}", file=sys.stderr)
        return 1
    return 0


def _cmd_check(args) -> int:
    from megagen.data.check import check_dataset, dataset_stats

    problems = check_dataset(args.dir, threads=args.threads)
    for p in problems:
        print(p)
    if problems:
        print(f"megagen data check: {len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    st = dataset_stats(args.dir)
    print(
        f"{args.dir}: OK: {st.samples} samples, {len(st.buckets)} bucket(s), "
        f"{sum(b.shards for b in st.buckets)} shard(s), {st.bytes / 2**20:.2f} MB verified"
    )
    return 0


def _cmd_stats(args) -> int:
    from megagen.data.check import dataset_stats

    if bool(args.render) != bool(args.tae):
        print("megagen data stats: --render N and --tae CKPT go together", file=sys.stderr)
        return 1
    st = dataset_stats(args.dir, patch=args.patch)
    print(json.dumps(st.to_dict(), indent=1) if args.json else st.format())
    if args.render:
        _render_samples(args)
    return 0


def _render_samples(args) -> None:
    from megagen.media.dataset_render import render_bucket_samples

    bucket, ids, out, files = render_bucket_samples(
        args.dir, args.tae, args.render, args.bucket, args.render_out, args.fps
    )
    print(
        f"rendered {len(ids)} sample(s) of {bucket} (ids {ids}) → {out}: {', '.join(files) or 'nothing'}",
        file=sys.stderr if args.json else sys.stdout,
    )


def _cmd_prompts(args) -> int:
    from megagen.config import load_config
    from megagen.data.prompts import write_prompt_embeddings

    cfg = load_config(args.config, args.overrides)
    shapes = write_prompt_embeddings(cfg, args.out, args.count, args.seed)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()))
    return 0


def run_data_command(args) -> int:
    """Run a parsed `megagen data ...` command; 0 on success, 1 on bad data/input, 2 without a sub-command."""
    handlers = {
        "synth": _cmd_synth,
        "pack": _cmd_pack,
        "encode": _cmd_encode,
        "check": _cmd_check,
        "stats": _cmd_stats,
        "prompts": _cmd_prompts,
    }
    command = getattr(args, "data_command", None)
    if command is None:
        args.data_parser.print_help()
        return 2
    try:
        return handlers[command](args)
    except DataError as exc:
        print(f"megagen data {command}: {exc}", file=sys.stderr)
    except (ValueError, OSError) as exc:
        print(f"megagen data {command}: {exc}", file=sys.stderr)
    return 1
