"""Which runtime a run gets: one process, or the distributed one when torchrun (or a test) started several."""

from __future__ import annotations

import os

from megagen.config import Config, ConfigError


def launched_distributed() -> bool:
    """True inside an initialised process group or a multi-process launch (WORLD_SIZE > 1)."""
    import torch.distributed as dist

    return dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_runtime(cfg: Config):
    """The single-process runtime, or the distributed one when launched by torchrun."""
    from megagen.parallel.runtime import LocalRuntime
    from megagen.runtime_setup import distributed_runtime

    if launched_distributed():
        return distributed_runtime(cfg)
    p = cfg.parallel
    if max(p.dp_replicate, p.cp, p.tp, p.dp_shard) > 1:
        raise ConfigError("parallel", "a mesh larger than 1 needs several processes: launch with torchrun")
    from megagen.parallel.mesh import device_and_backend

    return LocalRuntime(device_and_backend(p.backend)[0])  # the GPU when there is one, else the CPU
