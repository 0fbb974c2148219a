"""The `megagen` command line. Bad input ends in one line naming the key and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megagen.config import ConfigError, describe_keys, load_config

DESCRIPTION = """megagen: train Movie-Gen-class media foundation models with 3D parallelism.

commands:
  train   train a model from a YAML config with dotted key=value overrides (single process or torchrun)
  specs   list the registered model specs, their presets and parameter counts
  sample  generate latents from prompt embeddings (CKPT|CONFIG)
  ckpt    inspect, export (safetensors) and average checkpoints of any mesh
  config  print the resolved config (YAML + overrides) without running anything
  data    build and inspect latent-shard datasets: synth, pack, check, stats
  plan    predict step time, MFU, communication and memory of parallel layouts and pick one
  launch  render/submit a SLURM job, or run torchrun locally; doctor: pre-flight check of a launch
  bench   warm up, then time training steps: tokens/s, TFLOP/s, MFU, HFU, memory, data-wait and comm shares
"""

TRAIN_EPILOG = "config keys (group.key=default {allowed}  help):\n" + describe_keys()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megagen", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in (("train", "train a model"), ("config", "print the resolved config")):
        c = sub.add_parser(
            name,
            help=help_text,
            description=f"{help_text}: CONFIG is a YAML file; each OVERRIDE is group.key=value.",
            epilog=TRAIN_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        c.add_argument(
            "config", metavar="CONFIG", help="YAML config file (e.g. examples/configs/video_tiny.yaml)"
        )
        c.add_argument(
            "overrides", metavar="OVERRIDE", nargs="*", help="dotted overrides, e.g. train.steps=5"
        )
    from megagen.sample import add_sample_command
    from megagen.specs.cli import add_specs_commands

    add_specs_commands(sub)
    add_sample_command(sub)
    from megagen.checkpoint.cli import add_ckpt_commands

    add_ckpt_commands(sub)
    from megagen.data.cli import add_data_commands

    add_data_commands(sub)
    from megagen.plan_cli import add_plan_command

    add_plan_command(sub)
    from megagen.launch_cli import add_launch_commands

    add_launch_commands(sub)
    b = sub.add_parser(
        "bench",
        help="benchmark training steps",
        description="Benchmark: warm-up steps, then timed steps (device-synchronised), figures per device.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("config", metavar="CONFIG", help="YAML config file")
    b.add_argument("overrides", metavar="OVERRIDE", nargs="*", help="dotted overrides")
    b.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    b.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _cmd_train(args) -> int:
    from megagen.data.format import DataError
    from megagen.train import train
    from megagen.train.nonfinite import NonFiniteStepError

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg)
    except (NonFiniteStepError, DataError) as exc:  # a diverged step or bad data: one line, non-zero exit
        print(f"megagen train: {exc}", file=sys.stderr)
        return 1
    result.runtime.close()
    return 0


def _cmd_bench(args) -> int:
    from megagen.metrics.bench import print_bench, run_bench

    cfg = load_config(args.config, args.overrides)
    result = run_bench(cfg, args.steps, args.warmup)
    if int(os.environ.get("RANK", "0")) == 0:
        print_bench(result, args.json)
    return 0


def _cmd_config(args) -> int:
    import yaml

    from megagen.config.load import config_to_dict

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from megagen.checkpoint.cli import run_ckpt_command
    from megagen.data.cli import run_data_command
    from megagen.launch_cli import run_doctor_command, run_launch_command
    from megagen.plan_cli import run_plan_command
    from megagen.sample import run_sample_command
    from megagen.specs.cli import run_specs_command

    handlers = {
        "train": _cmd_train,
        "config": _cmd_config,
        "specs": run_specs_command,
        "sample": run_sample_command,
        "ckpt": run_ckpt_command,
        "bench": _cmd_bench,
        "data": run_data_command,
        "plan": run_plan_command,
        "launch": run_launch_command,
        "doctor": run_doctor_command,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"megagen: {exc}", file=sys.stderr)
        return 2
