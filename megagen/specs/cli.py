"""`megagen specs [list] [--json]`: the registered model specs, their presets and parameter counts.

Every preset is built on the meta device (`torch.device("meta")`): shapes without storage, so even a
30B preset is counted exactly in a fraction of a second and no memory. Specs come from megagen itself and
from installed plug-ins (entry point group `megagen.specs`); a dotted-path spec (`model.spec=pkg.mod:NAME`)
is not listed, because megagen imports such code only when a config names it.
"""

from __future__ import annotations

import argparse
import json

import torch

from megagen.specs.base import ModelSpec


def count_parameters(spec: ModelSpec, preset: str) -> int:
    """Parameters of `spec` at `preset`, from a meta-device build (tied parameters counted once)."""
    from megagen.config import Config

    cfg = Config()
    cfg.model.spec, cfg.model.preset = spec.name, preset
    with torch.device("meta"):
        model = spec.build(cfg)
    return sum(p.numel() for p in model.parameters())


def human(n: int) -> str:
    """1234567 → '1.23 M'."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def describe_specs(names: list[str] | None = None) -> list[dict]:
    """Registered specs (all, or `names`): {name, description, module, plugin, presets: [{name, parameters
    | error}]}."""
    from megagen.config import ConfigError
    from megagen.specs.registry import list_specs

    specs = list_specs()
    unknown = sorted(set(names or ()) - set(specs))
    if unknown:
        raise ConfigError("specs", f"unknown spec(s) {unknown}; registered: {', '.join(specs)}")
    rows = []
    for name, spec in specs.items():
        if names and name not in names:
            continue
        module = type(spec).__module__
        doc = (type(spec).__doc__ or "").strip()
        presets = []
        for preset in spec.presets:
            try:
                presets.append({"name": preset, "parameters": count_parameters(spec, preset)})
            except Exception as exc:  # noqa: BLE001 - one broken preset must not hide the others
                presets.append({"name": preset, "error": f"{type(exc).__name__}: {exc}"})
        rows.append(
            {
                "name": name,
                "description": doc.splitlines()[0] if doc else "",
                "module": module,
                "plugin": not module.startswith("megagen."),
                "presets": presets,
            }
        )
    return rows


def format_specs(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        origin = f"plug-in: {row['module']}" if row["plugin"] else "built in"
        lines.append(f"{row['name']}: {row['description']}  [{origin}]")
        width = max((len(p["name"]) for p in row["presets"]), default=0)
        for p in row["presets"]:
            if "error" in p:
                lines.append(f"  {p['name']:<{width}}  build failed: {p['error']}")
            else:
                n = p["parameters"]
                lines.append(f"  {p['name']:<{width}}  {human(n):>9} parameters ({n:,})")
    return "\n".join(lines)


def add_specs_commands(subparsers) -> argparse.ArgumentParser:
    """Register `specs` (`megagen specs` and `megagen specs list` do the same) on the top-level subparsers."""
    p = subparsers.add_parser(
        "specs",
        help="list registered model specs, their presets and parameter counts",
        description=(
            "List the registered model specs (built in, and plug-ins installed under the entry point group "
            "`megagen.specs`) with every preset's parameter count, counted on a meta-device build. "
            "See docs/specs.md to write one."
        ),
    )
    p.add_argument("action", nargs="?", default="list", choices=("list",), help="what to do (default: list)")
    p.add_argument("names", metavar="NAME", nargs="*", help="only these specs (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON array instead of text")
    return p


def run_specs_command(args) -> int:
    rows = describe_specs(getattr(args, "names", None) or None)
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=1))
    else:
        print(format_specs(rows))
    return 0
