"""Run `megagen bench` on a mesh under torchrun and return its JSON (shared by the benchmark scripts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def bench_on_mesh(nproc: int, overrides: list[str], steps: int, warmup: int, config: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "megagen", "bench"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "megagen",
            "bench",
        ]
    cmd += [config, *overrides, "--json", "--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)
