"""`checkpoint.init_from`: start a new stage from another run's weights (new optimizer, step 0).

The source is a checkpoint (directory, or a run's checkpoint directory: its latest), a `.safetensors`
export, or an outside model's directory (a diffusers `save_pretrained` one, for specs with a diffusers
table: diffusers_dir.py, read with the run's config). Each parameter of the new model is matched by name:
  - same shape: loaded (resharded onto this mesh by DCP);
  - a position table that grew (`GrowthRules.grow_rows`, e.g. 256 px → 768 px or longer videos need more
    t/h/w positions): the saved rows are copied, the new rows keep their fresh initialisation, so every
    position that existed before embeds exactly as before;
  - an input projection that got wider (`GrowthRules.zero_new_inputs`, e.g. the upsampler's patchify that
    also takes the upsampled low-res latent on extra channels): the saved columns are copied and the new
    input columns are zero, so the new model starts as the old one whatever the extra inputs hold;
  - any other shape change: an error naming the tensor and both shapes.
Parameters missing from the source keep their initialisation and tensors the model does not have are
skipped; both lists are logged as warnings and returned in the `InitReport`.

A spec chooses its rules with a `growth_rules` attribute (a `GrowthRules`); the default grows the video
spec's factorized position tables.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from megagen.checkpoint.layout import CheckpointError, open_checkpoint

log = logging.getLogger("megagen")
KEY = "checkpoint.init_from"

POSITION_TABLES = ("pos_t.weight", "pos_h.weight", "pos_w.weight")


@dataclass(frozen=True)
class GrowthRules:
    """Which shape changes `init_from` accepts (fnmatch patterns over parameter names)."""

    grow_rows: tuple[str, ...] = POSITION_TABLES
    """dim 0 may grow (embedding tables): saved rows copied, new rows keep their initialisation."""
    zero_new_inputs: tuple[str, ...] = ()
    """dim 1 may grow (a Linear's input features): saved columns copied, new columns zero."""


SPEC_RULES = {
    # The upsampler (Movie Gen) concatenates the upsampled low-res latent on channels after the noisy
    # latent: patch_embed's input grows and the new columns start at zero.
    "upsampler": GrowthRules(zero_new_inputs=("patch_embed.weight",)),
}


def rules_for(spec) -> GrowthRules:
    return getattr(spec, "growth_rules", None) or SPEC_RULES.get(getattr(spec, "name", ""), GrowthRules())


@dataclass
class InitReport:
    """What `init_from` did, by parameter name."""

    source: str
    source_spec: str = ""
    source_preset: str = ""
    loaded: list[str] = field(default_factory=list)
    grown: dict[str, tuple[tuple[int, ...], tuple[int, ...], str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    """In the model, not in the source: left at their initialisation."""
    unexpected: list[str] = field(default_factory=list)
    """In the source, not in the model: not used."""

    def lines(self) -> list[str]:
        origin = f"{self.source_spec}/{self.source_preset}"
        out = [f"init_from {self.source} ({origin}): loaded {len(self.loaded)} tensors"]
        for name, (old, new, rule) in self.grown.items():
            out.append(f"  grown {name}: {old} -> {new} ({rule})")
        if self.missing:
            out.append(f"  missing from the source (kept at init): {', '.join(self.missing)}")
        if self.unexpected:
            out.append(f"  in the source but not in this model (skipped): {', '.join(self.unexpected)}")
        return out


def grow_tensor(old: torch.Tensor, new: torch.Tensor, rule: str) -> torch.Tensor:
    """`new`'s shape and values, with `old` copied into its leading block (`rows` | `zero_inputs`)."""
    out = new.detach().clone()
    if rule == "zero_inputs":
        out[:, old.shape[1] :] = 0
    index = tuple(slice(0, n) for n in old.shape)
    out[index] = old.to(out.dtype)
    return out


def _growth_rule(name: str, old: tuple, new: tuple, rules: GrowthRules) -> str | None:
    if len(old) != len(new):
        return None
    if any(fnmatch.fnmatchcase(name, p) for p in rules.grow_rows):
        if old[0] <= new[0] and old[1:] == new[1:]:
            return "rows"
    if any(fnmatch.fnmatchcase(name, p) for p in rules.zero_new_inputs):
        if len(new) == 2 and old[0] == new[0] and old[1] <= new[1]:
            return "zero_inputs"
    return None


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (global) tensor into `target`, which may be a DTensor: this rank takes its own part."""
    from megagen.parallel.materialize import local_part, local_slice

    with torch.no_grad():
        local_part(target).copy_(local_slice(full, target))


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


# ------------------------------------------------------------------------------------------------ sources
class _CheckpointSource:
    def __init__(self, ckpt: Path, meta: dict, key: str):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from megagen.checkpoint.safe_reader import read_index

        self.ckpt, self.meta, self.key = ckpt, meta, key
        index = read_index(ckpt, key)
        self.shapes = {
            fqn[len("model.") :]: tuple(md.size)
            for fqn, md in index.state_dict_metadata.items()
            if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata)
        }

    def load(self, targets: dict[str, torch.Tensor]) -> None:
        """Fill `targets` (name → tensor/DTensor of the saved shape); a collective under a process group."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        from megagen.checkpoint.safe_reader import SafeFileSystemReader

        if targets:
            dcp.load(
                {"model": targets},
                storage_reader=SafeFileSystemReader(self.ckpt, self.key),
                no_dist=not dist.is_initialized(),
            )


class _SafetensorsSource:
    def __init__(self, path: Path, key: str):
        from safetensors import safe_open

        self.path, self.key = path, key
        try:
            with safe_open(str(path), framework="pt") as f:
                self.meta = dict(f.metadata() or {})
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - any parse failure: a clear error naming the file
            raise CheckpointError(key, f"{path} is not a readable safetensors file: {exc}") from None

    def load(self, targets: dict[str, torch.Tensor]) -> None:
        """Read this rank's part of each tensor only (never a whole sharded tensor)."""
        from safetensors import safe_open

        from megagen.parallel.materialize import local_part, read_local

        with safe_open(str(self.path), framework="pt") as f, torch.no_grad():
            for name, target in targets.items():
                local_part(target).copy_(read_local(f.get_slice(name), self.shapes[name], target))


def open_source(
    path: str | Path, key: str = KEY, verify: str = "checksum", rank: int = 0, world: int = 1, cfg=None
):
    """The source, verified (`checkpoint.verify`; rank `rank` of `world` hashes its share of the files).

    A diffusers directory is checked against `cfg`'s spec and preset (its config, shard headers, shapes).
    """
    from megagen.checkpoint.diffusers_dir import is_diffusers_dir, open_diffusers

    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return _SafetensorsSource(p, key)
    if is_diffusers_dir(p):
        return open_diffusers(p, cfg, key)
    ckpt, meta = open_checkpoint(p, key, verify, rank, world)
    return _CheckpointSource(ckpt, meta, key)


# ------------------------------------------------------------------------------------------------ init
@dataclass
class InitPlan:
    source: object
    current: dict
    report: InitReport
    rules: dict[str, str]


def plan_init(
    model: nn.Module,
    path: str | Path,
    rules: GrowthRules,
    key: str = KEY,
    verify: str = "checksum",
    rank: int = 0,
    world: int = 1,
    cfg=None,
) -> InitPlan:
    """Match the source's tensors to `model`'s parameters (collective-free; raises on bad shapes).

    `cfg` (the run's config) is needed for an outside format's directory only."""
    source = open_source(path, key, verify, rank, world, cfg)
    meta = getattr(source, "meta", {}) or {}
    current = get_model_state_dict(model)
    report = InitReport(str(path), str(meta.get("spec", "?")), str(meta.get("preset", "?")))
    growth: dict[str, str] = {}
    bad = []
    for name, t in current.items():
        new = tuple(t.shape)
        old = source.shapes.get(name)
        if old is None:
            report.missing.append(name)
        elif old == new:
            report.loaded.append(name)
        else:
            rule = _growth_rule(name, old, new, rules)
            if rule is None:
                bad.append(f"{name}: saved {old}, model {new}")
            else:
                growth[name] = rule
                report.grown[name] = (old, new, rule)
    report.missing.sort()
    report.unexpected = sorted(set(source.shapes) - set(current)) + list(getattr(source, "unused", []))
    if bad:
        raise CheckpointError(key, f"{path}: shapes differ and no growth rule applies: {'; '.join(bad)}")
    return InitPlan(source, current, report, growth)


def apply_init(model: nn.Module, plan: InitPlan, logging_rank: bool = True) -> InitReport:
    """Load the planned tensors into `model` (a collective on every rank under a process group)."""
    current, report = plan.current, plan.report
    olds = {n: torch.empty(report.grown[n][0], dtype=current[n].dtype) for n in plan.rules}
    plan.source.load({**{n: current[n] for n in report.loaded}, **olds})
    for name in sorted(plan.rules):  # same order on every rank: full_tensor() is a collective
        copy_full_into(current[name], grow_tensor(olds[name], _full(current[name]), plan.rules[name]))
    set_model_state_dict(model, current, options=StateDictOptions(strict=False))
    if logging_rank:
        for i, line in enumerate(report.lines()):
            if i and (line.lstrip().startswith("missing") or line.lstrip().startswith("in the source")):
                log.warning(line)
            else:
                log.info(line)
    return report


def init_from_checkpoint(
    model: nn.Module,
    path: str | Path,
    rules: GrowthRules | None = None,
    logging_rank: bool = True,
    cfg=None,
) -> InitReport:
    """Weights-only initialisation of `model` from `path` in one call (single process, or every rank)."""
    plan = plan_init(model, path, rules or GrowthRules(), cfg=cfg)
    return apply_init(model, plan, logging_rank)
