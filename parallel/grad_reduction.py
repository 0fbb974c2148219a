"""The gradient rule: over which mesh axes each parameter's gradient is partial, and who sums it.

Derived once, from the plan and the module structure (module names, region boundaries, which linears are
column/row parallel), before anything is sharded. Every parameter falls in one class:

- `SHARDED`: the weight (or column bias) of a column/row-parallel linear. Its inputs were gathered or
  copied into the region, so the gradient of the local shard is complete over tp.
- `IN_REGION`: any other parameter of a module inside a tensor-parallel region (learned QK-norm over
  head_dim, a norm in front of the column-parallel linears). It is applied to head/hidden shards, or feeds
  them, so each tp rank holds only its shards' share: partial over tp, with or without sequence
  parallelism.
- `BETWEEN`: parameters of modules outside every region, and the row-parallel bias (added after the
  reduction). With SP they see sequence shards: partial over tp. Without SP every tp rank computed the
  same tokens and each region entry all-reduced its input gradient: complete.

On top of that every parameter is partial over the data axes (dp_replicate, dp_shard: other samples) and
over cp (other tokens). FSDP's reduce-scatter / all-reduce sums the axes of its mesh (dp_replicate,
dp_shard×cp — applied whenever any of them is > 1); the runtime all-reduces every other partial axis.

The contract behind `IN_REGION`: a region is one column → row section; everything inside it runs between
the region entry and the row-parallel reduction. A parameter whose place relative to that reduction the
structure cannot tell is refused (`unclassified`, reported by `check_plan`): one owned by the region module
itself or by a module inside the region that contains one of its row-parallel linears (their forward runs
on both sides of the reduction), and one shared by modules of different classes.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from megagen.parallel.plan import ParallelPlan

SHARDED, IN_REGION, BETWEEN = "sharded", "in_region", "between"
DATA_AXES = ("dp_replicate", "dp_shard", "cp")


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _inside(name: str, parent: str) -> bool:
    return name == parent or parent == "" or name.startswith(parent + ".")


def _owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """id(parameter) → every (module name, attribute) that registers it (several when weights are tied)."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, attr))
    return owners


def _classify_owner(mname: str, attr: str, plan: ParallelPlan, regions: list[str], rows: list[str]):
    """(class, None) or (None, why it cannot be classified) for parameter `attr` of module `mname`."""
    col, row = _matches(mname, plan.colwise), _matches(mname, plan.rowwise)
    if (col or row) and attr not in ("weight", "bias"):
        return None, f"the tensor-parallel linear {mname!r} keeps only its weight and bias"
    if col:
        return SHARDED, None
    if row:
        return (SHARDED, None) if attr == "weight" else (BETWEEN, None)  # the bias is added after the sum
    owning = [r for r in regions if _inside(mname, r)]
    if not owning:
        return BETWEEN, None
    region = max(owning, key=len)
    if mname == region:
        return None, (
            f"it belongs to region module {region!r} itself, whose forward runs on both sides of the "
            "row-parallel reduction"
        )
    exits = [r for r in rows if _inside(r, mname) and _inside(r, region)]
    if exits:
        return None, (
            f"its module {mname!r} inside region {region!r} contains the row-parallel {exits[0]!r}, so it "
            "may be applied before or after the reduction"
        )
    return IN_REGION, None


def classify(model: nn.Module, plan: ParallelPlan) -> tuple[dict[str, str], dict[str, str]]:
    """({parameter name: class}, {parameter name: why it cannot be classified}) for the unsharded model."""
    names = [n for n, _ in model.named_modules()]
    regions = [n for n in names if _matches(n, plan.regions)]
    rows = [n for n in names if _matches(n, plan.rowwise)]
    owners = _owners(model)
    classes: dict[str, str] = {}
    problems: dict[str, str] = {}
    for pname, p in model.named_parameters():
        found = {}
        for mname, attr in owners[id(p)]:
            cls, why = _classify_owner(mname, attr, plan, regions, rows)
            if why is not None:
                problems[pname] = why
                break
            found.setdefault(cls, f"{mname}.{attr}" if mname else attr)
        else:
            if len(found) > 1:
                where = ", ".join(f"{n!r} ({c})" for c, n in found.items())
                problems[pname] = f"it is shared by modules the rule classifies differently: {where}"
            else:
                classes[pname] = next(iter(found))
    return classes, problems


def partial_over_tp(cls: str, sequence_parallel: bool) -> bool:
    """Whether a parameter of this class has a tp-partial gradient."""
    return cls == IN_REGION or (cls == BETWEEN and sequence_parallel)


def engine_reductions(
    model: nn.Module,
    plan: ParallelPlan,
    sizes: dict[str, int],
    sequence_parallel: bool,
    fsdp_axes: tuple[str, ...],
) -> dict[str, list[str]]:
    """{mesh axis: names of the parameters whose gradients the runtime must sum over it}.

    `sizes` maps axes to their sizes; `fsdp_axes` are the axes FSDP's mesh sums. With tp > 1, raises
    ValueError naming a parameter the rule cannot classify (check_plan refuses those first, with the key).
    """
    out: dict[str, list[str]] = {}
    if sizes.get("tp", 1) > 1:
        classes, problems = classify(model, plan)
        if problems:
            name, why = next(iter(problems.items()))
            raise ValueError(f"cannot tell over which mesh axes the gradient of {name!r} is partial: {why}")
        tp = [n for n, c in classes.items() if partial_over_tp(c, sequence_parallel)]
        if tp:
            out["tp"] = tp
    for axis in DATA_AXES:
        if sizes.get(axis, 1) > 1 and axis not in fsdp_axes:
            out[axis] = [n for n, _ in model.named_parameters()]
    return out
