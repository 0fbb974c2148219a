"""Typed run configuration loaded from YAML with dotted overrides."""

from megagen.config.errors import ConfigError
from megagen.config.load import describe_keys, load_config, save_config, validate
from megagen.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "describe_keys",
    "load_config",
    "save_config",
    "validate",
]
