"""`megagen launch slurm|local` and `megagen doctor`: start jobs and check a launch before it trains."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from megagen.config import ConfigError, load_config

TEMPLATE = Path(__file__).parent / "templates" / "slurm.sbatch"


def add_launch_commands(sub) -> None:
    launch = sub.add_parser(
        "launch",
        help="render and submit a SLURM job, or run torchrun locally",
        description="Launch megagen training on SLURM or locally with torchrun.",
    )
    kinds = launch.add_subparsers(dest="launch_kind", metavar="KIND")
    slurm = kinds.add_parser("slurm", help="render (and sbatch) the SLURM script")
    slurm.add_argument("config")
    slurm.add_argument("overrides", nargs="*")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--cpus-per-task", type=int, default=96)
    slurm.add_argument("--time", default="72:00:00")
    slurm.add_argument("--job-name", default="megagen")
    slurm.add_argument("--partition", default="")
    slurm.add_argument("--account", default="")
    slurm.add_argument("--max-restarts", type=int, default=3)
    slurm.add_argument("--log-dir", default="logs")
    slurm.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    slurm.add_argument("--out", default="", help="also write the script to this file")
    local = kinds.add_parser("local", help="run torchrun on this machine")
    local.add_argument("config")
    local.add_argument("overrides", nargs="*")
    local.add_argument("--nproc", type=int, default=1)
    local.add_argument("--max-restarts", type=int, default=0)
    doctor = sub.add_parser(
        "doctor",
        help="pre-flight check of a launch (run it under torchrun like train)",
        description="Check that every rank agrees on config and code, sees the data and "
        "checkpoint paths, and time an all-reduce on every mesh axis.",
    )
    doctor.add_argument("config")
    doctor.add_argument("overrides", nargs="*")


def render_slurm(args) -> str:
    load_config(args.config, args.overrides)  # refuse a bad config before it reaches the queue
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--nodes", "nodes and gpus per node must be >= 1")
    extra = []
    if args.partition:
        extra.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        extra.append(f"#SBATCH --account={args.account}")
    return TEMPLATE.read_text().format(
        job_name=args.job_name,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        log_dir=args.log_dir,
        extra_sbatch="\n".join(extra),
        max_restarts=args.max_restarts,
        python=shlex.quote(sys.executable),
        config=shlex.quote(args.config),
        overrides=" ".join(shlex.quote(o) for o in args.overrides),
    )


def launch_env() -> dict[str, str]:
    """The environment of torchrun: ours, plus a private store for the training processes so that ranks
    restarted after a failure never read the previous attempt's addresses (pytorch/pytorch#135712)."""
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **os.environ}


def run_launch_command(args) -> int:
    if args.launch_kind == "slurm":
        script = render_slurm(args)
        if args.out:
            Path(args.out).write_text(script)
        if args.dry_run:
            sys.stdout.write(script)
            return 0
        return subprocess.run(["sbatch"], input=script, text=True).returncode
    if args.launch_kind == "local":
        load_config(args.config, args.overrides)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            f"--max-restarts={args.max_restarts}",
            "-m",
            "megagen",
            "train",
            args.config,
            *args.overrides,
        ]
        return subprocess.run(cmd, env=launch_env()).returncode
    print("megagen launch: choose slurm or local (see --help)", file=sys.stderr)
    return 2


def run_doctor_command(args) -> int:
    import torch.distributed as dist

    from megagen.config.load import config_fingerprint
    from megagen.parallel.preflight import preflight, rank_facts

    cfg = load_config(args.config, args.overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not dist.is_initialized():
        facts = rank_facts(config_fingerprint(cfg), [cfg.data.path, cfg.eval.path], [cfg.run.dir])
        problems = [f"cannot see {p}" for p in facts.missing_paths] + [
            f"cannot write {p}" for p in facts.unwritable_paths
        ]
        print(f"megagen doctor: 1 process on {facts.host}, code {facts.code_version}")
        for p in problems:
            print(f"  problem: {p}")
        return 1 if problems else 0
    from megagen.parallel.mesh import Mesh, ParallelDims, device_and_backend

    device, backend = device_and_backend(cfg.parallel.backend)
    dist.init_process_group(backend)
    p = cfg.parallel
    dims = ParallelDims.resolve(p.dp_replicate, p.dp_shard, p.cp, p.tp, dist.get_world_size())
    mesh = Mesh(dims, device.type)
    report = preflight(cfg, config_fingerprint(cfg), mesh.axis_groups(), device, time_links=True)
    if dist.get_rank() == 0:
        hosts = ", ".join(report["hosts"])
        print(f"megagen doctor: {dist.get_world_size()} ranks on {hosts}, code {report['code_version']}")
        print(f"  mesh {dims.sizes()}: OK")
        for axis, seconds in report["links_s"].items():
            print(f"  all-reduce 1 MiB on {axis:12s}: {seconds * 1e3:8.2f} ms (slowest rank)")
    dist.destroy_process_group()
    return 0
