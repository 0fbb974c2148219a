"""`megagen doctor CONFIG`: everything `megagen train` checks before its first step, as one report.

Each check runs the code training runs (config, spec limits, mesh against the world size, the dataset's
manifest and fields against the spec, batch sizes against every bucket, the checkpoint it would resume or
start from, paths every rank must read or write); under torchrun every rank runs them, rank 0 prints them
with the ranks that failed, then the ranks' agreement on config and code and an all-reduce timed on every
mesh axis. The report ends in `OK` or `FAILED` (exit code 1).
"""

from __future__ import annotations

import os

from megagen.config import ConfigError, load_config


def _check(name: str, fn) -> tuple[str, str | None]:
    """(name, None) when `fn()` passes, else (name, the one-line problem it returned or raised)."""
    from megagen.data.format import DataError

    try:
        problem = fn()
    except (ConfigError, DataError) as exc:
        problem = str(exc)
    return name, " ".join(str(problem).split()) if problem else None


def _data_check(cfg, spec, world_size: int, dp_size: int) -> None:
    """The dataset opens and fits the spec; each bucket's batch sizes divide and fit (as training plans)."""
    from megagen.data.pipeline import make_sampler
    from megagen.parallel.mesh import device_and_backend

    reader = None
    if cfg.data.path:
        from megagen.data.shard_reader import ShardReader

        reader = ShardReader(cfg.data.path, on_error=cfg.data.on_error, verify=cfg.data.verify)
    device = device_and_backend(cfg.parallel.backend)[0]
    sampler = make_sampler(cfg, spec, world_size, dp_size, device, reader)
    for name in sampler.buckets:
        sampler.accumulation(name, dp_size)


def _path_check(cfg) -> str | None:
    from megagen.config.load import config_fingerprint
    from megagen.parallel.preflight import rank_facts

    read = [cfg.data.path, cfg.eval.path]
    write = [cfg.run.dir] + ([cfg.checkpoint.dir] if cfg.checkpoint.dir else [])
    facts = rank_facts(config_fingerprint(cfg), read, write)
    problems = [f"cannot see {p}" for p in facts.missing_paths]
    problems += [f"cannot write {p}" for p in facts.unwritable_paths]
    return "; ".join(problems) or None


def local_checks(cfg, world_size: int) -> list[tuple[str, str | None]]:
    """This rank's checks, in a fixed order (every rank runs the same ones)."""
    from megagen.checkpoint import preflight as checkpoint_preflight
    from megagen.launch_cli import check_layout
    from megagen.specs import get_spec

    results = [_check("spec", lambda: get_spec(cfg.model.spec).validate(cfg))]
    spec = get_spec(cfg.model.spec) if results[0][1] is None else None
    dims = None

    def mesh():
        nonlocal dims
        p = cfg.parallel
        if world_size == 1 and max(p.dp_replicate, p.cp, p.tp, p.dp_shard) > 1:
            raise ConfigError("parallel", "a mesh larger than 1 needs several processes: run under torchrun")
        dims = check_layout(cfg, world_size)

    results.append(_check("mesh", mesh))
    if spec is not None:
        results.append(_check("data", lambda: _data_check(cfg, spec, world_size, dims.dp if dims else 1)))
    results.append(_check("checkpoint", lambda: checkpoint_preflight(cfg) and None))  # a path = fine
    results.append(_check("paths", lambda: _path_check(cfg)))
    return results


def _print_report(header: str, checks: list[tuple[str, dict[int, str]]], links: dict, world: int) -> int:
    """`checks`: (name, {rank: problem}) in order. Prints the report; returns the exit code."""
    print(header)
    failed = 0
    for name, problems in checks:
        if not problems:
            print(f"  {name:12s} OK")
            continue
        failed += 1
        by_text: dict[str, list[int]] = {}
        for rank, text in sorted(problems.items()):
            by_text.setdefault(text, []).append(rank)
        for text, ranks in by_text.items():
            who = f" on rank(s) {ranks}" if world > 1 else ""
            print(f"  {name:12s} FAILED{who}: {text}")
    for axis, seconds in links.items():
        print(f"  all-reduce 1 MiB on {axis:12s}: {seconds * 1e3:8.2f} ms (slowest rank)")
    verdict = "OK" if not failed else f"FAILED ({failed} of {len(checks)} checks)"
    print(f"megagen doctor: {verdict}")
    return 1 if failed else 0


def run_doctor_command(args) -> int:
    import torch.distributed as dist

    cfg = load_config(args.config, args.overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not dist.is_initialized():
        from megagen.parallel.preflight import code_version

        checks = [(name, {0: p} if p else {}) for name, p in local_checks(cfg, 1)]
        header = f"megagen doctor: 1 process on {os.uname().nodename}, code {code_version()}"
        return _print_report(header, checks, {}, 1)
    return _run_distributed(cfg)


def _run_distributed(cfg) -> int:
    import torch.distributed as dist

    from megagen.parallel.mesh import Mesh, device_and_backend
    from megagen.parallel.preflight import preflight
    from megagen.runtime_setup import launch_check

    device, backend = device_and_backend(cfg.parallel.backend)
    dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = local_checks(cfg, world)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    checks = [
        (name, {r: everyone[r][i][1] for r in range(world) if everyone[r][i][1]})
        for i, (name, _) in enumerate(mine)
    ]
    report, links = None, {}
    if not dict(checks)["mesh"]:
        from megagen.launch_cli import check_layout

        mesh = Mesh(check_layout(cfg, world), device.type)
        try:
            report = preflight(launch_check(cfg), mesh.axis_groups(), device, time_links=True)
            links = report["links_s"]
            checks.append(("agreement", {}))
        except ConfigError as exc:
            checks.append(("agreement", {0: " ".join(str(exc).split())}))
    code = 0
    if rank == 0:
        hosts = ", ".join(report["hosts"]) if report else "?"
        code = _print_report(f"megagen doctor: {world} ranks on {hosts}", checks, links, world)
    flag = [code]
    dist.broadcast_object_list(flag, src=0)
    dist.destroy_process_group()
    return flag[0]
