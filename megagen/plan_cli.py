"""`megagen plan`: rank parallel layouts for a spec on a cluster, or validate predictions on a config.

megagen plan --model video --preset 30b --seq 73728 --cluster h100 --gpus 6144 --global-batch 1536
megagen plan --config CONFIG [--gpus N --cluster NAME] [--write OUT.yaml]
megagen plan --validate CONFIG [key=value…]      # run a few steps, predicted vs measured bytes/memory
megagen plan --calibrate --out my-cpu.yaml        # measure this machine into a cluster file
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from megagen.config import ConfigError, load_config


def add_plan_command(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="predict step time, MFU, comm and memory of parallel layouts; pick the best",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides", nargs="*", metavar="OVERRIDE", help="dotted config overrides (with --config/--validate)"
    )
    p.add_argument("--model", default="video", help="spec name (default video)")
    p.add_argument("--preset", default="tiny", help="spec preset (e.g. 30b)")
    p.add_argument(
        "--seq", type=int, default=0, help="video tokens per sample (e.g. 73728 = 32×48×48 patches)"
    )
    p.add_argument("--text-tokens", type=int, default=128, help="tokens per text encoder")
    p.add_argument("--cluster", default="h100", help="preset (h100, h200, a100, b200, cpu) or a YAML file")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs")
    p.add_argument("--global-batch", type=int, default=0, help="samples per optimizer step (default: gpus/8)")
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--config", default="", help="plan for this training config")
    p.add_argument(
        "--write", default="", help="with --config: write the config with the best plan's parallel.* keys"
    )
    p.add_argument(
        "--validate", default="", help="run a few steps of this config and compare with the prediction"
    )
    p.add_argument("--calibrate", action="store_true", help="measure this machine and write a cluster file")
    p.add_argument("--out", default="cluster-calibrated.yaml", help="with --calibrate: output file")


def latent_for_tokens(tokens: int, patch=(1, 2, 2)) -> tuple[int, int, int]:
    """A (T, H, W) latent with `tokens` patches: square frames of side² patches, T frames."""
    for frames in (32, 16, 8, 4, 2, 1):
        per_frame = tokens // frames
        side = math.isqrt(per_frame)
        if frames * side * side == tokens:
            return frames * patch[0], side * patch[1], side * patch[2]
    return tokens * patch[0], patch[1], patch[2]


def _config_for(args) -> object:
    if args.config:
        return load_config(args.config, args.overrides)
    cfg = load_config(None, [f"model.spec={args.model}", f"model.preset={args.preset}"])
    if args.seq:
        t, h, w = latent_for_tokens(args.seq)
        cfg.data.latent_frames, cfg.data.latent_height, cfg.data.latent_width = t, h, w
    cfg.data.text_tokens = args.text_tokens
    return cfg


LEGEND = """columns: plan = tp<N>[+sp] (tensor parallel, +sp sequence parallel) cp<N>[-ag|-uly] (context
parallel, all-gather K/V or Ulysses all-to-all) fsdp<N> (FSDP shard group) [rep<N> (HSDP replicas)]
mb<N> (micro-batch) rc:<none|selective|full|fullK> (activation recompute; fullK = the first K blocks);
step s = predicted step time; MFU = model FLOPs / (step time x peak); exp.comm = communication not
hidden behind compute, % of the step; mem GB = predicted peak memory per GPU; tok/s/GPU = video tokens
per second per GPU; fits = peak memory within the device's usable memory."""


def format_count(n: float) -> str:
    """1234 → '1.23 K', 29.3e9 → '29.30 B': parameter counts of any size stay readable."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _print_table(rows: list[dict], stream) -> None:
    head = f"{'plan':44s} {'step s':>8s} {'MFU':>6s} {'exp.comm':>8s} {'mem GB':>7s} {'tok/s/GPU':>10s} fits"
    stream.write(head + "\n")
    for r in rows:
        stream.write(
            f"{r['plan']:44s} {r['step_s']:8.3f} {r['mfu']:6.1%} {r['exposed_comm_pct']:7.1f}% "
            f"{r['peak_memory_gb']:7.1f} {r['tokens_per_s_per_gpu']:10.1f} {'yes' if r['fits'] else 'NO'}\n"
        )


def run_plan_command(args) -> int:
    from megagen.parallel.planner.cluster import load_cluster
    from megagen.parallel.planner.search import search
    from megagen.planning import workload_for_config

    if args.calibrate:
        from megagen.parallel.planner.calibrate import calibrate

        cluster = calibrate()
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(cluster.to_yaml())
        print(f"wrote {args.out}: {cluster}")
        return 0
    if args.validate:
        from megagen.parallel.planner.validate import validate_config

        return validate_config(args.validate, args.overrides, args.cluster, as_json=args.json)
    try:
        cluster = load_cluster(args.cluster)
    except ValueError as exc:
        raise ConfigError("--cluster", str(exc)) from exc
    cfg = _config_for(args)
    work = workload_for_config(cfg)
    default_batch = cfg.train.global_batch_size if args.config else max(1, args.gpus // 8)
    global_batch = args.global_batch or default_batch
    ranked = search(work, args.gpus, global_batch, cluster, top=args.top)
    if not ranked:
        raise ConfigError("--gpus", f"no layout of {args.gpus} GPUs divides global batch {global_batch}")
    rows = [r.row() for r in ranked]
    if args.json:
        sys.stdout.write(
            json.dumps(
                {
                    "workload": {"tokens": work.tokens, "layers": work.layers, "params": work.num_params},
                    "plans": rows,
                }
            )
            + "\n"
        )
    else:
        sys.stdout.write(
            f"{cfg.model.spec}/{cfg.model.preset}: {format_count(work.num_params)} params, "
            f"{work.tokens} tokens/sample, "
            f"global batch {global_batch}, {args.gpus} × {cluster.device} ({cluster.name})\n"
        )
        _print_table(rows, sys.stdout)
        sys.stdout.write(LEGEND + "\n")
    if args.write and args.config:
        import yaml

        best = ranked[0].plan
        with open(args.config, encoding="utf-8") as fh:
            tree = yaml.safe_load(fh) or {}
        tree.setdefault("parallel", {}).update(
            {
                "dp_replicate": best.dp_replicate,
                "dp_shard": best.dp_shard,
                "cp": best.cp,
                "tp": best.tp,
                "cp_kind": best.cp_kind,
            }
        )
        tree.setdefault("train", {}).update(
            {
                "micro_batch_size": best.micro_batch,
                "recompute": best.recompute,
                "recompute_layers": best.recompute_layers,
                "global_batch_size": global_batch,
            }
        )
        with open(args.write, "w", encoding="utf-8") as fh:
            yaml.safe_dump(tree, fh, sort_keys=False)
        print(f"wrote {args.write} with the best plan: {best.label()}")
    return 0
