"""GPU driver for run_checks.sh `dali`: DALI and torch loaders delivering Movie Gen-shaped batches to a GPU.

    python -m tests.gpu.dali_loaders --out gpu-out [--samples 96] [--root /tmp/megagen-gpu-data]

Writes a synthetic dataset of 768 px, 16 s latents (16×32×96×96 fp16, 9.4 MB per sample), then
1. checks that every loader yields the same batches on the GPU (bitwise: DALI `map`, DALI `workers` and
   the torch loader with 2 workers against the torch loader in the main process);
2. measures samples/s and GB/s into GPU memory (fp32 after the on-device cast), side by side with the
   raw memory-map read speed of the same samples, warm page cache, micro-batch 2.
Writes <out>/dali.json. Without CUDA, or without nvidia.dali, it says so and exits 0. `--device cpu`
runs the same steps on the CPU (a dry run of this script where no GPU is lent).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

BUCKET = "t32_h96_w96"
MICRO = 2


def _plan(reader):
    from megagen.data.sampler import BucketPlan, BucketSampler, RequestPlan

    n = reader.buckets[BUCKET].samples
    return RequestPlan(BucketSampler([BucketPlan(BUCKET, n, MICRO, MICRO)], 0), n // MICRO, 0, 1)


def _raw(reader, plan) -> tuple[float, int]:
    nbytes, t = 0, time.perf_counter()
    for req in plan:
        for i in req.sample_ids:
            nbytes += sum(np.array(v).nbytes for v in reader.read(req.bucket, i).values())
    return time.perf_counter() - t, nbytes


def _loaders(reader, plan, device) -> dict:
    from megagen.data.loader_dali import DaliLoader
    from megagen.data.loader_torch import TorchLoader

    index = None if device.type == "cpu" else device.index or 0
    return {
        "torch (main proc)": lambda: TorchLoader(reader, plan, num_workers=0, device=device),
        "torch (2 workers)": lambda: TorchLoader(reader, plan, num_workers=2, device=device),
        "DALI map": lambda: DaliLoader(reader, plan, num_threads=4, device_id=index),
        "DALI workers (2)": lambda: DaliLoader(
            reader, plan, py_num_workers=2, device_id=index, source="workers"
        ),
    }


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(make, stored_bytes: int, device) -> dict:
    loader = make()
    if hasattr(loader, "start"):
        loader.start()
    samples, first, t0 = 0, None, time.perf_counter()
    for _, batch in loader:
        if first is None:  # the first batch (workers starting, pipeline filling) is reported apart
            _sync(device)
            first = time.perf_counter()
            continue
        samples += len(batch["latents"])
    _sync(device)
    dt = time.perf_counter() - first
    if hasattr(loader, "close"):
        loader.close()
    return {
        "samples_per_s": samples / dt,
        "gb_per_s": samples * stored_bytes / dt / 1e9,
        "first_batch_s": first - t0,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-out")
    p.add_argument("--root", default="/tmp/megagen-gpu-data")
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("dali_loaders: no GPU; nothing to check")
        return 0
    from megagen.data.loaders import dali_available

    if not dali_available():
        (out / "dali.json").write_text(json.dumps({"skipped": "nvidia.dali is not installed"}))
        print("dali_loaders: unverified (nvidia.dali is not installed)")
        return 0
    from megagen.data.shard_reader import ShardReader
    from megagen.data.synth import synth

    path = Path(args.root) / "moviegen_768px_16s"
    if not (path / "manifest.json").is_file():
        synth(path, "video_tiny", samples=args.samples, buckets=BUCKET, seed=0, overwrite=True)
    reader = ShardReader(path, check_finite=False)
    plan = _plan(reader)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    )
    makers = _loaders(reader, plan, device)

    reference = [(r, {k: v.clone() for k, v in b.items()}) for r, b in makers["torch (main proc)"]()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = {"device": name, "samples": args.samples, "micro": MICRO}
    ok = True
    for name, make in makers.items():
        loader = make()
        got = [(r, b) for r, b in loader]
        same = [r for r, _ in got] == [r for r, _ in reference] and all(
            a.keys() == b.keys() and all(a[k].device == device and torch.equal(a[k], b[k]) for k in a)
            for (_, a), (_, b) in zip(got, reference)
        )
        if hasattr(loader, "close"):
            loader.close()
        result.setdefault("same_batches", {})[name] = same
        ok &= same

    stored = sum(
        int(np.prod(s)) * np.dtype(reader.manifest.fields[k].dtype).itemsize
        for k, s in reader.sample_shapes(BUCKET).items()
    )
    _raw(reader, plan)  # warm the page cache
    dt, nbytes = min(_raw(ShardReader(path, check_finite=False), plan) for _ in range(2))
    result["raw_gb_per_s"] = nbytes / dt / 1e9
    speeds = {}
    for name, make in makers.items():
        runs = [_timed(make, stored, device) for _ in range(2)]
        speeds[name] = max(runs, key=lambda r: r["gb_per_s"])
        speeds[name]["of_raw"] = speeds[name]["gb_per_s"] / result["raw_gb_per_s"]
    result["loaders"] = speeds
    result["ok"] = ok
    (out / "dali.json").write_text(json.dumps(result, indent=2))
    print(f"raw memory-map read: {result['raw_gb_per_s']:.2f} GB/s")
    for name, s in speeds.items():
        print(
            f"{name:<20} {s['samples_per_s']:8.1f} samples/s {s['gb_per_s']:6.2f} GB/s "
            f"({s['of_raw']:.2f} of raw) same batches: {result['same_batches'][name]}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
