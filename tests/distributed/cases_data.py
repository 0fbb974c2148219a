"""Worker-side data cases: train from shards on a mesh; report losses and the samples each rank read."""

from __future__ import annotations

import torch.distributed as dist

from megagen.config import load_config
from megagen.train.loop import Trainer
from tests.distributed.cases_parity import BASE, EXAMPLE


def train_from_shards(path: str, overrides: list[str]) -> dict:
    from megagen.parallel.runtime import LocalRuntime
    from megagen.runtime_setup import distributed_runtime

    cfg = load_config(EXAMPLE, [*BASE, f"data.path={path}", "train.steps=4", *overrides])
    runtime = distributed_runtime(cfg) if dist.is_initialized() else LocalRuntime()
    trainer = Trainer(cfg, runtime)
    result = trainer.run()
    samples = [(q.step, q.bucket, q.sample_ids) for q in trainer.data.plan]
    coords = {}
    if dist.is_initialized():
        coords = {a: runtime.mesh.local_rank(a) for a in ("dp", "cp", "tp")}
    evals = [{k: v for k, v in r.items() if k.startswith("eval_loss")} for r in trainer.history]
    return {
        "losses": result.losses,
        "samples": samples,
        "coords": coords,
        "evals": evals,
        "skipped": [r.get("skipped_samples", 0) for r in trainer.history],
    }


def verify_shared(path: str, mode: str) -> dict:
    """`data.verify` at start-up on every rank: each checks its share; the outcome every rank raises."""
    from megagen.data.format import DataError
    from megagen.data.shard_reader import ShardReader
    from megagen.data.verify import verify_on_ranks

    reader = ShardReader(path, verify="none")
    try:
        verify_on_ranks(reader, mode, dist.get_rank(), dist.get_world_size())
    except DataError as exc:
        return {"error": str(exc), "file": exc.file, "rank_local": getattr(exc, "rank_local", True)}
    return {"error": None}
