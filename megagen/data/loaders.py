"""`data.loader`: pick the DALI or the torch shard loader.

- `torch`: `TorchLoader`, always available.
- `dali`: `DaliLoader`; a clear `ConfigError` naming `data.loader` when `nvidia.dali` is not installed.
- `auto`: DALI when `nvidia.dali` imports, else one log line and the torch loader.

Both yield `(request, batch)` in request order with the same samples, keys and dtypes.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from megagen.config import ConfigError

log = logging.getLogger("megagen")

KINDS = ("auto", "dali", "torch")


def dali_available() -> bool:
    """True when `nvidia.dali` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # `nvidia` namespace missing or half-installed
        return False


def make_loader(
    kind: str,
    reader,
    requests,
    num_workers: int = 2,
    prefetch: int = 2,
    threads: int = 2,
    device: torch.device | str | None = None,
    dali_source: str = "map",
    **extra,
):
    """A loader over `requests` (indexable for DALI, e.g. a `RequestPlan`) reading from `reader`.

    `num_workers`: torch DataLoader workers / DALI python workers with `dali_source="workers"` (0 = read
    in the main process). `prefetch`: micro-batches read ahead (per worker for torch; DALI's queue depth).
    `threads`: DALI CPU threads. `device`: where batches land. `dali_source`: see `DaliLoader`. `extra`
    goes to the chosen loader's constructor.
    """
    if kind not in KINDS:
        raise ConfigError("data.loader", f"unknown loader {kind!r}; choose one of {', '.join(KINDS)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if kind == "auto":
        if dali_available():
            log.info("data.loader=auto: using the DALI loader (nvidia.dali is installed)")
            kind = "dali"
        else:
            log.info("data.loader=auto: nvidia.dali is not installed, using the torch loader")
            kind = "torch"
    if kind == "dali":
        if not dali_available():
            raise ConfigError(
                "data.loader",
                "dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or the [dali] extra), "
                "or set data.loader=torch or auto",
            )
        from megagen.data.loader_dali import DaliLoader

        device_id = None
        if device.type == "cuda":
            device_id = device.index if device.index is not None else torch.cuda.current_device()
        return DaliLoader(
            reader,
            requests,
            num_threads=threads,
            prefetch_queue_depth=prefetch,
            py_num_workers=num_workers,
            device_id=device_id,
            source=dali_source,
            **extra,
        )
    from megagen.data.loader_torch import TorchLoader

    return TorchLoader(reader, requests, num_workers=num_workers, prefetch=prefetch, device=device, **extra)
