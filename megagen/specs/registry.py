"""The spec registry: built-in specs, entry-point plug-ins (`megagen.specs`) and dotted paths.

A dotted path (`package.module:ATTR`) imports user code, which runs it: megagen does so only because the
config names it (`model.spec`), never for a name found in a data or checkpoint file.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from megagen.config import ConfigError
from megagen.specs.base import ModelSpec

_REGISTRY: dict[str, ModelSpec] = {}
_BUILTINS_LOADED = False


def register_spec(spec: ModelSpec) -> ModelSpec:
    """Register an instance under `spec.name`; re-registering a name replaces it."""
    if not spec.name:
        raise ValueError("a spec needs a non-empty name")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    importlib.import_module("megagen.specs.video")
    for mod in ("megagen.specs.audio", "megagen.specs.upsampler", "megagen.specs.wan", "megagen.specs.tae"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
    for ep in entry_points(group="megagen.specs"):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in must not take every megagen command down with it
            dist = getattr(ep, "dist", None)
            who = f"{dist.name} {dist.version}" if dist is not None else ep.value
            raise ConfigError(
                "model.spec", f"plug-in spec {ep.name!r} from {who} failed to import: {exc}"
            ) from exc
        register_spec(obj() if isinstance(obj, type) else obj)


def _from_dotted(path: str) -> ModelSpec:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("model.spec", f"cannot import {module_name!r}: {exc}") from exc
    obj = getattr(module, attr or "SPEC", None)
    if obj is None:
        raise ConfigError("model.spec", f"{module_name!r} has no attribute {attr or 'SPEC'!r}")
    spec = obj() if isinstance(obj, type) else obj
    if not isinstance(spec, ModelSpec):
        raise ConfigError("model.spec", f"{path!r} is not a ModelSpec")
    return spec


def get_spec(name: str) -> ModelSpec:
    """A registered spec by name, or a spec object named by `module:ATTR`."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _from_dotted(name)
    raise ConfigError("model.spec", f"unknown spec {name!r}; registered: {', '.join(sorted(_REGISTRY))}")


def list_specs() -> dict[str, ModelSpec]:
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))
