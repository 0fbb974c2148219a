"""The distributed runtime's arguments, drawn from a whole run config.

The engine (parallel/) reads only `cfg.parallel`; what else it needs from a run — the launch facts every
rank must agree on, whether the step watchdog wants torch's flight recorder — is handed to it here as
explicit arguments, so parallel/ never imports the config loader.
"""

from __future__ import annotations

from megagen.config.load import config_fingerprint
from megagen.config.schema import Config
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
