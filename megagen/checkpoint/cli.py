"""`megagen ckpt export | average | info`: checkpoint tools that run in one process, no mesh needed.

Wired into megagen/cli.py with `add_ckpt_commands(sub)` and the handler `run_ckpt_command`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CKPT_HELP = "a checkpoint directory (step-NNNNNN), or a checkpoint root holding `latest`"


def _add_verify(parser) -> None:
    parser.add_argument(
        "--verify",
        choices=("checksum", "size"),
        default="checksum",
        help="checksum (default): every file's checksum and size before reading; size: sizes only",
    )


def add_ckpt_commands(subparsers) -> argparse.ArgumentParser:
    """Add the `ckpt` command with its actions to the `megagen` subparsers."""
    p = subparsers.add_parser(
        "ckpt",
        help="inspect, export and average checkpoints",
        description="Checkpoint tools (single process; checkpoints of any mesh).",
    )
    sub = p.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    e = sub.add_parser(
        "export",
        help="consolidated weights into one safetensors file (or a diffusers directory)",
        description="Write the full (unsharded) weights of CKPT to OUT (.safetensors) with the spec, "
        "preset and step in its metadata; with --format diffusers, a save_pretrained directory.",
    )
    e.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    e.add_argument(
        "out", metavar="OUT", help="output file, e.g. model.safetensors, or directory (never overwritten)"
    )
    e.add_argument(
        "--format",
        choices=("megagen", "diffusers"),
        default="megagen",
        help="megagen (default): one safetensors file; diffusers: a directory from_pretrained loads",
    )
    e.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    _add_verify(e)
    a = sub.add_parser(
        "average",
        help="element-wise (weighted) mean of several checkpoints",
        description="Average the model weights of CKPT1 CKPT2 ... (same spec and preset). OUT ending in "
        ".safetensors writes an export file, anything else a weights-only checkpoint directory usable "
        "as checkpoint.init_from.",
    )
    a.add_argument("checkpoints", metavar="CKPT", nargs="+", help=CKPT_HELP)
    a.add_argument("--out", required=True, metavar="OUT", help="output directory or .safetensors file")
    a.add_argument(
        "--weights", default=None, metavar="W1,W2,...", help="per-checkpoint weights (default: uniform)"
    )
    a.add_argument("--ema", action="store_true", help="average the EMA weights instead of the trained ones")
    _add_verify(a)
    i = sub.add_parser(
        "info",
        help="step, spec, preset, mesh and sizes of a checkpoint",
        description="Describe a checkpoint: step, spec, preset, the mesh it was saved with, sizes.",
    )
    i.add_argument("checkpoint", metavar="CKPT", help=CKPT_HELP)
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_verify(i)
    return p


def checkpoint_info(path: str | Path, verify: str = "checksum") -> dict:
    """What `megagen ckpt info` shows, as a dict (after verifying the checkpoint as `verify` says)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megagen.checkpoint.layout import open_checkpoint
    from megagen.checkpoint.safe_reader import read_index

    ckpt, meta = open_checkpoint(path, "CKPT", verify)
    index = read_index(ckpt, "CKPT")
    groups: dict[str, dict[str, int]] = {}
    for fqn, md in index.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        numel = 1
        for n in md.size:
            numel *= n
        g = groups.setdefault(fqn.split(".", 1)[0], {"tensors": 0, "elements": 0, "bytes": 0})
        g["tensors"] += 1
        g["elements"] += numel
        g["bytes"] += numel * md.properties.dtype.itemsize
    files = meta.get("files", {})
    return {
        "path": str(ckpt),
        "kind": meta.get("kind"),
        "step": meta.get("step"),
        "spec": meta.get("spec"),
        "preset": meta.get("preset"),
        "mesh": meta.get("mesh"),
        "contents": groups,
        "files": len(files),
        "bytes_on_disk": sum(files.values()),
        "verified": verify if verify == "size" or "checksums" in meta else "size (no checksums recorded)",
        "torch": meta.get("torch"),
        "saved_at": meta.get("saved_at"),
        "sampler": meta.get("sampler"),
        **({"averaged_from": meta["averaged_from"]} if "averaged_from" in meta else {}),
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_info(info: dict) -> str:
    mesh = info.get("mesh") or {}
    axes = " ".join(f"{a}={mesh.get(a)}" for a in ("dp_replicate", "dp_shard", "cp", "tp"))
    lines = [
        f"checkpoint {info['path']}",
        f"  kind      {info['kind']}",
        f"  step      {info['step']}",
        f"  spec      {info['spec']}   preset {info['preset']}",
        f"  mesh      world_size={mesh.get('world_size')} {axes}",
        f"  on disk   {info['files']} files, {_mb(info['bytes_on_disk'])}, verified: {info['verified']}",
    ]
    for name, g in info["contents"].items():
        lines.append(f"  {name:9s} {g['tensors']} tensors, {g['elements']:,} elements, {_mb(g['bytes'])}")
    if info.get("averaged_from"):
        lines.append(f"  averaged  {', '.join(info['averaged_from'])}")
    return "\n".join(lines)


def run_ckpt_command(args) -> int:
    """Handler of `megagen ckpt ...`; bad input raises CheckpointError (a ConfigError)."""
    if args.ckpt_command == "export":
        from megagen.checkpoint.export import export_diffusers, export_safetensors

        export = export_diffusers if args.format == "diffusers" else export_safetensors
        out = export(args.checkpoint, args.out, ema=args.ema, verify=args.verify)
        print(f"wrote {out}")
    elif args.ckpt_command == "average":
        from megagen.checkpoint.average import average_checkpoints, parse_weights

        weights = parse_weights(args.weights, len(args.checkpoints))
        out = average_checkpoints(args.checkpoints, args.out, weights, ema=args.ema, verify=args.verify)
        print(f"wrote {out}")
    elif args.ckpt_command == "info":
        info = checkpoint_info(args.checkpoint, args.verify)
        print(json.dumps(info, indent=1) if args.json else format_info(info))
    else:  # pragma: no cover - argparse enforces the choices
        raise ValueError(args.ckpt_command)
    return 0
