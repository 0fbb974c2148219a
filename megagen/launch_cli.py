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
    from megagen.cli import add_config_arguments

    launch = sub.add_parser(
        "launch",
        help="render and submit a SLURM job, or run torchrun locally",
        description="Launch megagen training on SLURM or locally with torchrun. The config and its mesh "
        "are checked against the world size (nodes × GPUs per node) and the spec before anything starts.",
    )
    kinds = launch.add_subparsers(dest="launch_kind", metavar="KIND")
    slurm = kinds.add_parser(
        "slurm",
        help="render (and sbatch) the SLURM script",
        description="Render the SLURM batch script for CONFIG on NODES × GPUS_PER_NODE GPUs and submit it "
        "with sbatch (or print it with --dry-run). torchrun restarts the job after a rank dies, up to "
        "--max-restarts times; each restart resumes from the latest checkpoint.",
    )
    add_config_arguments(slurm)
    slurm.add_argument("--nodes", type=int, required=True, help="nodes to allocate (SBATCH --nodes)")
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= ranks) per node (default 8)")
    slurm.add_argument("--cpus-per-task", type=int, default=96, help="CPU cores per node's task (default 96)")
    slurm.add_argument("--time", default="72:00:00", help="wall-time limit, HH:MM:SS (default 72:00:00)")
    slurm.add_argument("--job-name", default="megagen", help="SLURM job name (default megagen)")
    slurm.add_argument("--partition", default="", help="SLURM partition (default: the cluster's)")
    slurm.add_argument("--account", default="", help="SLURM account to charge (default: yours)")
    slurm.add_argument(
        "--max-restarts", type=int, default=3, help="torchrun restarts after a failure (default 3)"
    )
    slurm.add_argument(
        "--log-dir", default="logs", help="directory of the job's and ranks' logs (default logs)"
    )
    slurm.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    slurm.add_argument("--out", default="", help="also write the script to this file")
    local = kinds.add_parser(
        "local",
        help="run torchrun on this machine",
        description="Run CONFIG under torchrun with NPROC ranks on this machine. A failed job is started "
        "again up to --max-restarts times (resuming from its latest checkpoint), except after bad "
        "input (exit code 2: a config, path or data error), which would only fail again.",
    )
    add_config_arguments(local)
    local.add_argument("--nproc", type=int, default=1, help="ranks (processes) to start (default 1)")
    local.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="start a failed job again up to this many times; never after bad input (default 0)",
    )
    doctor = sub.add_parser(
        "doctor",
        help="pre-flight check of a launch (run it under torchrun like train)",
        description="Check what `megagen train` would check before its first step — the config, the mesh "
        "against the world size and the spec, the dataset's fields against the spec, the data, "
        "checkpoint and run paths — and, under torchrun, that every rank agrees on config and code, and "
        "time an all-reduce on every mesh axis. Ends with OK or FAILED (exit code 1).",
    )
    add_config_arguments(doctor)


def check_layout(cfg, world_size: int, gpus_per_node: int | None = None):
    """The mesh of `cfg` on `world_size` ranks, checked as training checks it at start-up: sizes that
    multiply to the world, tensor parallelism inside a node, a global batch that divides over the
    data-parallel ranks, the spec's own limits (heads, sequence)."""
    from megagen.parallel.mesh import ParallelDims
    from megagen.specs import get_spec

    p = cfg.parallel
    dims = ParallelDims.resolve(p.dp_replicate, p.dp_shard, p.cp, p.tp, world_size)
    if gpus_per_node is not None and gpus_per_node % dims.tp:
        raise ConfigError(
            "parallel.tp",
            f"{dims.tp} does not divide the {gpus_per_node} GPUs of a node: tensor parallelism runs "
            "inside a node",
        )
    if cfg.train.global_batch_size % dims.dp:
        raise ConfigError(
            "train.global_batch_size",
            f"{cfg.train.global_batch_size} is not divisible by the {dims.dp} data-parallel ranks of this "
            f"mesh ({world_size} ranks / (cp {dims.cp} × tp {dims.tp}))",
        )
    get_spec(cfg.model.spec).validate(cfg)
    return dims


def render_slurm(args) -> str:
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--nodes", "nodes and gpus per node must be >= 1")
    cfg = load_config(args.config, args.overrides)  # refuse a bad config before it reaches the queue
    check_layout(cfg, args.nodes * args.gpus_per_node, args.gpus_per_node)
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


def _submit(script: str) -> int:
    import shutil

    from megagen.config.errors import UsageError

    if shutil.which("sbatch") is None:
        raise UsageError(
            "sbatch", "not found on PATH: submit from a SLURM login node, or use --dry-run / --out FILE"
        )
    return subprocess.run(["sbatch"], input=script, text=True).returncode


def run_local(args) -> int:
    """torchrun without its own restarts; megagen restarts the job unless a rank reported bad input."""
    import tempfile

    from megagen.cli_errors import FAILURE_FILE_ENV, unrestartable_failure

    cfg = load_config(args.config, args.overrides)
    check_layout(cfg, args.nproc)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "--max-restarts=0",
        "-m",
        "megagen",
        "train",
        args.config,
        *args.overrides,
    ]
    with tempfile.TemporaryDirectory(prefix="megagen-launch-") as tmp:
        failure_file = os.path.join(tmp, "failure")
        env = {**launch_env(), FAILURE_FILE_ENV: failure_file}
        for attempt in range(args.max_restarts + 1):
            rc = subprocess.run(cmd, env=env).returncode
            if rc == 0:
                return 0
            code = unrestartable_failure(failure_file)
            if code is not None:
                print(f"megagen launch: bad input (exit code {code}); not restarting", file=sys.stderr)
                return code
            if attempt < args.max_restarts:
                print(
                    f"megagen launch: job failed (exit code {rc}); restart {attempt + 1} of "
                    f"{args.max_restarts}",
                    file=sys.stderr,
                )
    return rc


def run_launch_command(args) -> int:
    if args.launch_kind == "slurm":
        script = render_slurm(args)
        if args.out:
            Path(args.out).write_text(script)
        if args.dry_run:
            sys.stdout.write(script)
            return 0
        return _submit(script)
    if args.launch_kind == "local":
        return run_local(args)
    print("megagen launch: choose slurm or local (see --help)", file=sys.stderr)
    return 2
