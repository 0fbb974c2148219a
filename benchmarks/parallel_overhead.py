"""Parallel overhead on CPU: step time of tp2 / cp2 (each kind) / fsdp2 vs 1 process at equal global batch.

Each mesh runs `megagen bench` under torchrun (gloo, 1 thread per rank) in this one invocation; the table
gives each mesh's step time, its ratio to the 1-process step, and the share of the step spent inside
collective calls. On a 2-core machine two ranks share the cores the single process had, so a ratio near 1
means the parallel machinery costs little; communication share is what grows with the mesh.

    python benchmarks/parallel_overhead.py [--steps 8 --warmup 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

from _launch import bench_on_mesh

MESHES = {
    "1 process": (1, []),
    "fsdp2": (2, []),
    "tp2+sp": (2, ["parallel.tp=2"]),
    "cp2 allgather_kv": (2, ["parallel.cp=2"]),
    "cp2 ulysses": (2, ["parallel.cp=2", "parallel.cp_kind=ulysses"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/configs/video_tiny.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument(
        "overrides",
        nargs="*",
        default=["data.latent_frames=8", "data.latent_height=16", "train.micro_batch_size=2"],
    )
    args = ap.parse_args()
    results = {}
    for name, (nproc, extra) in MESHES.items():
        results[name] = bench_on_mesh(nproc, [*args.overrides, *extra], args.steps, args.warmup, args.config)
    base = results["1 process"]["step_time_s"]
    print(f"{'mesh':18s} {'step ms':>9s} {'vs 1 proc':>10s} {'comm share':>11s} {'comm MB/step':>13s}")
    for name, r in results.items():
        mb = sum(r["comm_bytes_per_step"].values()) / 2**20
        print(
            f"{name:18s} {r['step_time_s'] * 1e3:9.1f} {r['step_time_s'] / base:10.3f} "
            f"{r['comm_share']:11.3f} {mb:13.2f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
