"""What the engine and the kernels need from a whole run config, handed over as explicit arguments.

The engine (parallel/) reads only `cfg.parallel`; what else it needs from a run — the launch facts every
rank must agree on, whether the step watchdog wants torch's flight recorder — is drawn here, and so is the
kernel registry's choice (`kernels.*`, `train.fp8`, `parallel.compile`), so neither parallel/ nor kernels/
reads a run config or imports the config loader.
"""

from __future__ import annotations

from megagen.config.load import config_fingerprint
from megagen.config.schema import Config
from megagen.kernels import configure
from megagen.kernels.backend import KernelSettings
from megagen.parallel.preflight import LaunchCheck
from megagen.parallel.runtime import DistributedRuntime


def launch_check(cfg: Config) -> LaunchCheck:
    """The resolved config's fingerprint, the paths the run reads and the directories it writes."""
    read = [cfg.data.path, cfg.eval.path]
    if cfg.checkpoint.resume not in ("auto", "never"):
        read.append(cfg.checkpoint.resume)
    if cfg.checkpoint.init_from:
        read.append(cfg.checkpoint.init_from)
    write = [cfg.run.dir] + ([cfg.checkpoint.dir] if cfg.checkpoint.dir else [])
    return LaunchCheck(config_fingerprint(cfg), tuple(read), tuple(write))


def distributed_runtime(cfg: Config) -> DistributedRuntime:
    """The runtime on the device mesh of `cfg.parallel`, after the launch check of the whole config."""
    return DistributedRuntime(
        cfg.parallel, launch=launch_check(cfg), flight_recorder=cfg.train.step_timeout_s != 0
    )


def configure_kernels(cfg: Config) -> KernelSettings:
    """`kernels.backend`, `kernels.attention`, `train.fp8` (and `parallel.compile`) → the kernel registry."""
    return configure(cfg.kernels.backend, cfg.kernels.attention, cfg.train.fp8, compiled=cfg.parallel.compile)
