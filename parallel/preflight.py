"""Pre-flight checks before the first step: every rank agrees on config and code, sees the paths, and the
links of every mesh axis work at a sane speed. A bad launch is refused with the offending rank named.

All checks run the same collectives on every rank, in the same order, whatever they find, so a failing
check can never leave other ranks waiting.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megagen.errors import ConfigError
from megagen.fsutil import unwritable_reason


@dataclass
class RankFacts:
    rank: int
    host: str
    config_hash: str
    code_version: str
    missing_paths: list[str]
    unwritable_paths: list[str]


def code_version() -> str:
    """megagen's version plus a hash of its own source files (catches mixed checkouts across nodes)."""
    import megagen

    root = os.path.dirname(os.path.dirname(os.path.abspath(megagen.__file__)))
    digest = hashlib.sha256()
    for sub in ("megagen", "parallel", "kernels"):
        base = os.path.join(root, sub)
        for dirpath, _, files in sorted(os.walk(base)):
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), "rb") as fh:
                        digest.update(name.encode())
                        digest.update(fh.read())
    return f"{megagen.__version__}+{digest.hexdigest()[:12]}"


def rank_facts(config_text: str, read_paths: list[str], write_dirs: list[str]) -> RankFacts:
    missing = [p for p in read_paths if p and not os.path.exists(p)]
    unwritable = [d for d in write_dirs if d and unwritable_reason(d) is not None]
    return RankFacts(
        rank=dist.get_rank() if dist.is_initialized() else 0,
        host=os.uname().nodename,
        config_hash=hashlib.sha256(config_text.encode()).hexdigest()[:16],
        code_version=code_version(),
        missing_paths=missing,
        unwritable_paths=unwritable,
    )


def check_agreement(facts: list[RankFacts]) -> list[str]:
    """Problems, each naming the ranks concerned (empty when the launch is sound)."""
    problems = []
    ref = facts[0]
    for field, what in (("config_hash", "resolved config"), ("code_version", "megagen code")):
        odd = [f.rank for f in facts if getattr(f, field) != getattr(ref, field)]
        if odd:
            problems.append(
                f"{what} differs from rank 0's on rank(s) {odd} ({getattr(ref, field)} on rank 0)"
            )
    for f in facts:
        for p in f.missing_paths:
            problems.append(f"rank {f.rank} ({f.host}) cannot see {p}")
        for p in f.unwritable_paths:
            problems.append(f"rank {f.rank} ({f.host}) cannot write {p}")
    return problems


def timed_all_reduce(
    groups: dict[str, dist.ProcessGroup], device: torch.device, nbytes: int = 1 << 20
) -> dict:
    """Seconds of one all-reduce of `nbytes` on each axis of size > 1 (max over ranks)."""
    out = {}
    x = torch.ones(nbytes // 4, device=device)
    for axis, group in groups.items():
        if dist.get_world_size(group) <= 1:
            continue
        dist.all_reduce(x, group=group)  # warm-up (connection setup)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dist.all_reduce(x, group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[axis] = float(t)
    return out


@dataclass(frozen=True)
class LaunchCheck:
    """What every rank must agree on and see, in the caller's terms: the resolved config's text, the paths
    it reads (data, resume) and the directories it writes (run, checkpoints). The engine does not read a
    run config; `megagen.runtime_setup.launch_check` draws these from one."""

    config_text: str
    read_paths: tuple[str, ...] = ()
    write_dirs: tuple[str, ...] = ()


def preflight(
    check: LaunchCheck,
    groups: dict[str, dist.ProcessGroup],
    device: torch.device,
    time_links: bool = False,
) -> dict:
    """Gather every rank's facts; raise ConfigError naming the ranks if they disagree."""
    mine = rank_facts(check.config_text, list(check.read_paths), list(check.write_dirs))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    problems = check_agreement(everyone)
    links = timed_all_reduce(groups, device) if time_links else {}
    if problems:
        raise ConfigError("launch", "pre-flight check failed: " + "; ".join(problems))
    return {"hosts": sorted({f.host for f in everyone}), "code_version": mine.code_version, "links_s": links}
