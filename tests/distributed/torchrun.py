"""Launch `megagen` (or a test entry point) under torchrun from a test, the way users do."""

from __future__ import annotations

import os
import subprocess
import sys

from megagen.launch_cli import launch_env


def _command(args, torchrun_args, entry, nproc, env) -> tuple[list[str], dict[str, str]]:
    full_env = {**launch_env(), "OMP_NUM_THREADS": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), full_env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [*cmd, *torchrun_args, *entry, *args], full_env


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
    cmd, full_env = _command(args, torchrun_args, entry, nproc, env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=os.getcwd())


def start_torchrun(
    args: list[str],
    stdout,
    stderr,
    torchrun_args: tuple[str, ...] = (),
    entry: tuple[str, ...] = ("-m", "megagen"),
    nproc: int = 2,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """`run_torchrun` without waiting, for tests that act on the running job (output to files: a pipe
    nobody reads would block the ranks)."""
    cmd, full_env = _command(args, torchrun_args, entry, nproc, env)
    return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=full_env, cwd=os.getcwd())
