"""Worker-side compile cases: train with every block under torch.compile and report what was compiled."""

from __future__ import annotations

from tests.distributed.cases_parity import run_training

COMPILE = ["parallel.compile=true", "parallel.compile_backend=aot_eager"]


def run_compiled(overrides: list[str]) -> dict:
    """`run_training` with parallel.compile on; adds how many frames dynamo compiled on this rank."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = run_training([*overrides, *COMPILE], run_dir="/tmp/megagen-compile")
    out["frames_compiled"] = int(counters["frames"]["ok"])
    return out
