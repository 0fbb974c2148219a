"""Framework overhead: megagen's training step vs a minimal hand-written PyTorch loop, same module and data.

Both run in this process, alternating in rounds so machine noise hits both alike; the printed ratio is
median(megagen step) / median(hand-written step) per round, with its spread over rounds.

    python benchmarks/framework_overhead.py [--rounds 5 --steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from megagen.config import load_config
from megagen.data.synthetic import SyntheticDataset
from megagen.diffusion import flow_matching_loss_sum, interpolate, velocity_target
from megagen.specs import get_spec
from megagen.train.loop import Trainer

CASES = {
    "video_tiny": [],
    # 8×16×32 latents → 1,024 tokens per sample (~0.6 s per step on a 2-core CPU)
    "video_tiny_1k_tokens": ["data.latent_frames=8", "data.latent_height=16", "data.latent_width=32"],
    # ≥ 1 s per step on a 2-core CPU: 16×16×32 latents → 2,048 tokens per sample
    "video_tiny_2k_tokens": ["data.latent_frames=16", "data.latent_height=16", "data.latent_width=32"],
}
COMMON = ["metrics.tensorboard=false", "metrics.jsonl=false", "metrics.progress=none", "optim.warmup_steps=0"]


def megagen_steps(overrides: list[str], steps: int) -> list[float]:
    cfg = load_config("examples/configs/video_tiny.yaml", [*COMMON, *overrides, f"train.steps={steps}"])
    trainer = Trainer(cfg)
    trainer.run()
    return [r["step_time_s"] for r in trainer.history]


def hand_written_steps(overrides: list[str], steps: int) -> list[float]:
    """The same module, data and objective in the plainest PyTorch: no runtime, sampler or metrics."""
    cfg = load_config("examples/configs/video_tiny.yaml", [*COMMON, *overrides, f"train.steps={steps}"])
    spec = get_spec("video")
    torch.manual_seed(cfg.run.seed)
    model = spec.build(cfg)
    spec.init_weights(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    data = SyntheticDataset(spec.sample_shapes(cfg), cfg.run.seed, cfg.data.synthetic_classes)
    gb, mb = cfg.train.global_batch_size, cfg.train.micro_batch_size
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        for start in range(0, gb, mb):
            batch = data.batch(step, list(range(start, start + mb)))
            x1 = batch["latents"]
            x0 = torch.randn_like(x1)
            t = torch.sigmoid(torch.randn(mb))
            target = spec.to_tokens(velocity_target(x0, x1))
            pred = model(**spec.model_inputs(batch, interpolate(x0, x1, t), t, None))
            loss_sum, _ = flow_matching_loss_sum(pred, target)
            (loss_sum / (gb * target.shape[1])).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results = {}
    for name in args.cases.split(","):
        ratios, mg_all, hw_all = [], [], []
        steps = args.steps if name == "video_tiny" else max(3, args.steps // 3)
        for _ in range(args.rounds):
            mg = statistics.median(megagen_steps(CASES[name], steps)[1:])  # first step warms caches
            hw = statistics.median(hand_written_steps(CASES[name], steps)[1:])
            ratios.append(mg / hw)
            mg_all.append(mg)
            hw_all.append(hw)
        results[name] = {
            "megagen_step_s": statistics.median(mg_all),
            "hand_written_step_s": statistics.median(hw_all),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "rounds": args.rounds,
        }
        r = results[name]
        print(
            f"{name:22s} megagen {r['megagen_step_s'] * 1e3:8.1f} ms  "
            f"hand-written {r['hand_written_step_s'] * 1e3:8.1f} ms  ratio {r['ratio_median']:.3f} "
            f"(min {r['ratio_min']:.3f}, max {r['ratio_max']:.3f})",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
