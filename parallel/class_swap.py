"""Give one module instance extra behaviour by swapping its class for a subclass, as FSDP2 does.

`swap_in(block, Recomputed)` turns a `VideoBlock` into a `RecomputedVideoBlock`: a subclass whose forward
wraps the original one. No module is inserted and no attribute renamed, so parameter names and state-dict
keys stay the same (checkpoints and plans address parameters by name), while `print(model)` shows what
runs — the class name and the wrapper's `extra_repr`. A deep copy (an EMA model) keeps the behaviour.
"""

from __future__ import annotations

from torch import nn

_subclasses: dict[tuple[type, type], type] = {}  # one generated class per (wrapper, original class)


def swap_in(module: nn.Module, wrapper: type) -> None:
    """Make `module` an instance of `<wrapper.prefix><its class>`, a subclass of (wrapper, its class)."""
    if "forward" in module.__dict__:
        raise ValueError(
            f"{type(module).__name__} has its forward replaced on the instance, which would hide "
            f"{wrapper.__name__}: apply {wrapper.__name__} first"
        )
    base = type(module)
    cls = _subclasses.get((wrapper, base))
    if cls is None:
        cls = type(f"{wrapper.prefix}{base.__name__}", (wrapper, base), {"__module__": base.__module__})
        _subclasses[(wrapper, base)] = cls
    module.__class__ = cls


def swap_out(module: nn.Module, wrapper: type) -> None:
    """Undo `swap_in(module, wrapper)` (nothing if it was not applied); refuses if a later swap sits on top
    (e.g. FSDP's), since the original class can then no longer be restored alone."""
    cls = type(module)
    if not issubclass(cls, wrapper):
        return
    if cls.__bases__[0] is not wrapper:
        raise ValueError(
            f"cannot remove {wrapper.__name__} from {cls.__name__}: another wrapper was added after it"
        )
    module.__class__ = cls.__bases__[1]
