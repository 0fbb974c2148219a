"""Context-parallel kinds side by side: allgather_kv vs ulysses at several sequence lengths (cp=2, CPU).

For each latent size both kinds run `megagen bench` under torchrun in this one invocation; the table shows
step times, their ratio, the bytes each moves per step, and the planner's prediction beside them (cp bytes,
exact, and the ulysses/allgather step-time ratio on the `cpu` cluster preset).

    python benchmarks/cp_kinds.py [--steps 6 --warmup 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

from _launch import bench_on_mesh

SIZES = {256: (4, 16, 16), 1024: (16, 16, 16), 2048: (16, 16, 32)}  # tokens: latent (T, H, W), patch 1×2×2


def planner_prediction(config: str, overrides: list[str]) -> dict:
    """The planner's cp bytes per step and step time for this run on the `cpu` cluster preset."""
    from megagen.config import load_config
    from megagen.parallel.planner.cluster import load_cluster
    from megagen.parallel.planner.step_cost import step_cost
    from megagen.planning import plan_point_for_config, workload_for_config

    cfg = load_config(config, overrides)
    cost = step_cost(workload_for_config(cfg), plan_point_for_config(cfg, 2, "cpu"), load_cluster("cpu"))
    cp_bytes = sum(v["bytes"] for v in cost.comm.get("cp", {}).values())
    return {"cp_bytes": cp_bytes, "step_s": cost.step_s}


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
        f"{'ag cp MB':>9s} {'uly cp MB':>10s} {'planned ag/uly cp MB':>21s} {'planned uly/ag':>15s}"
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
        for kind in ("allgather_kv", "ulysses"):
            row[kind]["planner"] = planner_prediction(
                args.config, [*sizes, "parallel.cp=2", f"parallel.cp_kind={kind}"]
            )
        ag, uly = row["allgather_kv"], row["ulysses"]
        pag, puly = ag["planner"], uly["planner"]
        print(
            f"{tokens:7d} {ag['step_time_s'] * 1e3:13.1f} {uly['step_time_s'] * 1e3:11.1f} "
            f"{uly['step_time_s'] / ag['step_time_s']:11.3f} "
            f"{ag['comm_bytes_per_step'].get('cp', 0) / 2**20:9.2f} "
            f"{uly['comm_bytes_per_step'].get('cp', 0) / 2**20:10.2f} "
            f"{pag['cp_bytes'] / 2**20:10.2f}/{puly['cp_bytes'] / 2**20:<10.2f} "
            f"{puly['step_s'] / pag['step_s']:15.3f}"
        )
        results[tokens] = row
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
