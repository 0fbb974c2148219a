"""Kernel backend registry: each op has a plain-torch reference and, optionally, faster implementations.

`kernels.backend` (config) picks one for every op: `torch` (the reference numerics; what CPU runs), `triton`
(our fused kernels; CUDA only), `te` (Transformer Engine where it has the op, else triton/torch) or `auto`
(the fastest available on the tensor's device). An implementation that is asked for but cannot run on the
tensor in hand (CPU tensor, extra not installed) falls back to the next in line; a missing optional extra is
reported in ONE log line per process (`report_extras`), never raised.

Resolution happens per call from the tensor's device, so one process can hold CPU and CUDA tensors, and a
model built before `configure` still obeys it. Triton and Transformer Engine are imported lazily, only the
first time a CUDA tensor asks for them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("megagen.kernels")

BACKENDS = ("auto", "torch", "triton", "te")
ATTENTION = ("auto", "flash", "cudnn", "efficient", "math", "te")
EXTRAS = {"triton": "triton", "te": "transformer_engine"}
"""Backend name → the importable module that provides it."""

# Which backends to try, in order, for each requested backend (torch always ends the list).
_ORDER = {
    "auto": ("te", "triton", "torch"),
    "te": ("te", "triton", "torch"),
    "triton": ("triton", "torch"),
    "torch": ("torch",),
}


@dataclass
class KernelSettings:
    """The process-wide kernel choice (set once from the config by `configure`)."""

    backend: str = "auto"
    attention: str = "auto"
    fp8: bool = False


_settings = KernelSettings()
_registry: dict[str, dict[str, Callable]] = {}
_installed: dict[str, bool] = {}
_reported = False
_fp8_warned = False
_fp8_compile_warned = False
_usage: dict[tuple[str, str], int] = {}
"""(op, backend) → calls, so tests can prove which implementation ran."""


def settings() -> KernelSettings:
    return _settings


def installed(backend: str) -> bool:
    """Whether the optional extra behind `backend` can be imported (checked without importing it)."""
    if backend == "torch":
        return True
    if backend not in _installed:
        module = EXTRAS[backend]
        try:
            _installed[backend] = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            _installed[backend] = False
    return _installed[backend]


def report_extras(force: bool = False) -> str:
    """Log, once per process, one line naming the optional kernel extras and whether each is usable."""
    global _reported
    cuda = torch.cuda.is_available()
    parts = []
    for backend, module in EXTRAS.items():
        if not installed(backend):
            parts.append(f"{module}: not installed")
        elif not cuda:
            parts.append(f"{module}: installed, unused (no CUDA)")
        else:
            parts.append(f"{module}: available")
    line = (
        f"kernels: backend={_settings.backend} attention={_settings.attention} fp8={_settings.fp8}; "
        + "; ".join(parts)
        + ("" if cuda else "; CPU: torch reference kernels")
    )
    if force or not _reported:
        _reported = True
        log.info(line)
    return line


def configure(
    backend: str = "auto", attention: str = "auto", fp8: bool = False, compiled: bool = False
) -> KernelSettings:
    """Set the process-wide choice; an unknown name raises ValueError (the config layer names the key).
    `compiled`: blocks run under torch.compile (`parallel.compile`), where FP8 GEMMs take the torch path."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels.backend: {backend!r}; allowed: {', '.join(BACKENDS)}")
    if attention not in ATTENTION:
        raise ValueError(f"kernels.attention: {attention!r}; allowed: {', '.join(ATTENTION)}")
    global _fp8_warned
    _settings.backend, _settings.attention, _settings.fp8 = backend, attention, bool(fp8)
    report_extras()
    if fp8 and not (installed("te") and torch.cuda.is_available()) and not _fp8_warned:
        _fp8_warned = True
        why = "transformer_engine is not installed" if not installed("te") else "no CUDA device"
        log.warning("train.fp8=true: %s; linear layers run in the torch path (no FP8)", why)
    global _fp8_compile_warned
    if fp8 and compiled and not _fp8_compile_warned:
        _fp8_compile_warned = True
        log.warning(
            "train.fp8=true with parallel.compile=true: compiled blocks run their GEMMs in the torch "
            "path (no FP8)"
        )
    return _settings


def register(op: str, backend: str, fn: Callable | None = None):
    """Register `fn` as `op`'s implementation for `backend` (usable as a decorator)."""

    def add(f: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = f
        return f

    return add(fn) if fn is not None else add


def lazy(module: str, attr: str) -> Callable:
    """An implementation living in `megagen.kernels.<module>`, imported on its first call (Triton, TE)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"megagen.kernels.{module}"), attr)(*args, **kwargs)

    call.__name__ = f"{module}.{attr}"
    return call


def implementations(op: str) -> dict[str, Callable]:
    return dict(_registry.get(op, {}))


def resolve(op: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """(backend name, function) that runs `op` for tensors on `device` under the configured backend."""
    impls = _registry[op]
    for name in _ORDER[backend or _settings.backend]:
        if name not in impls:
            continue
        if name != "torch" and (device.type != "cuda" or not installed(name)):
            continue
        return name, impls[name]
    return "torch", impls["torch"]


def dispatch(op: str, x: torch.Tensor, *args, **kwargs):
    """Run `op` with the implementation `resolve` picks for `x`'s device."""
    name, fn = resolve(op, x.device)
    if not torch.compiler.is_compiling():
        _usage[(op, name)] = _usage.get((op, name), 0) + 1
    return fn(x, *args, **kwargs)


def usage() -> dict[tuple[str, str], int]:
    """Calls per (op, backend) since the last `reset_usage()`."""
    return dict(_usage)


def reset_usage() -> None:
    _usage.clear()
