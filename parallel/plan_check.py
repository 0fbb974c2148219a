"""Start-up check of a spec's `ParallelPlan` against the module it is meant for.

The engine applies a plan mechanically (`tensor_parallel.py`, `parallelize.py`): a pattern that matches
nothing, a row-parallel linear without a column-parallel partner, or a region argument the module does not
take would train something else, or fail deep inside the first step with a shape error on one rank.
`check_plan` states each rule once and rejects a plan that breaks any of them before a weight is sharded
or a collective issued. It reads module names, types, `forward` signatures and `Linear` feature sizes
only, so it works on a meta-device model and costs nothing.

Rules (ConfigError key `model.spec`; each message names the offending pattern):
  blocks          names an nn.ModuleList (or nn.Sequential) of at least one block
  colwise/rowwise every pattern matches >= 1 module, each an nn.Linear; no linear is both
  regions         every pattern matches >= 1 module; regions do not nest; each declares >= 1 `seq_args`,
                  and every `seq_args` / `replicated_args` name is a parameter of the module's forward
  containment     every colwise/rowwise linear lies inside a region (its input is gathered / copied
                  into the region there)
  partners        a region holding a rowwise linear holds a colwise one and vice versa, and every rowwise
                  linear's in_features equals the out_features of a colwise linear of the same region
  sharded_norms   every pattern matches >= 1 module with an `eps`, each inside a region (it normalises a
                  colwise output there); tp divides its weight's width
  self_attention  every pattern matches >= 1 module whose forward takes (q, k, v, kv_valid); with
                  tensor-parallel linears each core lies inside a region (it sees head shards)
  sequence        every `sequence_inputs` name (and `token_mask`, if set) is a parameter of the root module's
                  forward (passed by keyword); sequence inputs and self-attention cores are declared together
  gradients       (only with `tp > 1`) the gradient rule (`grad_reduction.py`) classifies every parameter:
                  none belongs to a region module itself or to a module inside a region that holds one of
                  its rowwise linears, and no parameter is shared by modules of different classes
Mesh sizes (key `parallel.tp`, only with `tp > 1`): tp divides every colwise out_features, every rowwise
in_features and every `head_counts` entry.
"""

from __future__ import annotations

import fnmatch
import inspect
import re

from torch import nn

from megagen.errors import ConfigError
from megagen.parallel.grad_reduction import classify
from megagen.parallel.plan import ParallelPlan


class PlanError(ConfigError):
    """A parallel plan inconsistent with its model (or with the tp size)."""


def _params(fn) -> tuple[list[str], bool, bool]:
    """(named parameters, has *args, has **kwargs) of a callable's signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return [], True, True
    kinds = [p.kind for p in sig.parameters.values()]
    names = [
        n
        for n, p in sig.parameters.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    return names, inspect.Parameter.VAR_POSITIONAL in kinds, inspect.Parameter.VAR_KEYWORD in kinds


def _generic(name: str) -> str:
    """`blocks.3.attn.o` → `blocks.*.attn.o`: one message per layer kind, not one per layer."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def _generic_names(text: str) -> str:
    """Every quoted module name in `text` made generic (see `_generic`)."""
    return re.sub(r"'([^']*)'", lambda m: repr(_generic(m.group(1))), text)


def _inside(name: str, parent: str) -> bool:
    return parent == "" or name.startswith(parent + ".")


class _Checker:
    def __init__(self, model: nn.Module, plan: ParallelPlan, tp: int):
        self.model, self.plan, self.tp = model, plan, tp
        self.modules = dict(model.named_modules())
        self.problems: list[str] = []
        self.size_problems: list[str] = []

    def fail(self, message: str, sizes: bool = False) -> None:
        target = self.size_problems if sizes else self.problems
        if message not in target:
            target.append(message)

    def match(self, pattern: str) -> list[str]:
        return [n for n in self.modules if fnmatch.fnmatchcase(n, pattern)]

    def run(self) -> None:
        self.check_blocks()
        linears = self.check_linears()
        regions = self.check_regions()
        self.check_containment_and_partners(linears, regions)
        self.check_sharded_norms(regions)
        self.check_attention(linears, regions)
        self.check_sequence()
        self.check_gradients()
        self.check_sizes(linears)

    # ------------------------------------------------------------------ rules
    def check_blocks(self) -> None:
        path = self.plan.blocks
        blocks = self.modules.get(path)
        if blocks is None:
            self.fail(f"blocks {path!r} is not a submodule")
        elif not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            self.fail(f"blocks {path!r} is a {type(blocks).__name__}, expected a non-empty nn.ModuleList")

    def check_linears(self) -> dict[str, tuple[str, str]]:
        """{module name: (kind, pattern)} of the plan's colwise and rowwise linears."""
        found: dict[str, tuple[str, str]] = {}
        for kind, patterns in (("colwise", self.plan.colwise), ("rowwise", self.plan.rowwise)):
            for pattern in patterns:
                hits = self.match(pattern)
                if not hits:
                    self.fail(f"{kind} pattern {pattern!r} matches no module")
                for name in hits:
                    module, g = self.modules[name], _generic(name)
                    if not isinstance(module, nn.Linear):
                        what = type(module).__name__
                        self.fail(f"{kind} pattern {pattern!r} matches {g!r}, a {what}, not an nn.Linear")
                        continue
                    if name in found and found[name][0] != kind:
                        self.fail(f"{g!r} is both colwise ({found[name][1]!r}) and rowwise ({pattern!r})")
                        continue
                    found.setdefault(name, (kind, pattern))
        return found

    def check_regions(self) -> dict[str, str]:
        """{region module name: its pattern}."""
        regions: dict[str, str] = {}
        for pattern, region in self.plan.regions.items():
            hits = self.match(pattern)
            if not hits:
                self.fail(f"region {pattern!r} matches no module")
            if not region.seq_args:
                self.fail(
                    f"region {pattern!r} declares no seq_args: the sequence-sharded activation entering "
                    "it would never be gathered over tp"
                )
            both = sorted(set(region.seq_args) & set(region.replicated_args))
            if both:
                self.fail(f"region {pattern!r}: {both} are both seq_args and replicated_args")
            for name in hits:
                params, _, var_kw = _params(self.modules[name].forward)
                owner = f"{type(self.modules[name]).__name__}.forward of {_generic(name)!r}"
                for arg in (*region.seq_args, *region.replicated_args):
                    if arg not in params and not var_kw:
                        have = ", ".join(params) or "none"
                        self.fail(f"region {pattern!r}: {owner} has no argument {arg!r} (it has: {have})")
                regions.setdefault(name, pattern)
        for inner, p_inner in regions.items():
            for outer, p_outer in regions.items():
                if inner != outer and _inside(inner, outer):
                    self.fail(
                        f"region {p_inner!r} is nested inside region {p_outer!r} "
                        f"({_generic(inner)!r} in {_generic(outer)!r}): its input would be gathered twice"
                    )
        return regions

    def _region_of(self, name: str, regions: dict[str, str]) -> str | None:
        owners = [r for r in regions if r != name and _inside(name, r)]
        return max(owners, key=len) if owners else None

    def check_containment_and_partners(self, linears: dict[str, tuple[str, str]], regions: dict[str, str]):
        members: dict[str, dict[str, list[str]]] = {r: {"colwise": [], "rowwise": []} for r in regions}
        for name, (kind, pattern) in linears.items():
            region = self._region_of(name, regions)
            if region is None:
                self.fail(
                    f"{kind} {_generic(name)!r} (pattern {pattern!r}) lies inside no region: its input "
                    "would enter the tensor-parallel computation without being gathered"
                )
                continue
            members[region][kind].append(name)
        for region, kinds in members.items():
            pattern = regions[region]
            col, row = kinds["colwise"], kinds["rowwise"]
            if not col and not row:
                self.fail(f"region {pattern!r} ({_generic(region)!r}) contains no colwise or rowwise linear")
            for name in row:
                who = f"rowwise {_generic(name)!r} (pattern {linears[name][1]!r})"
                if not col:
                    self.fail(
                        f"{who} has no colwise partner in region {pattern!r}: its input would not be "
                        "sharded over tp"
                    )
                    continue
                outs = sorted({self.modules[c].out_features for c in col})
                if self.modules[name].in_features not in outs:
                    self.fail(
                        f"{who} takes in_features {self.modules[name].in_features}, but the colwise "
                        f"linears of region {pattern!r} produce out_features {outs}"
                    )
            if col and not row:
                who = f"colwise {_generic(col[0])!r} (pattern {linears[col[0]][1]!r})"
                self.fail(
                    f"{who} has no rowwise partner in region {pattern!r}: its output would leave the "
                    "region sharded over tp"
                )

    def check_sharded_norms(self, regions: dict[str, str]) -> None:
        for pattern in self.plan.sharded_norms:
            hits = self.match(pattern)
            if not hits:
                self.fail(f"sharded_norms pattern {pattern!r} matches no module")
            for name in hits:
                who = f"sharded norm {_generic(name)!r} (pattern {pattern!r})"
                module = self.modules[name]
                if not hasattr(module, "eps"):
                    self.fail(f"{who} is a {type(module).__name__}, expected an RMSNorm with an `eps`")
                if self._region_of(name, regions) is None:
                    self.fail(f"{who} lies inside no region, so its input is not a colwise shard")
                weight = getattr(module, "weight", None)
                if self.tp > 1 and weight is not None and weight.shape[0] % self.tp:
                    self.fail(f"{self.tp} does not divide the width ({weight.shape[0]}) of {who}", sizes=True)

    def check_attention(self, linears: dict[str, tuple[str, str]], regions: dict[str, str]) -> None:
        for pattern in self.plan.self_attention:
            hits = self.match(pattern)
            if not hits:
                self.fail(f"self_attention pattern {pattern!r} matches no module")
            for name in hits:
                who = f"self_attention {_generic(name)!r} (pattern {pattern!r})"
                params, var_pos, _ = _params(self.modules[name].forward)
                if len(params) < 4 and not var_pos:
                    self.fail(
                        f"{who}: forward takes ({', '.join(params)}), expected (q, k, v, kv_valid) on "
                        "(batch, sequence, heads, head_dim) tensors"
                    )
                if linears and self._region_of(name, regions) is None:
                    self.fail(
                        f"{who} lies inside no region, so it would not see the head shards of the "
                        "colwise projections"
                    )

    def check_sequence(self) -> None:
        params, _, var_kw = _params(self.model.forward)
        root = f"{type(self.model).__name__}.forward"
        for name, dim in self.plan.sequence_inputs.items():
            if name not in params and not var_kw:
                have = ", ".join(params) or "none"
                self.fail(f"sequence input {name!r} is not an argument of {root} (it has: {have})")
            if not isinstance(dim, int) or dim < 0:
                self.fail(f"sequence input {name!r}: dim {dim!r} is not a non-negative int")
        mask = self.plan.token_mask
        if mask and mask not in params and not var_kw:
            have = ", ".join(params) or "none"
            self.fail(f"token_mask {mask!r} is not an argument of {root} (it has: {have})")
        out_dim = self.plan.sequence_output_dim
        if not isinstance(out_dim, int) or out_dim < 0:
            self.fail(f"sequence_output_dim {out_dim!r} is not a non-negative int")
        if self.plan.self_attention and not self.plan.sequence_inputs:
            self.fail("self_attention is declared but sequence_inputs is empty: nothing would be sharded")
        if self.plan.sequence_inputs and not self.plan.self_attention:
            self.fail(
                "sequence_inputs are declared but no self_attention core: sharded tokens could not attend "
                "to each other"
            )

    def check_gradients(self) -> None:
        if self.tp <= 1:
            return  # nothing is partial over tp, so every parameter's reduction is known
        _, unclassified = classify(self.model, self.plan)
        for name, why in unclassified.items():
            self.fail(
                f"parameter {_generic(name)!r}: cannot tell whether its gradient is partial over tp, because "
                + _generic_names(why)
            )

    def check_sizes(self, linears: dict[str, tuple[str, str]]) -> None:
        tp = self.tp
        if tp <= 1:
            return
        for attn, heads in self.plan.head_counts.items():
            if heads % tp:
                self.fail(f"{tp} does not divide the {heads} heads of {attn}", sizes=True)
        for name, (kind, _) in linears.items():
            m = self.modules[name]
            what = "out_features" if kind == "colwise" else "in_features"
            n = getattr(m, what)
            if n % tp:
                self.fail(f"{tp} does not divide the {what} ({n}) of {kind} {_generic(name)!r}", sizes=True)


def plan_problems(model: nn.Module, plan: ParallelPlan, tp: int = 1) -> tuple[list[str], list[str]]:
    """(plan problems, tp-size problems) of `plan` for `model`; both empty when the plan is consistent."""
    checker = _Checker(model, plan, tp)
    checker.run()
    return checker.problems, checker.size_problems


def check_plan(model: nn.Module, plan: ParallelPlan, tp: int = 1, spec_name: str = "") -> None:
    """Raise `PlanError` (key `model.spec`, or `parallel.tp` for sizes) listing every problem on one line."""
    problems, sizes = plan_problems(model, plan, tp)
    who = f"spec {spec_name!r}" if spec_name else "the spec"
    if problems:
        raise PlanError("model.spec", f"{who} declares an inconsistent parallel plan: " + "; ".join(problems))
    if sizes:
        more = f"; and {len(sizes) - 3} more" if len(sizes) > 3 else ""
        raise PlanError("parallel.tp", "; ".join(sizes[:3]) + more)
