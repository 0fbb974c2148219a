"""The data-wait share of a step for benchmarks/data_loaders.py: time blocked in a loader's `next()`
against the step's compute (the tiny video model's real step, or a synthetic sleep at the Movie Gen shape)."""

from __future__ import annotations

import itertools
import os
import statistics
import time

import data_loaders_setup as setup
import torch
from data_loaders_setup import request_plan

from megagen.data.loader_torch import TorchLoader
from megagen.data.loaders import dali_available
from megagen.train.step_gc import StepGC

WAIT_HEADER = f"{'loader':<27} " + " ".join(f"{c:>8}" for c in ("step ms", "wait ms", "p50 wait", "p90 wait"))
WAIT_HEADER += f" {'wait share':>10}"


def wait_row(name: str, step_ms: float, res: dict) -> str:
    """One line of a data-wait table: mean / median / p90 wait per step and the share of the step."""
    cols = (step_ms, res["wait_ms"], res["wait_p50_ms"], res["wait_p90_ms"])
    return f"{name:<27} " + " ".join(f"{c:>8.3f}" for c in cols) + f" {100 * res['share']:>9.2f}%"


def data_wait(path: str, micro: int, loaders: dict, rounds: int, steps: int, warmup: int = 3) -> dict:
    """Train the tiny model on each loader's stream, `steps` steps per loader per round, loaders taking
    turns so that machine noise hits all alike. Per loader: median compute ms, mean wait ms, share."""
    from megagen.train.objective import draw_for_samples, flow_matching_micro_step

    cfg, spec, model, opt = _tiny_trainer()
    reader = setup.open_reader(path)
    streams, times = {}, {}
    for name, make in loaders.items():
        loader = _started(make, reader, request_plan(reader, micro), warmup + rounds * steps)
        streams[name], times[name] = (loader, iter(loader)), ([], [])

    done = 0  # recorded steps over all loaders: the step count the garbage collector follows

    def train_steps(name: str, n: int, record: bool, step_gc: StepGC | None = None) -> None:
        nonlocal done
        stream = streams[name][1]
        for _ in range(n):
            t0 = time.perf_counter()
            req, batch = next(stream)
            t1 = time.perf_counter()
            shape = tuple(batch["latents"].shape[1:])
            draws = draw_for_samples(cfg, spec, req.step, list(req.positions), shape)
            loss_sum, _, tokens = flow_matching_micro_step(cfg, spec, model, batch, draws)
            (loss_sum / (len(req.sample_ids) * tokens)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if record:
                times[name][0].append(t1 - t0)
                times[name][1].append(time.perf_counter() - t1)
            if step_gc is not None:
                done += 1
                step_gc.step_done(done)

    for name in loaders:
        train_steps(name, warmup, record=False)
    # garbage collection at step boundaries, as `megagen train` does (train.gc_every, default 50): an
    # automatic collection inside `next()` would count as data wait
    with StepGC(50) as step_gc:
        for _ in range(rounds):
            for name in loaders:
                train_steps(name, steps, record=True, step_gc=step_gc)
    out = {}
    for name, (loader, stream) in streams.items():
        for _ in stream:
            pass
        if hasattr(loader, "close"):
            loader.close()
        waits, computes = times[name]
        out[name] = {"step_ms": 1e3 * statistics.median(computes), **_wait_stats(waits)}
        out[name]["share"] = sum(waits) / (sum(waits) + sum(computes))
    return out


def data_wait_synthetic(path: str, micro: int, loaders: dict, step_ms: float, steps: int, warmup: int = 2):
    """The data-wait share at the Movie Gen shape with a *synthetic* step of known duration: the host sleeps
    `step_ms` per micro-batch, as a host does while the GPU computes (a real step at this shape takes far
    longer on a GPU: this is a pessimistic short one). Loaders take turns, one pass each."""
    reader = setup.open_reader(path)
    out = {}
    for name, make in loaders.items():
        loader = _started(make, reader, request_plan(reader, micro), warmup + steps)
        waits = []
        t_start = None
        for k, _ in enumerate(_timed(loader, waits)):
            if k == warmup - 1:
                waits.clear()
                t_start = time.perf_counter()
            time.sleep(step_ms / 1e3)
        total = time.perf_counter() - t_start
        if hasattr(loader, "close"):
            loader.close()
        out[name] = {**_wait_stats(waits), "share": sum(waits) / total}
    return out


def _timed(loader, waits: list):
    it = iter(loader)
    while True:
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        waits.append(time.perf_counter() - t)
        yield item


def _tiny_trainer():
    """(cfg, spec, model, optimizer) of the tiny video model, seeded: the step the loaders feed."""
    from megagen.config import load_config
    from megagen.specs import get_spec

    cfg = load_config(
        "examples/configs/video_tiny.yaml",
        ["metrics.tensorboard=false", "metrics.jsonl=false", "metrics.progress=none"],
    )
    spec = get_spec("video")
    torch.manual_seed(0)
    model = spec.build(cfg)
    spec.init_weights(model, cfg)
    return cfg, spec, model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _started(make, reader, plan, steps: int):
    """The loader `make` builds over the first `steps` requests of `plan`, its one-time setup done."""
    loader = make(reader, list(itertools.islice(plan, steps)))
    if hasattr(loader, "start"):
        loader.start()
    return loader


def _wait_stats(waits: list[float]) -> dict:
    return {
        "wait_ms": 1e3 * statistics.mean(waits),
        "wait_p50_ms": 1e3 * statistics.median(waits),
        "wait_p90_ms": 1e3 * sorted(waits)[int(0.9 * (len(waits) - 1))],
    }


def report_tiny_wait(args) -> None:
    """The data-wait table of the video_tiny training step, one row per loader."""
    rounds, steps, w = args.wait_rounds, args.wait_steps, args.workers
    print(
        f"\ndata-wait share of a video_tiny training step (tiny model, micro-batch 8, warm cache; "
        f"{rounds} rounds × {steps} steps per loader, loaders taking turns):"
    )
    loaders = {
        "torch loader (main proc)": lambda r, plan: TorchLoader(r, plan, num_workers=0),
        f"torch loader ({w} workers)": lambda r, plan: TorchLoader(r, plan, num_workers=w),
    }
    if dali_available():
        from megagen.data.loader_dali import DaliLoader

        loaders["DALI loader (map)"] = lambda r, plan: DaliLoader(r, plan, num_threads=args.threads)
        loaders[f"DALI loader ({w} workers)"] = lambda r, plan: DaliLoader(
            r, plan, num_threads=args.threads, py_num_workers=w, source="workers"
        )
    path = os.path.join(args.root, "video_tiny")
    print(WAIT_HEADER)
    for name, res in data_wait(path, 8, loaders, rounds, steps).items():
        print(wait_row(name, res["step_ms"], res))


def report_moviegen_wait(args) -> None:
    """The data-wait table at the Movie Gen shape against a synthetic step, one row per loader."""
    w, ms, micro = args.workers, args.moviegen_step_ms, args.moviegen_micro
    steps = len(request_plan(setup.ShardReader(os.path.join(args.root, "moviegen_768px_16s")), micro)) - 2
    print(
        f"\ndata-wait share at the Movie Gen shape (micro-batch {micro}, warm cache; SYNTHETIC step: the "
        f"host sleeps {ms:.0f} ms per micro-batch, as while a GPU computes; {steps} steps per loader; "
        f"fp16 host batch, the cast left to the device):"
    )
    loaders = {
        "torch loader (main proc)": lambda r, plan: TorchLoader(r, plan, num_workers=0, cast=False),
        f"torch loader ({w} workers)": lambda r, plan: TorchLoader(r, plan, num_workers=w, cast=False),
    }
    if dali_available():
        from megagen.data.loader_dali import DaliLoader

        loaders["DALI loader (map)"] = lambda r, plan: DaliLoader(
            r, plan, num_threads=args.threads, cast=False
        )
        loaders[f"DALI loader ({w} workers)"] = lambda r, plan: DaliLoader(
            r, plan, num_threads=args.threads, py_num_workers=w, source="workers", cast=False
        )
    path = os.path.join(args.root, "moviegen_768px_16s")
    print(WAIT_HEADER)
    for name, res in data_wait_synthetic(path, micro, loaders, ms, steps).items():
        print(wait_row(name, ms, res))
