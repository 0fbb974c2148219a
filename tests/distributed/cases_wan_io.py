"""Worker-side case: `checkpoint.init_from` of a diffusers directory into wan/tiny on the pool's mesh.

Every rank calls the same function (or one process alone, for the reference).
"""

from __future__ import annotations

import math

import torch.distributed as dist

from tests.distributed.cases_meta_init import _CountingSlices, _runtime
from tests.distributed.cases_parity import SMALL

WAN_EXAMPLE = "examples/configs/wan_tiny.yaml"


def wan_from_diffusers(overrides: list[str], source: str, run_dir: str) -> dict:
    """Build a wan/tiny trainer started from the diffusers directory `source`: the gathered parameters
    on rank 0, and on every rank the elements it read next to the elements of its own shards."""
    from unittest import mock

    import safetensors

    from megagen.checkpoint import attach_checkpointing
    from megagen.config import load_config
    from megagen.parallel.materialize import local_part
    from megagen.train.gather import full_tensors
    from megagen.train.loop import Trainer

    init = [f"checkpoint.init_from={source}", "checkpoint.every=0", f"run.dir={run_dir}"]
    cfg = load_config(WAN_EXAMPLE, [*SMALL, "train.steps=1", *init, *overrides])
    trainer = Trainer(cfg, _runtime(cfg))
    read: list[int] = []
    real = safetensors.safe_open
    with mock.patch.object(safetensors, "safe_open", lambda *a, **k: _CountingSlices(real(*a, **k), read)):
        report = attach_checkpointing(trainer).init_report
    named = list(trainer.model.named_parameters())
    local = sum(local_part(p).numel() for n, p in named if n in report.loaded)
    out = {"read": sum(read), "local": local, "loaded": report.loaded, "missing": report.missing}
    params = full_tensors(named)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out["params"] = params
        out["total"] = sum(math.prod(t.shape) for t in params.values())
    return out
