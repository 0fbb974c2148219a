"""Shard loaders vs the raw read speed of the shard files, side by side, and the data-wait share of a step.

For each case — (a) the video_tiny shapes (three buckets, micro-batch 8) and (b) Movie Gen's 768 px, 16 s
latent (16×32×96×96 fp16 = 9.4 MB, 73,728 tokens per sample) — it writes a synthetic dataset with
`megagen.data.synth` (reused when present), then measures over one request stream (one rank, one epoch):

- raw sequential: every shard file read start to end (`readinto`, 16 MB chunks);
- raw memmap random: every sample of the request stream copied out of the memory map, in request order;
- `reader.read_batch`: the reader's part of every loader's work: one copy out of the memory map into the
  host batch (stored dtypes, fp16) with the NaN/inf check fused into the copy;
- the torch loader (main process, and worker processes) and the DALI loader (its default source "map":
  DALI's threads copy out of the memory maps; and "workers": python worker processes): iterate all
  requests, batches ready as the training loop gets them: on the device, fp32. The host batch stays fp16
  up to the device; the fp16 → fp32 cast runs on the device after the copy — on this CPU-only machine the
  device is the CPU, so it is counted in these rows;
- the same loaders with `cast=False` ("fp16" rows): the batch on the device in the stored dtypes, i.e. the
  loader's own work without the cast that a GPU does for free;
- `cast fp16 → fp32 (CPU)`: that cast alone (`cast_to_compute`) on every host batch of the stream.

MB/s counts stored bytes (fp16 latents + text) per second for every row, so ratios compare like with like.
Each case runs with a warm page cache (files read once before; best of `--repeat`) and, when
`/proc/sys/vm/drop_caches` works here (checked through /proc/meminfo), cold (caches dropped before each row).
Once-per-loader costs are reported apart (note column) and not counted in the loader rows' throughput:
the setup (`start()`: DALI's pipeline and worker start; the torch loader's ring of recycled batch buffers,
allocated and touched) and the first batch (worker processes forking, the pipeline filling); the loader
rows measure batches 2.. of the stream (a training run iterates one loader over thousands of batches).

Batch lifetime in the "fp16" rows: on the CPU a `cast=False` batch is a view of a recycled buffer, valid
until the next batch is requested (the loop here only reads its shape).

The data-wait share: the tiny video model trains on the video_tiny stream (forward, backward, AdamW);
wait = time blocked in the loader's `next()`, share = wait / (wait + compute), with loader workers
competing with the step for the same CPU cores. The loaders take turns (rounds) so that noise from other
work on the machine hits all of them alike. At the Movie Gen shape the wait share is measured against a
SYNTHETIC step (`--moviegen-step-ms`, default 100 ms: the host sleeps, as it does while a GPU computes; a
real step at this shape is much longer, so this is pessimistic), with the fp16 host batch (the cast is the
device's work).

    python benchmarks/data_loaders.py [--root /tmp/megagen-bench] [--moviegen-samples 128] [--repeat 2]

DALI's python workers fork (CPU) or spawn (GPU) and re-import this file: keep the `__main__` guard.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import data_loaders_setup as setup
import numpy as np
import torch
from data_loaders_setup import (
    Case,
    Row,
    can_drop_caches,
    drop_caches,
    ensure_dataset,
    read_files,
    request_plan,
    sample_bytes,
    shard_files,
)
from data_loaders_wait import report_moviegen_wait, report_tiny_wait

from megagen.data.contract import cast_to_compute
from megagen.data.loader_torch import TorchLoader
from megagen.data.loaders import dali_available
from megagen.data.packed_batch import read_request
from megagen.data.shard_reader import ShardReader


def raw_sequential(reader, plan, sizes, files) -> tuple[float, int, int, str]:
    t = time.perf_counter()
    nbytes = read_files(files)
    dt = time.perf_counter() - t
    samples = sum(b.samples for b in reader.buckets.values())
    return dt, samples, nbytes, f"{len(files)} files"


def raw_memmap_random(reader, plan, sizes, files) -> tuple[float, int, int, str]:
    raw = ShardReader(reader.path, verify="none", check_finite=False)
    samples = nbytes = 0
    t = time.perf_counter()
    for req in plan:
        for i in req.sample_ids:
            for v in raw.read(req.bucket, i).values():
                nbytes += np.array(v).nbytes
            samples += 1
    return time.perf_counter() - t, samples, nbytes, "np.array(view) per field"


def reader_batches(reader, plan, sizes, files) -> tuple[float, int, int, str]:
    """What every loader does first: `read_batch` (one copy out of the map; NaN/inf check fused with
    `--check-finite eager`)."""
    samples = nbytes = 0
    t = time.perf_counter()
    for req in plan:
        arrays = reader.read_batch(req.bucket, list(req.sample_ids))
        samples += len(arrays["latents"])
        nbytes += sum(a.nbytes for a in arrays.values())
    return time.perf_counter() - t, samples, nbytes, "no loader: the reader's share (fp16 host batch)"


def cast_only(reader, plan, sizes, files) -> tuple[float, int, int, str]:
    """The on-device cast alone (here the device is the CPU): `cast_to_compute` of every host batch."""
    samples = nbytes = 0
    dt = 0.0
    for req in plan:
        host, _ = read_request(reader, req)
        t = time.perf_counter()
        batch = cast_to_compute(host)
        dt += time.perf_counter() - t
        samples += len(batch["latents"])
        nbytes += len(batch["latents"]) * sizes[req.bucket]
    return dt, samples, nbytes, "on a GPU this runs there, after the copy"


def run_loader(loader, sizes) -> tuple[float, int, int, float]:
    """Iterate `loader`: (seconds, samples, bytes) after the first batch, and the first batch's latency
    (worker processes forking and filling the pipeline: a once-per-loader cost, reported apart)."""
    samples = nbytes = 0
    t = time.perf_counter()
    first = None
    for req, batch in loader:
        if first is None:
            first = time.perf_counter()
            continue
        n = len(batch["latents"])
        samples += n
        nbytes += n * sizes[req.bucket]
    return time.perf_counter() - first, samples, nbytes, first - t


def torch_loader(workers: int, cast: bool = True):
    def method(reader, plan, sizes, files):
        loader = TorchLoader(reader, plan, num_workers=workers, prefetch=2, cast=cast)
        t = time.perf_counter()
        if hasattr(loader, "start"):  # its recycled buffers: allocated and touched once, like DALI's start
            loader.start()
        start = time.perf_counter() - t
        dt, samples, nbytes, first = run_loader(loader, sizes)
        kind = "fp32 (cast on CPU)" if cast else "fp16, no cast"
        return dt, samples, nbytes, f"{workers} workers; {kind}; setup {start:.2f}s, 1st batch {first:.2f}s"

    return method


def dali_loader(workers: int, threads: int, cast: bool = True, source: str = "map"):
    def method(reader, plan, sizes, files):
        from megagen.data.loader_dali import DaliLoader

        loader = DaliLoader(
            reader,
            plan,
            num_threads=threads,
            prefetch_queue_depth=2,
            py_num_workers=workers,
            cast=cast,
            source=source,
        )
        t = time.perf_counter()
        loader.start()
        start = time.perf_counter() - t
        dt, samples, nbytes, first = run_loader(loader, sizes)
        shm = sum(loader.shm_statistics().get("capacities", [])) / 2**20 if source == "workers" else 0
        loader.close()
        kind = "fp32 (cast on CPU)" if cast else "fp16, no cast"
        note = f"{kind}; {threads} threads; setup {start:.2f}s, 1st batch {first:.2f}s"
        return dt, samples, nbytes, note + (f"; shm {shm:.0f} MB" if source == "workers" else "")

    return method


def methods(workers: int, threads: int) -> dict:
    out = {
        "raw sequential": raw_sequential,
        "raw memmap random": raw_memmap_random,
        "reader.read_batch": reader_batches,
        "cast fp16 -> fp32 (CPU)": cast_only,
        "torch loader (main proc)": torch_loader(0),
        f"torch loader ({workers} workers)": torch_loader(workers),
        "torch (main proc) fp16": torch_loader(0, cast=False),
        f"torch ({workers} workers) fp16": torch_loader(workers, cast=False),
    }
    if dali_available():
        out["DALI loader (map)"] = dali_loader(0, threads)
        out["DALI (map) fp16"] = dali_loader(0, threads, cast=False)
        out[f"DALI loader ({workers} workers)"] = dali_loader(workers, threads, source="workers")
        out[f"DALI ({workers} workers) fp16"] = dali_loader(workers, threads, cast=False, source="workers")
    return out


def measure_case(case: Case, root: str, repeat: int, cold: bool, workers: int, threads: int) -> list[Row]:
    path = ensure_dataset(root, case)
    reader = ShardReader(path)
    plan, sizes, files = request_plan(reader, case.micro), sample_bytes(reader), shard_files(reader)
    rows = []
    for cache in ("warm", "cold") if cold else ("warm",):
        if cache == "warm":
            read_files(files)
        for method, fn in methods(workers, threads).items():
            best = None
            for _ in range(repeat if cache == "warm" else 1):
                if cache == "cold":
                    drop_caches()
                reader = setup.open_reader(path)  # fresh memory maps
                dt, samples, nbytes, note = fn(reader, plan, sizes, files)
                if best is None or dt < best.seconds:
                    best = Row(case.name, cache, method, dt, samples, nbytes, note)
            rows.append(best)
    return rows


# ------------------------------------------------------------------------------------------------ report
def print_table(rows: list[Row]) -> None:
    raw = {(r.case, r.cache, r.method): r for r in rows if r.method.startswith("raw")}
    head = (
        f"{'case':<20} {'cache':<5} {'method':<27} {'samples/s':>10} {'MB/s':>8} "
        f"{'/raw seq':>8} {'/raw rand':>9}  note"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        seq, rnd = raw[(r.case, r.cache, "raw sequential")], raw[(r.case, r.cache, "raw memmap random")]
        print(
            f"{r.case:<20} {r.cache:<5} {r.method:<27} {r.samples_per_s:>10.0f} {r.mb_per_s:>8.0f} "
            f"{r.mb_per_s / seq.mb_per_s:>8.2f} {r.mb_per_s / rnd.mb_per_s:>9.2f}  {r.note}"
        )


def _describe_machine(args, chosen: list[Case]) -> bool:
    """Print the machine, DALI, the readers' mode, the page cache and the disk; write the datasets. True when
    the page cache can be dropped here (cold rows are real)."""
    cpus = len(os.sched_getaffinity(0))
    dali = "not installed"
    if dali_available():
        import nvidia.dali

        dali = nvidia.dali.__version__
    load = os.getloadavg()[0]
    threads = torch.get_num_threads()
    print(f"machine: {cpus} CPU cores (1-min load {load:.1f}), torch {torch.__version__} ({threads} threads)")
    print(f"DALI: {dali}")
    print(f"readers: data.check_finite={args.check_finite}")
    os.makedirs(args.root, exist_ok=True)
    for case in chosen:
        ensure_dataset(args.root, case)
    probe = shard_files(ShardReader(os.path.join(args.root, chosen[-1].name)))
    cold = can_drop_caches(probe)
    state = "works: cold rows are real" if cold else "does not work here: warm only"
    print(f"page cache: drop_caches {state}")
    disk = subprocess.run(["df", "-h", args.root], capture_output=True, text=True).stdout.splitlines()[-1]
    print(f"disk: {disk}")
    return cold


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/megagen-bench", help="where the datasets are written (reused)")
    p.add_argument("--tiny-samples", type=int, default=3072)
    p.add_argument("--moviegen-samples", type=int, default=128)
    p.add_argument("--moviegen-micro", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="warm-cache repeats (best is kept)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (torch and DALI)")
    p.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    p.add_argument("--wait-rounds", type=int, default=5, help="data-wait: rounds of turns")
    p.add_argument("--wait-steps", type=int, default=20, help="data-wait: steps per loader per round")
    p.add_argument("--cases", default="video_tiny,moviegen_768px_16s")
    p.add_argument(
        "--moviegen-step-ms", type=float, default=100.0, help="Movie Gen data-wait: synthetic step (ms)"
    )
    p.add_argument(
        "--check-finite",
        default="on_nan_loss",
        choices=("on_nan_loss", "eager"),
        help="data.check_finite of the readers: on_nan_loss (training's default with on_error=fail: no "
        "NaN/inf scan on read) or eager (scan fused with every copy)",
    )
    args = p.parse_args()
    setup.CHECK_EAGER = args.check_finite == "eager"

    cases = {
        "video_tiny": Case("video_tiny", None, args.tiny_samples, 8),
        "moviegen_768px_16s": Case(
            "moviegen_768px_16s", "t32_h96_w96", args.moviegen_samples, args.moviegen_micro
        ),
    }
    chosen = [cases[c] for c in args.cases.split(",")]
    cold = _describe_machine(args, chosen)

    rows = []
    for case in chosen:
        reader = ShardReader(os.path.join(args.root, case.name))
        sizes = sample_bytes(reader)
        plan = request_plan(reader, case.micro)
        desc = ", ".join(f"{b} {reader.buckets[b].samples}×{sizes[b] / 1e6:.3f} MB" for b in reader.buckets)
        print(f"\n[{case.name}] micro-batch {case.micro}, {len(plan)} requests: {desc}")
        rows += measure_case(case, args.root, args.repeat, cold, args.workers, args.threads)
    print()
    print_table(rows)

    if "video_tiny" in args.cases:
        report_tiny_wait(args)
    if "moviegen_768px_16s" in args.cases:
        report_moviegen_wait(args)
    print(f"\n1-min load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
