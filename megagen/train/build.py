"""Build a rank's model: record on meta → check the plan → parallelise on meta → materialise → initialise.

No rank ever holds the whole model: the spec builds and initialises it on the meta device while
`parallel/init_record.py` records the operations, the runtime shards it there (TP → CP → recompute →
compile → FSDP), and only this rank's shards get memory, each filled from its parameter's full value
replayed on the CPU one parameter at a time. The values depend on `run.seed` and the parameter names only,
so every mesh (and one process) starts from the same weights bit for bit. The runtime may be any
`LocalRuntime` / `DistributedRuntime`, on any world size and backend (torch's fake process group too).
"""

from __future__ import annotations

import torch
from torch import nn

from megagen.config import Config, ConfigError
from megagen.parallel.init_record import InitRecord, recording
from megagen.parallel.materialize import materialize
from megagen.parallel.plan_check import check_plan
from megagen.specs.base import init_model


def record_model(cfg: Config, spec) -> tuple[nn.Module, InitRecord]:
    """The spec's full model on the meta device (built and initialised) and the record that replays it."""
    try:
        with recording(cfg.run.seed) as record:
            model = spec.build(cfg)
            init_model(spec, model, cfg)
    except (NotImplementedError, RuntimeError) as exc:
        if "meta" not in str(exc):
            raise
        raise ConfigError(
            "model.spec",
            f"spec {spec.name!r}: build/init_weights must run on the meta device (no .item(), no values "
            f"read into Python): {str(exc).splitlines()[0]}",
        ) from None
    record.name_tensors(model)
    return model, record


def build_model(cfg: Config, spec, runtime) -> nn.Module:
    """This rank's parallelised model with its shards initialised (see the module docstring)."""
    from megagen.kernels import configure_from_config

    configure_from_config(cfg)  # kernels.backend / kernels.attention / train.fp8 → the kernel registry
    torch.manual_seed(cfg.run.seed)
    model, record = record_model(cfg, spec)
    plan = spec.parallel_plan(cfg)
    check_plan(model, plan, cfg.parallel.tp, spec.name)
    model = runtime.parallelize(model, plan, cfg)
    materialize(model, record.full_tensor, runtime.device)
    return model
