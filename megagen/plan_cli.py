"""`megagen plan`: rank parallel layouts for a spec on a cluster, or validate predictions on a config.

megagen plan --model video --preset 30b --seq 73728 --cluster h100 --gpus 6144 --global-batch 1536
megagen plan --config CONFIG [--gpus N --cluster NAME] [--write OUT.yaml]
megagen plan --validate CONFIG [key=value…]      # a few steps: predicted vs measured bytes, memory, exposed s
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
    p.add_argument(
        "--cluster",
        default="",
        help="preset (h100, h200, a100, b200, cpu) or a YAML file (default h100; with --validate the "
        "preset of the run's device, cpu on a CPU run)",
    )
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs")
    p.add_argument("--global-batch", type=int, default=0, help="samples per optimizer step (default: gpus/8)")
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--config", default="", help="plan for this training config")
    p.add_argument(
        "--write",
        default="",
        help="with --config: write the config (its overrides applied) with every key of the best plan's "
        "layout; train.global_batch_size stays the config's unless --global-batch is given",
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
mb<N> (micro-batch) rc:<none|selective|full|fullK> (activation recompute; fullK = the first K blocks)
[sync:every|last] (with gradient accumulation under FSDP: reduce every micro-batch, or only the last one,
holding unsharded gradients until then; parallel.grad_sync) [overlap (parallel.overlap=true: TP/CP
traffic hidden behind compute, docs/planner.md)]; step s = predicted step time; MFU = model
FLOPs / (step time x peak); exp.comm = communication not hidden behind compute, % of the step; mem GB =
predicted peak memory per GPU; tok/s/GPU = video tokens per second per GPU; fits = peak memory within the
device's usable memory."""


def format_count(n: float) -> str:
    """1234 → '1.23 K', 29.3e9 → '29.30 B': parameter counts of any size stay readable."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _print_table(rows: list[dict], stream) -> None:
    w = max([44, *(len(r["plan"]) for r in rows)])
    head = f"{'plan':{w}s} {'step s':>8s} {'MFU':>6s} {'exp.comm':>8s} {'mem GB':>7s} {'tok/s/GPU':>10s} fits"
    stream.write(head + "\n")
    for r in rows:
        stream.write(
            f"{r['plan']:{w}s} {r['step_s']:8.3f} {r['mfu']:6.1%} {r['exposed_comm_pct']:7.1f}% "
            f"{r['peak_memory_gb']:7.1f} {r['tokens_per_s_per_gpu']:10.1f} {'yes' if r['fits'] else 'NO'}\n"
        )


def plan_fields(plan, global_batch: int) -> dict:
    """A plan's layout as structured JSON fields, and the override line that makes a config run it."""
    from megagen.planning import override_line, plan_overrides

    return {
        "tp": plan.tp,
        "cp": plan.cp,
        "cp_kind": plan.cp_kind,
        "dp_shard": plan.dp_shard,
        "dp_replicate": plan.dp_replicate,
        "micro_batch_size": plan.micro_batch,
        "accumulation": plan.accumulation,
        "recompute": plan.recompute,
        "recompute_layers": plan.recompute_layers,
        "grad_sync": plan.grad_sync,
        "overlap": plan.overlap,
        "overrides": override_line(plan_overrides(plan, global_batch)),
    }


def write_planned_config(src: str, overrides: list[str], plan, global_batch: int, out: str) -> None:
    """`src` with its command-line overrides and every key of `plan` set, as YAML at `out`."""
    from pathlib import Path

    import yaml

    from megagen.config.load import _read_yaml, parse_override
    from megagen.planning import plan_overrides

    tree = _read_yaml(Path(src))
    keys: dict[str, object] = dict(parse_override(o) for o in overrides)  # strings, read as on the CLI
    keys.update(plan_overrides(plan, global_batch))
    for key, value in keys.items():
        group, _, name = key.partition(".")
        if not isinstance(tree.setdefault(group, {}), dict):
            raise ConfigError(group, f"{src}: expected a mapping of keys, got {tree[group]!r}")
        tree[group][name] = value
    with open(out, "w", encoding="utf-8") as fh:
        yaml.safe_dump(tree, fh, sort_keys=False)


def run_plan_command(args) -> int:
    from megagen.parallel.planner.cluster import load_cluster
    from megagen.parallel.planner.search import search
    from megagen.planning import workload_for_config

    if args.calibrate:
        from megagen.metrics.peak import measure_matmul_flops
        from megagen.parallel.planner.calibrate import calibrate

        cluster = calibrate(measure_matmul_flops(1024, 1024, 1024, seconds=1.0))
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(cluster.to_yaml())
        print(f"wrote {args.out}: {cluster}")
        return 0
    if args.validate:
        from megagen.plan_validate import validate_config

        return validate_config(args.validate, args.overrides, args.cluster, as_json=args.json)
    if args.write and not args.config:
        raise ConfigError("--write", "needs --config: it writes that config with the best plan's keys")
    try:
        cluster = load_cluster(args.cluster or "h100")
    except ValueError as exc:
        raise ConfigError("--cluster", str(exc)) from exc
    cfg = _config_for(args)
    work = workload_for_config(cfg)
    default_batch = cfg.train.global_batch_size if args.config else max(1, args.gpus // 8)
    global_batch = args.global_batch or default_batch
    ranked = search(work, args.gpus, global_batch, cluster, top=args.top)
    if not ranked:
        raise ConfigError("--gpus", f"no layout of {args.gpus} GPUs divides global batch {global_batch}")
    rows = [{**r.row(), **plan_fields(r.plan, global_batch)} for r in ranked]
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
    if args.write:
        best = ranked[0].plan
        write_planned_config(args.config, args.overrides, best, global_batch, args.write)
        note = f"wrote {args.write} with the best plan: {best.label()}"
        print(note, file=sys.stderr if args.json else sys.stdout)  # --json keeps stdout one JSON document
    return 0
