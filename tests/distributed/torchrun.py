"""Launch `megagen` (or a test entry point) under torchrun from a test, the way users do."""

from __future__ import annotations

import os
import subprocess
import sys

from megagen.launch_cli import launch_env


def run_torchrun(
    args: list[str],
    torchrun_args: tuple[str, ...] = (),
    entry: tuple[str, ...] = ("-m", "megagen"),
    nproc: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node NPROC TORCHRUN_ARGS ENTRY ARGS` from the repository root, with our
    launchers' environment, one thread per rank and this checkout importable (for test entry points)."""
    full_env = {**launch_env(), "OMP_NUM_THREADS": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), full_env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += [*torchrun_args, *entry, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=os.getcwd())
