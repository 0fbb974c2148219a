"""Build a rank's model: record on meta → check the plan → parallelise on meta → materialise → initialise.

No rank ever holds the whole model: the spec builds and initialises it on the meta device while
`parallel/init_record.py` records the operations, the runtime shards it there (TP → CP → recompute →
compile → FSDP), and only this rank's shards get memory, each filled from its parameter's full value
replayed on the CPU one parameter at a time. The values depend on `run.seed` and the parameter names only,
so every mesh (and one process) starts from the same weights bit for bit. The runtime may be any
`LocalRuntime` / `DistributedRuntime`, on any world size and backend (torch's fake process group too).
"""

from __future__ import annotations

import time

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


def drawn_weights(cfg: Config):
    """`materialize`'s `draw` for a rehearsal: each large local shard drawn from N(0, model.init_std), seeded
    by (run.seed, name) — no full tensor is computed, so a 30B model initialises in seconds on a CPU."""
    from megagen.parallel.init_record import seed_for

    def draw(name: str, local: torch.Tensor) -> None:
        gen = torch.Generator(device=local.device).manual_seed(seed_for(cfg.run.seed, name, 0))
        local.normal_(0.0, cfg.model.init_std, generator=gen)

    return draw


def build_model(cfg: Config, spec, runtime, weights: str = "replay", phases: dict | None = None) -> nn.Module:
    """This rank's parallelised model with its shards initialised (see the module docstring).

    `weights="draw"` (rehearsals): large tensors are drawn locally instead of replayed (`drawn_weights`).
    `phases` gets the seconds spent building on meta (`build`) and materialising (`init`)."""
    from megagen.runtime_setup import configure_kernels

    start = time.perf_counter()
    configure_kernels(cfg)  # kernels.backend / kernels.attention / train.fp8 → the kernel registry
    torch.manual_seed(cfg.run.seed)
    model, record = record_model(cfg, spec)
    plan = spec.parallel_plan(cfg)
    check_plan(model, plan, cfg.parallel.tp, spec.name)
    model = runtime.parallelize(model, plan, cfg.parallel, cfg.train.recompute, cfg.train.recompute_layers)
    built = time.perf_counter()
    draw = drawn_weights(cfg) if weights == "draw" else None
    materialize(model, record.full_tensor, runtime.device, draw=draw)
    if phases is not None:
        phases.update(build=built - start, init=time.perf_counter() - built)
    return model
