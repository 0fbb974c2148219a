"""Worker-side parity cases: train a few steps on a mesh and return full losses, params and grads.

Run inside the pool (every rank calls the same function); rank 0's gathered tensors are compared with
a one-process run of the same config in the test process.
"""

from __future__ import annotations

import warnings

import torch.distributed as dist

from megagen.config import load_config
from megagen.train import train
from megagen.train.loop import full_tensors

EXAMPLE = "examples/configs/video_tiny.yaml"
BASE = [
    "train.steps=3",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "optim.warmup_steps=1",
    "metrics.tensorboard=false",
    "metrics.jsonl=false",
    "metrics.progress=none",
]


def config(overrides: list[str], run_dir: str):
    return load_config(EXAMPLE, [*BASE, f"run.dir={run_dir}", *overrides])


def run_training(overrides: list[str], run_dir: str = "/tmp/megagen-parity") -> dict:
    """Train on the current process group (or alone); gather full params/grads on every rank."""
    from megagen.parallel.runtime import DistributedRuntime, LocalRuntime

    cfg = config(overrides, run_dir)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    runtime = DistributedRuntime(cfg) if dist.is_initialized() else LocalRuntime()
    result = train(cfg, runtime, capture_grads=True)
    params = full_tensors(list(result.model.named_parameters()))
    out = {"losses": result.losses, "grad_norms": result.grad_norms}
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.update(params=params, grads=result.last_grads)
    return out


def state_bytes(overrides: list[str]) -> dict[str, int]:
    """Bytes this rank holds for parameters and AdamW state after one step (local shards only).

    Gradients are freed by zero_grad; FSDP2 gives them exactly the parameters' sharding, so their bytes
    equal the parameter bytes.
    """
    from torch.distributed.tensor import DTensor

    from megagen.parallel.runtime import DistributedRuntime, LocalRuntime

    cfg = config([*overrides, "train.steps=1"], "/tmp/megagen-mem")
    result = train(cfg, DistributedRuntime(cfg) if dist.is_initialized() else LocalRuntime())

    def nbytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in result.model.parameters())
    optim = sum(nbytes(v) for st in result.optimizer.state.values() for v in st.values() if v.dim() > 0)
    return {"params": params, "optimizer": optim}


def mesh_error(overrides: list[str]) -> str:
    """Build spec checks + runtime with a bad mesh; return the error text this rank raised."""
    from megagen.config import ConfigError
    from megagen.parallel.runtime import DistributedRuntime
    from megagen.specs import get_spec

    cfg = config(overrides, "/tmp/megagen-mesh")
    try:
        get_spec(cfg.model.spec).validate(cfg)
        DistributedRuntime(cfg)
    except ConfigError as exc:
        return str(exc)
    return ""


def comm_of_one_step(overrides: list[str]) -> dict:
    """{axis: {kind: {bytes, calls}}} counted during one optimizer step (one micro-batch)."""
    from megagen.parallel.runtime import DistributedRuntime

    cfg = config([*overrides, "train.steps=1", "metrics.comm=true"], "/tmp/megagen-comm")
    result = train(cfg, DistributedRuntime(cfg))
    return result.comm[0]


def comm_and_state(overrides: list[str]) -> dict:
    """Communication of step 1 and the state bytes after it, under the parity configs (rank-local)."""
    from torch.distributed.tensor import DTensor

    from megagen.parallel.runtime import DistributedRuntime

    cfg = config([*overrides, "train.steps=1", "metrics.comm=true"], "/tmp/megagen-plan")
    result = train(cfg, DistributedRuntime(cfg))

    def nbytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in result.model.parameters())
    optim = sum(nbytes(v) for st in result.optimizer.state.values() for v in st.values() if v.dim() > 0)
    return {"comm": result.comm[0], "params": params, "optimizer": optim}


def preflight_case(overrides_by_rank: dict) -> str:
    """Build the runtime with per-rank overrides; return the pre-flight error text ('' if accepted)."""
    from megagen.config import ConfigError
    from megagen.parallel.runtime import DistributedRuntime

    cfg = config(overrides_by_rank.get(dist.get_rank(), []), "/tmp/megagen-preflight")
    try:
        DistributedRuntime(cfg)
    except ConfigError as exc:
        return str(exc)
    return ""
