"""The one loader interface, its registry, and the `data.loader` choice.

Every loader the trainer can get is a `Loader`: iterating it yields `(request, batch)` in request order.
The shard loaders live side by side (megagen/data/loader_torch.py, megagen/data/loader_dali.py; the seeded
synthetic one, used without `data.path`, in megagen/data/loader_synthetic.py) and `LOADERS` maps each
`data.loader` kind to its builder:

- `torch`: `TorchLoader`, always available.
- `dali`: `DaliLoader`; a clear `ConfigError` naming `data.loader` when `nvidia.dali` is not installed.
- `auto`: the first available kind of `AUTO_ORDER` (DALI when `nvidia.dali` imports), with one log line.

All of them yield the same samples, keys and dtypes. To add a loader: write its class (a `Loader`), a
builder below with the `make_loader` arguments, and one `LOADERS` entry; the config schema's
`data.loader` choices must list it (tests/unit/test_loaders.py checks that they agree).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from megagen.config import ConfigError
from megagen.data.contract import MicroBatchRequest

log = logging.getLogger("megagen")


class Loader(Protocol):
    """What the trainer uses of a loader: one pass over its requests, in order. The iterator may have a
    `close()` (generators do); the trainer calls it to stop threads and workers early."""

    def __iter__(self) -> Iterator[tuple[MicroBatchRequest, dict[str, torch.Tensor]]]: ...


def dali_available() -> bool:
    """True when `nvidia.dali` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # `nvidia` namespace missing or half-installed
        return False


@dataclass(frozen=True)
class LoaderOptions:
    """The `data.*` knobs every builder receives (each uses the ones that mean something to it)."""

    num_workers: int = 2
    prefetch: int = 2
    threads: int = 2
    device: torch.device = torch.device("cpu")
    dali_source: str = "map"


def _build_torch(reader, requests, opts: LoaderOptions, **extra) -> Loader:
    from megagen.data.loader_torch import TorchLoader

    return TorchLoader(
        reader, requests, num_workers=opts.num_workers, prefetch=opts.prefetch, device=opts.device, **extra
    )


def _build_dali(reader, requests, opts: LoaderOptions, **extra) -> Loader:
    from megagen.data.loader_dali import DaliLoader

    device_id = None
    if opts.device.type == "cuda":
        device_id = opts.device.index if opts.device.index is not None else torch.cuda.current_device()
    return DaliLoader(
        reader,
        requests,
        num_threads=opts.threads,
        prefetch_queue_depth=opts.prefetch,
        py_num_workers=opts.num_workers,
        device_id=device_id,
        source=opts.dali_source,
        **extra,
    )


@dataclass(frozen=True)
class LoaderKind:
    build: Callable[..., Loader]
    available: Callable[[], bool]
    """Checked when the kind is chosen (late-bound, so tests can pretend a package is missing)."""
    missing: str
    """What to do when it is not available (the ConfigError's advice)."""
    auto_note: str
    """The log line when `auto` picks it."""


LOADERS: dict[str, LoaderKind] = {
    "dali": LoaderKind(
        _build_dali,
        lambda: dali_available(),
        "dali needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or the [dali] extra), "
        "or set data.loader=torch or auto",
        "data.loader=auto: using the DALI loader (nvidia.dali is installed)",
    ),
    "torch": LoaderKind(
        _build_torch,
        lambda: True,
        "",
        "data.loader=auto: nvidia.dali is not installed, using the torch loader",
    ),
}
AUTO_ORDER = ("dali", "torch")
"""`auto` takes the first available of these."""
KINDS = ("auto", *LOADERS)
"""Every `data.loader` value (the config schema's choices must equal these)."""


def resolve_kind(kind: str) -> str:
    """The loader kind `kind` stands for: `auto` resolved (one log line), an unavailable or unknown kind
    refused with a `ConfigError` naming `data.loader`."""
    if kind not in KINDS:
        raise ConfigError("data.loader", f"unknown loader {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = next(k for k in AUTO_ORDER if LOADERS[k].available())
        log.info(LOADERS[kind].auto_note)
    elif not LOADERS[kind].available():
        raise ConfigError("data.loader", LOADERS[kind].missing)
    return kind


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
) -> Loader:
    """A loader over `requests` (indexable for DALI, e.g. a `RequestPlan`) reading from `reader`.

    `num_workers`: torch DataLoader workers / DALI python workers with `dali_source="workers"` (0 = read
    in the main process). `prefetch`: micro-batches read ahead (per worker for torch; DALI's queue depth).
    `threads`: DALI CPU threads. `device`: where batches land. `dali_source`: see `DaliLoader`. `extra`
    goes to the chosen loader's constructor.
    """
    kind = resolve_kind(kind)
    device = torch.device(device) if device is not None else torch.device("cpu")
    opts = LoaderOptions(num_workers, prefetch, threads, device, dali_source)
    return LOADERS[kind].build(reader, requests, opts, **extra)
