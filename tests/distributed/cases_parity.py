"""Worker-side parity cases: train a few steps on a mesh and return full losses, params and grads.

Run inside the pool (every rank calls the same function); rank 0's gathered tensors are compared with
a one-process run of the same config in the test process.
"""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from unittest import mock

import torch.distributed as dist

from megagen.config import load_config
from megagen.train import train
from megagen.train.gather import full_tensors

EXAMPLE = "examples/configs/video_tiny.yaml"
# Live init (a test option, `model.init=live`): every parameter carries gradient from step 1 (the default
# init's zero output layer leaves all but the output layer without gradient at step 1), and init_std 0.1 makes
# a broken rule move the comparison far beyond fp32 noise (test_parity.py BROKEN: 3e-5 to 1e0 relative).
# AdamW eps 1e-6 (not 1e-8) keeps the one-process reference well conditioned at these weights: the update's
# sensitivity to a gradient element far below eps is lr/eps, so with eps 1e-8 fp32 rounding in tiny gradient
# elements moves parameters enough that merely reordering the reference's own sums (micro-batch 1 instead of
# 2, same math) changed step-3 gradients by up to 2.2e-5 with QK-norm (6.7e-6 without); with eps 1e-6 that
# drift is 1.3e-6 (QK-norm), 2.4e-6 (video), 4.2e-6 (padded video), 1.7e-6 (audio), 5.1e-6 (upsampler).
LIVE = ["model.init=live", "model.init_std=0.1", "optim.eps=1e-6"]
SMALL = [
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "optim.warmup_steps=1",
    "metrics.tensorboard=false",
    "metrics.jsonl=false",
    "metrics.progress=none",
]
"""Batch sizes and quiet metrics shared by every multi-process case built on the tiny example."""
BASE = [*LIVE, "train.steps=3", *SMALL]


def config(overrides: list[str], run_dir: str):
    return load_config(EXAMPLE, [*BASE, f"run.dir={run_dir}", *overrides])


def run_training(overrides: list[str], run_dir: str = "/tmp/megagen-parity") -> dict:
    """Train on the current process group (or alone); gather full params/grads on every rank."""
    from megagen.parallel.runtime import LocalRuntime
    from megagen.runtime_setup import distributed_runtime

    cfg = config(overrides, run_dir)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    runtime = distributed_runtime(cfg) if dist.is_initialized() else LocalRuntime()
    result = train(cfg, runtime, capture_grads=True)
    params = full_tensors(list(result.model.named_parameters()))
    out = {"losses": result.losses, "grad_norms": result.grad_norms}
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.update(params=params, grads=result.last_grads)
    return out


@contextlib.contextmanager
def broken_rule(rule: str):
    """Break one engine rule on purpose, for the sensitivity tests (never a user-facing option).

    `skip_tp_sum:<glob>`: the gradient rule forgets to sum the parameters matching <glob> over tp.
    `local_positions`: every sequence shard takes the first shard's position ids, as if positions were
    computed from the local sequence length.
    """
    from megagen.parallel import parallelize, sequence

    kind, _, arg = rule.partition(":")
    if kind == "skip_tp_sum":
        real = parallelize.engine_reductions

        def forgetting(*args, **kwargs):
            out = real(*args, **kwargs)
            kept = [n for n in out.get("tp", []) if not fnmatch.fnmatchcase(n, arg)]
            assert len(kept) < len(out.get("tp", [])), f"nothing matching {arg} is summed over tp here"
            out["tp"] = kept
            return out

        with mock.patch.object(parallelize, "engine_reductions", forgetting):
            yield
    elif kind == "local_positions":
        real = sequence.SequenceSharder.shard

        def local(self, x, dim):
            if x.is_floating_point():
                return real(self, x, dim)
            index, self.index = self.index, 0
            try:
                return real(self, x, dim)
            finally:
                self.index = index

        with mock.patch.object(sequence.SequenceSharder, "shard", local):
            yield
    else:
        raise ValueError(f"unknown rule {rule!r}")


def run_training_with_broken_rule(overrides: list[str], rule: str) -> dict:
    """`run_training` with one rule broken (`broken_rule`); the patch is undone before returning."""
    with broken_rule(rule):
        return run_training(overrides)


def state_bytes(overrides: list[str]) -> dict[str, int]:
    """Bytes this rank holds for parameters and AdamW state after one step (local shards only).

    Gradients are freed by zero_grad; FSDP2 gives them exactly the parameters' sharding, so their bytes
    equal the parameter bytes.
    """
    from torch.distributed.tensor import DTensor

    from megagen.parallel.runtime import LocalRuntime
    from megagen.runtime_setup import distributed_runtime

    cfg = config([*overrides, "train.steps=1"], "/tmp/megagen-mem")
    result = train(cfg, distributed_runtime(cfg) if dist.is_initialized() else LocalRuntime())

    def nbytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in result.model.parameters())
    optim = sum(nbytes(v) for st in result.optimizer.state.values() for v in st.values() if v.dim() > 0)
    return {"params": params, "optimizer": optim}


def mesh_error(overrides: list[str]) -> str:
    """Build spec checks + runtime with a bad mesh; return the error text this rank raised."""
    from megagen.config import ConfigError
    from megagen.runtime_setup import distributed_runtime
    from megagen.specs import get_spec

    cfg = config(overrides, "/tmp/megagen-mesh")
    try:
        get_spec(cfg.model.spec).validate(cfg)
        distributed_runtime(cfg)
    except ConfigError as exc:
        return str(exc)
    return ""


def comm_of_one_step(overrides: list[str]) -> dict:
    """{axis: {kind: {bytes, calls}}} counted during one optimizer step (one micro-batch)."""
    from megagen.runtime_setup import distributed_runtime

    cfg = config([*overrides, "train.steps=1", "metrics.comm=true"], "/tmp/megagen-comm")
    result = train(cfg, distributed_runtime(cfg))
    return result.comm[0]


def comm_and_state(overrides: list[str]) -> dict:
    """Communication of step 1, the state bytes after it and the most gradient bytes held during it (at
    every micro-batch boundary: before each micro-batch and after the last backward), rank-local."""
    from torch.distributed.tensor import DTensor

    from megagen.plan_validate import watch_gradient_peak
    from megagen.runtime_setup import distributed_runtime

    cfg = config([*overrides, "train.steps=1", "metrics.comm=true"], "/tmp/megagen-plan")
    runtime = distributed_runtime(cfg)
    grad_peak = watch_gradient_peak(runtime)
    result = train(cfg, runtime)

    def nbytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in result.model.parameters())
    optim = sum(nbytes(v) for st in result.optimizer.state.values() for v in st.values() if v.dim() > 0)
    return {"comm": result.comm[0], "params": params, "optimizer": optim, "grad_peak": grad_peak["bytes"]}


def preflight_case(overrides_by_rank: dict) -> str:
    """Build the runtime with per-rank overrides; return the pre-flight error text ('' if accepted)."""
    from megagen.config import ConfigError
    from megagen.runtime_setup import distributed_runtime

    cfg = config(overrides_by_rank.get(dist.get_rank(), []), "/tmp/megagen-preflight")
    try:
        distributed_runtime(cfg)
    except ConfigError as exc:
        return str(exc)
    return ""
