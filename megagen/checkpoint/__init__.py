"""Checkpoints: sharded (DCP), async, atomic, reshardable across meshes; export, averaging, init_from.

See docs/checkpoints.md for the layout on disk and the rules.
"""

import warnings

# megagen runs DCP without a process group on purpose (one process, offline tools); DCP warns every time.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized")

# ruff: noqa: E402

from megagen.checkpoint.average import average_checkpoints
from megagen.checkpoint.export import export_safetensors, load_checkpoint_weights, load_weights
from megagen.checkpoint.hooks import CheckpointHook, attach_checkpointing, checkpoint_dir, preflight
from megagen.checkpoint.init_from import GrowthRules, InitReport, init_from_checkpoint
from megagen.checkpoint.layout import CheckpointError, open_checkpoint, read_latest
from megagen.checkpoint.manager import CheckpointManager

__all__ = [
    "CheckpointError",
    "CheckpointHook",
    "CheckpointManager",
    "GrowthRules",
    "InitReport",
    "attach_checkpointing",
    "average_checkpoints",
    "checkpoint_dir",
    "export_safetensors",
    "init_from_checkpoint",
    "load_checkpoint_weights",
    "load_weights",
    "open_checkpoint",
    "preflight",
    "read_latest",
]
