"""The `megagen` command line. Bad input ends in one line naming the key and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megagen.config import describe_keys, load_config

DESCRIPTION = """megagen: train Movie-Gen-class media foundation models with 3D parallelism.

Every command takes --help. Commands that read a training config take CONFIG (a YAML file) followed by
optional dotted overrides (group.key=value); `megagen train --help` lists every key."""

TRAIN_EPILOG = "config keys (group.key=default {allowed}  help):\n" + describe_keys()


def add_config_arguments(parser: argparse.ArgumentParser, what: str = "YAML config file") -> None:
    """CONFIG and its optional OVERRIDEs, the same for every command that reads a training config.

    CONFIG is declared optional to argparse only so that a missing one is reported as "CONFIG is
    required" alone (argparse would also name the optional overrides); `main` enforces it.
    """
    parser.add_argument(
        "config", metavar="CONFIG", nargs="?", help=f"{what} (e.g. examples/configs/video_tiny.yaml)"
    )
    parser.add_argument(
        "overrides", metavar="OVERRIDE", nargs="*", help="optional dotted overrides, e.g. train.steps=5"
    )
    parser.set_defaults(config_parser=parser)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megagen", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, help_text in (
        ("train", "train a model from CONFIG (one process, or every rank under torchrun)"),
        ("config", "print the resolved config (YAML + overrides) without running anything"),
    ):
        c = sub.add_parser(
            name,
            help=help_text,
            description=f"{help_text}. CONFIG is a YAML file; each optional OVERRIDE is group.key=value.",
            epilog=TRAIN_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_config_arguments(c)
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
    from megagen.rehearse import add_rehearse_command

    add_rehearse_command(sub)
    from megagen.launch_cli import add_launch_commands

    add_launch_commands(sub)
    b = sub.add_parser(
        "bench",
        help="warm up, then time training steps: tokens/s, TFLOP/s, MFU, memory, data-wait and comm",
        description="Benchmark: warm-up steps, then timed steps (device-synchronised), figures per device. "
        "Writes under <run.dir>-bench unless run.dir is given as an override, so a finished run's "
        "directory is never touched.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(b)
    b.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    b.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _cmd_train(args) -> int:
    from megagen.train import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    result.runtime.close()
    return 0


def bench_run_dir(cfg, overrides: list[str]) -> str:
    """Where `megagen bench` writes: `run.dir` when given on the command line, else `<run.dir>-bench`
    (benchmarking a config must never overwrite the run it came from)."""
    if any(o.split("=", 1)[0].strip() == "run.dir" for o in overrides):
        return cfg.run.dir
    return cfg.run.dir.rstrip("/") + "-bench"


def _cmd_bench(args) -> int:
    from megagen.metrics.bench import print_bench, run_bench

    cfg = load_config(args.config, args.overrides)
    cfg.run.dir = bench_run_dir(cfg, args.overrides)
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


def _configure_logging() -> None:
    """INFO lines from rank 0 only (one copy per job, not one per rank); warnings from every rank."""
    from megagen.cli_errors import job_rank

    rank, _ = job_rank()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if overrides and isinstance(getattr(args, "overrides", None), list):
        args.overrides.extend(overrides)  # key=value after options: still an override
        extra = [a for a in extra if a not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    config_parser = getattr(args, "config_parser", None)
    if config_parser is not None and args.config is None:
        config_parser.error("the following argument is required: CONFIG")
    from megagen.checkpoint.cli import run_ckpt_command
    from megagen.data.cli import run_data_command
    from megagen.doctor import run_doctor_command
    from megagen.launch_cli import run_launch_command
    from megagen.plan_cli import run_plan_command
    from megagen.rehearse import run_rehearse_command
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
        "rehearse": run_rehearse_command,
        "launch": run_launch_command,
        "doctor": run_doctor_command,
    }
    from megagen.cli_errors import run_reporting_errors

    return run_reporting_errors(handlers[args.command], args)
