"""Start-up cost of the data plan: time and memory until the first batch request, for a huge dataset.

A helper writes the *manifest only* of a dataset (no shard file, no sample data): `--samples` samples
(default 100 M) in 5 video_tiny buckets, `--samples-per-shard` per shard. Then a fresh process (so the
baseline is clean) opens it as training does — `build_data(cfg, ...)` with `train.steps=--steps` (default
10^6): manifest, reader (`data.verify=none`: there are no shards to check; with `size`/`checksum` each rank
checks 1/world of them, megagen/data/verify.py), bucket sampler, this rank's request plan, the torch
loader — and asks the plan for its first request, then for the state after `--resume-step` steps (what a
checkpoint saves) and for a request that far out. It reports seconds and resident memory above the
process's baseline: peak (`ru_maxrss`) and current. The baseline is taken after `import torch, megagen`
and what a trainer has done before it builds its data (the model is built, so torch's lazy meta-device
modules are loaded: one memory fit of a tiny shape here); `--cold` leaves that out, so that the one-time
imports (~2-5 s here) are counted too. `build_data` includes one memory fit per bucket (the micro-batch
check, megagen/data/micro_batch.py): O(buckets), like the manifest's parse is O(shards); nothing is
O(steps) or O(samples).

The rank is one of a dp=8 job (`--dp`); buckets use Movie Gen-like batch sizes (large global batches
for images, small for long videos) and fixed micro-batches. `--python` runs the measurement with another
interpreter (e.g. main's venv, to compare).

    python benchmarks/data_plan.py [--samples 100000000] [--steps 1000000] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BUCKETS = {  # name: (global batch, micro batch); 5 buckets of the tiny video spec's latent range
    "t1_h16_w16": (1024, 16),
    "t4_h16_w16": (512, 8),
    "t8_h8_w12": (256, 4),
    "t8_h16_w16": (128, 2),
    "t16_h16_w16": (64, 1),
}
CONFIG = "examples/configs/video_tiny.yaml"


def write_manifest_only(out: str, samples: int, per_shard: int) -> int:
    """A valid manifest of `samples` video_tiny samples split evenly over `BUCKETS`, listing shards of
    `per_shard` samples that are never written. Returns the number of shards."""
    from megagen.data.format import parse_bucket_name
    from megagen.data.manifest import (
        BucketInfo,
        Manifest,
        ShardInfo,
        TextEncoderInfo,
        standard_fields,
        write_manifest,
    )
    from megagen.data.shard_format import shard_file
    from megagen.data.synth import SYNTH_PRESETS
    from megagen.specs import get_spec

    preset = SYNTH_PRESETS["video_tiny"]
    arch = get_spec(preset.spec).presets[preset.spec_preset]
    encoders = {e: TextEncoderInfo(dim=d, max_len=preset.text_len) for e, d in arch.text_encoders.items()}
    buckets, shards = [], 0
    for b, name in enumerate(BUCKETS):
        n = samples // len(BUCKETS) + (b < samples % len(BUCKETS))
        shape = (arch.latent_channels, *parse_bucket_name(name))
        infos = []
        for i, start in enumerate(range(0, n, per_shard)):
            count = min(per_shard, n - start)
            infos.append(ShardInfo(shard_file(name, i), count, 4096 + count * 1024, "0" * 64))
        shards += len(infos)
        buckets.append(BucketInfo(name, shape, n, infos))
    manifest = Manifest(
        spec="video",
        latent_channels=arch.latent_channels,
        latent_dtype="float16",
        text_encoders=encoders,
        fps_values=[16.0, 24.0],
        fields=standard_fields("float16", encoders),
        buckets=buckets,
    )
    os.makedirs(out, exist_ok=True)
    write_manifest(out, manifest)
    return shards


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    import resource

    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return current / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(path: str, steps: int, dp: int, resume_step: int, warm: bool) -> dict:
    """In this (fresh) process: build the data pipeline as training does, ask for the first request."""
    from types import SimpleNamespace

    import torch

    import megagen  # noqa: F401 - part of the baseline
    from megagen.config import load_config
    from megagen.data.pipeline import build_data
    from megagen.data.shard_reader import ShardReader
    from megagen.planning import activation_fit
    from megagen.specs import get_spec

    if warm:  # what a trainer has done before build_data: the model built, torch's lazy modules loaded
        activation_fit(load_config(CONFIG, []), (16, 4, 8, 8), dp, torch.device("cpu"))
    cur0, peak0 = _rss_mb()
    sizes = ", ".join(f"{n}: {{global: {g}, micro: {m}}}" for n, (g, m) in BUCKETS.items())
    cfg = load_config(
        CONFIG,
        [
            f"data.path={path}",
            f"train.steps={steps}",
            "data.verify=none",
            "data.loader=torch",
            "data.num_workers=0",
            f"data.bucket_batch={{{sizes}}}",
        ],
    )
    runtime = SimpleNamespace(rank=3, world_size=dp, dp_rank=3, dp_size=dp, device=torch.device("cpu"))
    t0 = time.perf_counter()
    reader = ShardReader(path, verify="none", check_finite=False)  # what build_data opens (lazy headers)
    t_reader = time.perf_counter() - t0
    data = build_data(cfg, get_spec(cfg.model.spec), runtime, steps, reader=reader)
    first = data.plan[0]
    t_first = time.perf_counter() - t0
    cur1, peak1 = _rss_mb()
    t1 = time.perf_counter()
    state = data.state_after(resume_step)
    far = data.plan[len(data.plan) - 1]
    t_far = time.perf_counter() - t1
    cur2, peak2 = _rss_mb()
    return {
        "warm": warm,
        "samples": sum(b.samples for b in data.reader.manifest.buckets),
        "shards": sum(len(b.shards) for b in data.reader.manifest.buckets),
        "steps": steps,
        "requests_this_rank": len(data.plan),
        "first_request": {"step": first.step, "bucket": first.bucket, "samples": len(first.sample_ids)},
        "first_request_s": t_first,
        "of_which_manifest_and_reader_s": t_reader,
        "peak_rss_above_baseline_mb": peak1 - peak0,
        "rss_above_baseline_mb": cur1 - cur0,
        "baseline_rss_mb": cur0,
        "resume_step": resume_step,
        "state_after_resume_step_and_last_request_s": t_far,
        "peak_rss_above_baseline_mb_after_resume": peak2 - peak0,
        "last_request_step": far.step,
        "state_step": state["step"],
    }


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100_000_000)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--resume-step", type=int, default=None, help="default: steps // 2")
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--out", default=None, help="where the manifest goes (default: a temporary directory)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the measurement")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="count torch's one-time lazy imports (model tracing on the meta device) too; by default the "
        "child first does what a trainer does before build_data, one memory fit of a tiny shape",
    )
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process
    return ap.parse_args()


def _measure_in_child(args, out: str, resume: int) -> dict:
    """The measurement in a fresh interpreter, so its baseline holds no manifest-writing leftovers."""
    cmd = [
        args.python,
        os.path.abspath(__file__),
        "--measure",
        out,
        "--steps",
        str(args.steps),
        "--dp",
        str(args.dp),
        "--resume-step",
        str(resume),
    ] + (["--cold"] if args.cold else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.getcwd())
    if proc.returncode:
        sys.exit(f"measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = _arguments()
    resume = args.resume_step if args.resume_step is not None else args.steps // 2
    if args.measure:
        print(json.dumps(measure(args.measure, args.steps, args.dp, resume, not args.cold)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "manifest-only")
        t = time.perf_counter()
        shards = write_manifest_only(out, args.samples, args.samples_per_shard)
        size_mb = os.path.getsize(os.path.join(out, "manifest.json")) / 2**20
        print(
            f"manifest: {args.samples:,} samples, {shards:,} shards, {size_mb:.1f} MB "
            f"(written in {time.perf_counter() - t:.1f} s, no shard data)"
        )
        result = _measure_in_child(args, out, resume)
    result["manifest_mb"] = size_mb
    result["python"] = args.python
    reader_s = result["of_which_manifest_and_reader_s"]
    cold = ", cold" if args.cold else ""
    print(
        f"train.steps={args.steps:,}, dp rank 3 of {args.dp}{cold}: first batch request after "
        f"{result['first_request_s']:.2f} s (manifest and reader {reader_s:.2f} s), "
        f"{result['peak_rss_above_baseline_mb']:.0f} MiB peak RSS above "
        f"the baseline ({result['rss_above_baseline_mb']:.0f} MiB resident); state after step {resume:,} and "
        f"the last request: {result['state_after_resume_step_and_last_request_s'] * 1e3:.1f} ms"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
