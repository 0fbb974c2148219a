"""GPU driver for run_checks.sh: train the video 1b preset a few steps per mode, and bench it.

    python -m tests.gpu.train_modes modes --out gpu-out     # eager / triton / compile / cuda graphs
    python -m tests.gpu.train_modes bench --out gpu-out     # `megagen bench --json` on this GPU

Each mode trains from the same seed on the same data; losses must agree with the eager torch-kernel run
within bf16 tolerance, and the median step time of the timed steps gives each mode's speedup. One process
runs every mode on a one-rank NCCL group (the single-process runtime is CPU-only), freeing the model between
modes. Writes <out>/modes.json or <out>/bench.json. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

EXAMPLE = "examples/configs/video_tiny.yaml"
PRESET = [
    "model.preset=1b",
    "parallel.param_dtype=bf16",  # bf16 compute, fp32 masters (autocast on one rank: parallel/precision.py)
    "data.latent_frames=8",
    "data.latent_height=32",
    "data.latent_width=32",  # 8·16·16 = 2048 tokens per sample
    "data.text_tokens=32",
    "train.global_batch_size=2",
    "train.micro_batch_size=2",
    "optim.warmup_steps=2",
    "metrics.tensorboard=false",
    "metrics.jsonl=false",
    "metrics.progress=none",
    "checkpoint.every=0",
]
MODES = {
    "eager": ["kernels.backend=torch"],
    "triton": ["kernels.backend=auto"],
    "compile": ["kernels.backend=torch", "parallel.compile=true", "parallel.compile_backend=inductor"],
    "cuda_graphs": ["kernels.backend=auto", "train.cuda_graphs=true"],
}
LOSS_RTOL = 2e-2  # bf16 tolerance (2^-6 ≈ 1.6e-2)


def _one_rank_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)


def _runtime(cfg):
    from megagen.runtime_setup import distributed_runtime

    _one_rank_group()
    return distributed_runtime(cfg)


def _free() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def run_mode(name: str, overrides: list[str], steps: int, warmup: int) -> dict:
    from megagen.config import ConfigError, load_config
    from megagen.kernels import backend as registry
    from megagen.train.loop import Trainer

    cfg = load_config(EXAMPLE, [*PRESET, f"train.steps={warmup + steps}", f"run.dir=/tmp/megagen-gpu-{name}",
                                *overrides])  # fmt: skip
    if name == "triton" and not registry.installed("triton"):
        return {"mode": name, "skipped": "triton not installed"}
    t0 = time.perf_counter()
    try:
        trainer = Trainer(cfg, _runtime(cfg))
    except ConfigError as exc:
        return {"mode": name, "skipped": str(exc)}
    trainer.run()
    hist = trainer.history
    out = {
        "mode": name,
        "losses": [r["loss"] for r in hist],
        "step_time_s": statistics.median(r["step_time_s"] for r in hist[warmup:]),
        "first_step_s": hist[0]["step_time_s"],
        "wall_s": time.perf_counter() - t0,
        "max_mem_gb": max(r["max_mem_gb"] for r in hist),
        "kernels": sorted(f"{op}:{b}" for (op, b) in registry.usage()),
    }
    if trainer.cuda_graphs is not None:
        out["captures"] = trainer.cuda_graphs.captures
    del trainer
    _free()
    return out


def cmd_modes(args) -> int:
    results = {}
    for name in args.only or list(MODES):
        from megagen.kernels import backend as registry

        registry.reset_usage()
        print(f"[modes] {name} ...", flush=True)
        try:
            results[name] = run_mode(name, MODES[name], args.steps, args.warmup)
        except Exception as exc:  # one failing mode must not hide the others
            results[name] = {"mode": name, "error": f"{type(exc).__name__}: {exc}"}
            _free()
        print(f"[modes] {name}: {json.dumps(results[name])}", flush=True)
    base = results.get("eager", {})
    ok = True
    for r in results.values():
        if "losses" not in r or "losses" not in base:
            continue
        rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
        r["max_loss_rel_vs_eager"] = rel
        r["loss_ok"] = rel <= LOSS_RTOL
        r["speedup_vs_eager"] = base["step_time_s"] / r["step_time_s"]
        ok &= r["loss_ok"]
    ok &= all("error" not in r for r in results.values())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "modes.json").write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


def cmd_bench(args) -> int:
    from megagen.config import load_config
    from megagen.metrics.bench import print_bench, run_bench

    cfg = load_config(EXAMPLE, [*PRESET, "kernels.backend=auto", *args.overrides])
    result = run_bench(cfg, args.steps, args.warmup, runtime=_runtime(cfg))
    print_bench(result, as_json=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("modes", "bench"))
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compile / capture happen here)")
    p.add_argument("--only", nargs="*", choices=list(MODES), help="modes to run (default: all)")
    p.add_argument("overrides", nargs="*", default=[], help="extra config overrides (bench)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("train_modes: no GPU (torch.cuda.is_available() is False): nothing to run")
        return 0
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cmd_modes(args) if args.command == "modes" else cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
