"""Communication/compute overlap on CPU: the same steps with `parallel.overlap` on and off, side by side.

Each case runs `megagen bench` under torchrun (gloo, 1 thread per rank) twice in this one invocation, once
per setting, and the table gives step time and exposed communication per mesh axis (seconds per step the
training thread waited on collectives; None where unmeasurable, e.g. FSDP2's own waits) for each.

    python benchmarks/overlap.py [--cases "tp2+sp,fsdp2xtp2"] [--steps 4 --warmup 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

from _launch import bench_on_mesh

TOKENS_1K = ["data.latent_frames=8", "data.latent_height=32", "data.latent_width=32"]
CASES = {
    "tp2+sp": (2, ["parallel.tp=2"]),
    "fsdp2xtp2": (4, ["parallel.tp=2", "parallel.dp_shard=2"]),
    # context-parallel overlap (issue 18 items 1-2) adds its cases here:
    # "cp2 allgather_kv": (2, ["parallel.cp=2"]),
    # "cp2 ulysses": (2, ["parallel.cp=2", "parallel.cp_kind=ulysses"]),
}


def _exposed(result: dict) -> str:
    parts = [
        f"{axis}={'?' if s is None else f'{s * 1e3:.1f}ms'}" for axis, s in result["exposed_comm_s"].items()
    ]
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/configs/video_tiny.yaml")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default="")
    ap.add_argument("overrides", nargs="*", default=[*TOKENS_1K, "train.micro_batch_size=2"])
    args = ap.parse_args()
    results: dict[str, dict] = {}
    for name in args.cases.split(","):
        nproc, extra = CASES[name]
        for flag in ("true", "false"):
            overrides = [*args.overrides, *extra, f"parallel.overlap={flag}"]
            results[f"{name} overlap={flag}"] = bench_on_mesh(
                nproc, overrides, args.steps, args.warmup, args.config
            )
    print(f"{'case':28s} {'step ms':>9s}  exposed communication per axis (per step)")
    for name, r in results.items():
        print(f"{name:28s} {r['step_time_s'] * 1e3:9.1f}  {_exposed(r)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
