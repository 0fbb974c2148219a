"""The gradient invariant, stated and implemented in one place. For every parameter:

1. partial over: the data axes (dp_replicate, dp_shard: other samples) and cp (other tokens), always;
   tp when its class says so (`partial_over_tp`: IN_REGION always, BETWEEN under sequence parallelism).
2. summed by: FSDP's reduce-scatter / all-reduce over the axes of its mesh, told to SUM (`fsdp_sums`);
   the runtime all-reduces every other partial axis once after backward (`engine_reductions` → `sum_partial`),
   or, with `parallel.overlap`, in buckets launched during the step's last backward as their gradients
   become final (`BucketedPartialSum`) — the same all-reduce of the same values, only earlier.
3. the loss is normalised by the global count of valid tokens (`normalised_loss`), times the FSDP
   group size where an old torch can only average (`fsdp_average_undo`): the sum then equals one process's.
4. the grad norm counts each distinct element once: a rank divides its squared norm by the number of
   ranks holding the same piece (`replication`) before the world sum (`grad_norm_squared`).

The classes are derived once, from the plan and the module structure (module names, region boundaries,
which linears are column/row parallel), before anything is sharded. Every parameter falls in one class:

- `SHARDED`: the weight (or column bias) of a column/row-parallel linear, or the weight of a plan's
  `sharded_norms` norm (split like the colwise output it scales, `sharded_norm.py`). Its inputs were
  gathered or copied into the region, so the gradient of the local shard is complete over tp.
- `IN_REGION`: any other parameter of a module inside a tensor-parallel region (learned QK-norm over
  head_dim, a norm in front of the column-parallel linears). It is applied to head/hidden shards, or feeds
  them, so each tp rank holds only its shards' share: partial over tp, with or without sequence
  parallelism.
- `BETWEEN`: parameters of modules outside every region, and the row-parallel bias (added after the
  reduction). With SP they see sequence shards: partial over tp. Without SP every tp rank computed the
  same tokens and each region entry all-reduced its input gradient: complete.

On top of that every parameter is partial over the data axes and cp (rule 1). FSDP's mesh spans
dp_replicate × dp_shard×cp and is applied whenever any of them is > 1, so the runtime sums only tp then.

The contract behind `IN_REGION`: a region is one column → row section; everything inside it runs between
the region entry and the row-parallel reduction. A parameter whose place relative to that reduction the
structure cannot tell is refused (`unclassified`, reported by `check_plan`): one owned by the region module
itself or by a module inside the region that contains one of its row-parallel linears (their forward runs
on both sides of the reduction), and one shared by modules of different classes.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from megagen.parallel.collectives import Pending, all_reduce_sum, all_reduce_sum_async
from megagen.parallel.comm import comm_axis
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
    if col or _matches(mname, plan.sharded_norms):  # a sharded norm's weight is split like a colwise output
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


def fsdp_sums(fsdp_module) -> bool:
    """Ask an FSDP2 module to SUM over its mesh (rule 2); False if this torch can only average (then the
    loss carries `fsdp_average_undo`)."""
    if not hasattr(fsdp_module, "set_force_sum_reduction_for_comms"):
        return False
    fsdp_module.set_gradient_divide_factor(1.0)
    fsdp_module.set_force_sum_reduction_for_comms(True)
    return True


def fsdp_average_undo(fsdp_ranks: int, fsdp: bool, summed: bool) -> float:
    """The factor on the loss that turns FSDP's average over `fsdp_ranks` back into a sum (rule 3)."""
    return 1.0 if summed or not fsdp else float(fsdp_ranks)


def normalised_loss(local_sum: torch.Tensor, global_tokens: int, average_undo: float = 1.0) -> torch.Tensor:
    """This rank's share of the step's loss: its sum over valid tokens / the global count of valid tokens
    (rule 3), so that the gradients summed over every partial axis equal one process's."""
    return local_sum * average_undo / global_tokens


def loss_copies(tp: int, sequence_parallel: bool) -> int:
    """How many ranks computed each token's loss: the tp ranks without SP all saw the same tokens."""
    return 1 if sequence_parallel else tp


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def sum_partial(model: nn.Module, reductions: dict[str, list[str]], group_of) -> None:
    """All-reduce, once per axis and in one flat buffer, the gradients `engine_reductions` left partial
    (rule 2); `group_of(axis)` gives the axis's process group."""
    params = dict(model.named_parameters())
    for axis, names in reductions.items():
        grads = [_local(params[n].grad) for n in names if params[n].grad is not None]
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        with comm_axis(axis):  # functional, so the accounting times its wait (exposed) as well
            flat = all_reduce_sum(flat, group_of(axis))
        _copy_back(grads, flat)


BUCKET_BYTES = 25 * 2**20
"""Bucket size of the overlapped path: big enough to amortise a collective's latency, small enough that
the first buckets launch early in backward."""


def _copy_back(grads: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def arrival_order(model: nn.Module, names: list[str]) -> list[str]:
    """`names` (registration order) in roughly the order the last backward finishes their gradients:
    reversed, since backward runs the layers last to first; under FSDP the parameters of no FSDP block,
    whose reduce-scatter is the root unit's post-backward at the very end, go last."""
    blocks = [n for n, m in model.named_modules() if n and isinstance(m, FSDPModule)]

    def in_root_unit(name: str) -> bool:
        return bool(blocks) and not any(_inside(name, b) for b in blocks)

    return sorted(reversed(names), key=in_root_unit)  # stable: the reversed order within each group


class BucketedPartialSum:
    """`sum_partial` overlapped with backward: the partial gradients of each axis are grouped in buckets of
    about `bucket_bytes`, in the order backward finishes them (`arrival_order`); a
    bucket's all-reduce is issued from the post-accumulate-grad hook of its last parameter to get its
    gradient, and waited only in `finish` (before clipping). Only an armed backward (the step's last
    micro-batch: `arm(True)`) launches, so accumulated gradients are summed once, as `sum_partial` does;
    a bucket whose gradients never all arrived is launched in `finish`. Flattening does not change a
    value: the all-reduce sums element by element.

    Under FSDP the parameters are the sharded ones, whose gradients autograd never accumulates: FSDP2
    runs their post-accumulate-grad hooks itself, in each unit's post-backward right after the unit's
    reduce-scatter (and HSDP all-reduce) wrote the sharded gradient, so a bucket of shards launches as
    soon as its units are reduced. On CUDA that hook runs on FSDP's reduce stream; the sums are consumed
    on the compute stream, so `finish` records that stream on them before they can be freed."""

    def __init__(
        self, model: nn.Module, reductions: dict[str, list[str]], group_of, bucket_bytes: int | None = None
    ):
        params = dict(model.named_parameters())
        bucket_bytes = BUCKET_BYTES if bucket_bytes is None else bucket_bytes
        self._group_of = group_of
        self.launched_in_backward = 0
        """Buckets whose all-reduce a hook issued (the ones that overlapped), over the run."""
        self.buckets: list[tuple[str, list[nn.Parameter]]] = []
        for axis, names in reductions.items():
            bucket, size = [], 0
            for name in arrival_order(model, names):
                p = params[name]
                bucket.append(p)
                size += _local(p).numel() * p.element_size()
                if size >= bucket_bytes:
                    self.buckets.append((axis, bucket))
                    bucket, size = [], 0
            if bucket:
                self.buckets.append((axis, bucket))
        self._bucket_of = {id(p): i for i, (_, ps) in enumerate(self.buckets) for p in ps}
        self.armed = False
        self._reset()
        for _, ps in self.buckets:
            for p in ps:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def _reset(self) -> None:
        self._arrived: list[set[int]] = [set() for _ in self.buckets]
        self._issued: list[tuple[list[torch.Tensor], Pending] | None] = [None] * len(self.buckets)

    def arm(self, syncing: bool) -> None:
        """Whether the coming backward is the step's last (its gradients are final once accumulated)."""
        self.armed = syncing

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        i = self._bucket_of[id(p)]
        self._arrived[i].add(id(p))
        if len(self._arrived[i]) == len(self.buckets[i][1]) and self._issued[i] is None:
            self._launch(i)
            self.launched_in_backward += 1

    def _launch(self, i: int) -> None:
        axis, ps = self.buckets[i]
        grads = [_local(p.grad) for p in ps if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        with comm_axis(axis):
            self._issued[i] = (grads, all_reduce_sum_async(flat, self._group_of(axis)))

    def finish(self) -> None:
        """Wait for every bucket (launching the ones backward did not) and write the sums into the grads."""
        for i, issued in enumerate(self._issued):
            if issued is None:
                self._launch(i)
        for issued in self._issued:
            if issued is not None:
                grads, pending = issued
                summed = pending.wait()  # the wait is timed under the axis it was issued on
                _copy_back(grads, summed)
                if summed.is_cuda:  # made on FSDP's reduce stream, read here on the compute stream
                    summed.record_stream(torch.cuda.current_stream(summed.device))
        self._reset()
        self.armed = False


def replication(p: torch.Tensor, world_size: int) -> int:
    """How many ranks hold an identical copy of this rank's piece of `p` (rule 4)."""
    if not isinstance(p, DTensor):
        return world_size
    mesh, distinct = p.device_mesh, 1
    for axis, placement in enumerate(p.placements):
        if isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard":
            distinct *= mesh.size(axis)
    return world_size // distinct


def grad_norm_squared(params: list[nn.Parameter], world_size: int, device: torch.device) -> torch.Tensor:
    """This rank's share of the global squared grad norm, float64: summed over all ranks it counts every
    distinct gradient element once (rule 4)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None:
            sq = _local(p.grad).double().pow(2).sum()
            total += sq / replication(p.grad, world_size)
    return total
