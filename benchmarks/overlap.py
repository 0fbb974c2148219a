"""Communication/compute overlap on CPU: the same steps with `parallel.overlap` on and off, side by side.

Each case runs `megagen bench` under torchrun (gloo, 1 thread per rank) twice in this one invocation, once
per setting, and the table gives step time and exposed communication per mesh axis (seconds per step the
training thread waited on collectives; None where unmeasurable, e.g. FSDP2's own waits) for each.

    python benchmarks/overlap.py [--cases "cp2-allgather,tp2+sp"] [--tokens 1024,4096] [--steps 3 --warmup 1]
                                 [--json out.json]

The model is the video `small` preset (d 512, 2 layers: GEMMs, not call overheads, set the step time);
`--tokens` picks the sequence length through the number of 32×32 latent frames (256 tokens each).
"""

from __future__ import annotations

import argparse
import json

from _launch import bench_on_mesh

MODEL = ["model.preset=small", "data.latent_height=32", "data.latent_width=32", "train.micro_batch_size=1"]
TOKENS_PER_FRAME = 256  # 32×32 latents in 2×2 patches
CASES = {
    "cp2-allgather": (2, ["parallel.cp=2", "train.global_batch_size=2"]),
    "cp2-ulysses": (2, ["parallel.cp=2", "parallel.cp_kind=ulysses", "train.global_batch_size=2"]),
    "tp2+sp": (2, ["parallel.tp=2", "train.global_batch_size=2"]),
    "fsdp2xtp2": (4, ["parallel.tp=2", "parallel.dp_shard=2", "train.global_batch_size=2"]),
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
    ap.add_argument("--tokens", default="1024,2048,4096", help="comma-separated sequence lengths")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default="")
    ap.add_argument("overrides", nargs="*", default=[], help="extra config overrides for every run")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        frames = [f"data.latent_frames={tokens // TOKENS_PER_FRAME}"]
        for name in args.cases.split(","):
            nproc, extra = CASES[name]
            for flag in ("true", "false"):  # on and off back to back: the same machine state for both
                overrides = [*MODEL, *frames, *args.overrides, *extra, f"parallel.overlap={flag}"]
                results[f"{name} {tokens} overlap={flag}"] = bench_on_mesh(
                    nproc, overrides, args.steps, args.warmup, args.config
                )
    print(f"{'case':32s} {'step ms':>9s}  exposed communication per axis (per step)")
    for name, r in results.items():
        print(f"{name:32s} {r['step_time_s'] * 1e3:9.1f}  {_exposed(r)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
