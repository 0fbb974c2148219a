"""Keeps the repository's `kernels/` and `parallel/` directories from hiding PyPI packages of those names.

They install as `megagen.kernels` and `megagen.parallel` (setup.py's package_dir), but a Python started inside
a clone (pytest, `python -m`, `torchrun -m`) has the clone on sys.path, where the same directories read as
top-level `kernels` and `parallel`. Hugging Face's `kernels` is a requirement of transformers (>= 5.25), which
imports it; without this, that import gets our fused ops and fails. megagen never imports either name at top
level, so such an import always means the other package: our `__init__` hands it over.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def step_aside(name: str, init_file: str) -> None:
    """Load the installed package `name` from the rest of sys.path in place of ours, or refuse the import.

    Called by our package's `__init__` when it runs under the top-level name. Replacing `sys.modules[name]`
    before `__init__` returns is what the import system hands back to the importer.
    """
    own_root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
    rest = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != own_root]
    spec = importlib.machinery.PathFinder.find_spec(name, rest)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the directory {name}/ in {own_root} is megagen.{name}, "
            f"not a top-level package)",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
