"""Communication accounting: bytes and calls per collective kind and per mesh axis.

`CommCounter` is a TorchDispatchMode: while it is active it sees every c10d collective at the dispatcher
level — the `c10d::*` ops behind `torch.distributed.*` (ours in `parallel/collectives.py`, FSDP2's, DTensor
redistributions through functional collectives) and the `_c10d_functional::*` ops — including those issued
by the autograd engine during `backward()`. It counts bytes at issue time (async work included) and passes
every op through unchanged. `seconds` is the time the calling thread spent issuing collectives plus waiting
for functional ones (`wait_tensor`): the communication the step did not overlap with compute (waits on
`Work` handles, as FSDP2 uses them, are not dispatcher ops and are not timed).

Exposed time per axis and kind (`exposed()`, `exposed_by_axis()`) exists so overlap can be measured: a
functional collective's issue call plus the `wait_tensor` on its result is attributed to the axis and kind
it was issued under, and the span from issue to the end of its wait is its "issued" time (an upper bound
on its link time). A kind that ran any c10d op (FSDP2's, `dist.all_reduce`) reports None for both: their
waits happen on `Work` handles this mode cannot see, so their exposed time is unknown.

    axes = mesh_axis_groups(mesh, {"dp_shard_cp": mesh["dp_shard", "cp"]._flatten("dp_shard_cp")})
    with CommCounter(axes) as comm:
        loss.backward()
    comm.summary()   # {"dp_shard_cp": {"reduce_scatter": {"bytes": 4096, "calls": 2}}, "tp": {...}}

Bytes are the per-rank payload of the actual tensors passed (so FSDP2's padding is included):
all-gather -> output bytes, reduce-scatter -> input bytes, all-reduce / broadcast / reduce -> tensor bytes,
all-to-all -> input bytes, gather -> input bytes, scatter -> output bytes, send / recv -> tensor bytes.
Barriers are not counted. A group is named by the axis it was registered under (first registration wins
when two axes share one ProcessGroup), else "world" for the default group, else "other:<group name>".
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CommCounter", "CommRecord", "CommTiming", "comm_as", "comm_axis", "mesh_axis_groups"]

_SCOPE = threading.local()


@contextmanager
def comm_axis(axis: str | None):
    """Attribute collectives issued inside to `axis`, whatever their process group.

    Two axes can share one ProcessGroup (e.g. cp and dp_shard_cp when dp_shard = 1), so the engine names
    the axis of each collective it issues; collectives outside any scope (FSDP2's) are named by group.
    """
    if axis is None:
        yield
        return
    stack = getattr(_SCOPE, "stack", None)
    if stack is None:
        stack = _SCOPE.stack = []
    stack.append(axis)
    try:
        yield
    finally:
        stack.pop()


@contextmanager
def comm_as(kind: str):
    """Count the collectives issued inside as `kind`: the engine sends a gloo all-gather as an all-to-all
    (`collectives.issue_all_gather`), and the accounting reports what it does, not how it travels."""
    previous = getattr(_SCOPE, "kind", None)
    _SCOPE.kind = kind
    try:
        yield
    finally:
        _SCOPE.kind = previous


_OUT = "<result>"  # the payload is the op's return value

# (op namespace, op name) -> (kind, name of the schema argument whose tensors make the payload)
_C10D = {
    "allgather_": ("all_gather", "output_tensors"),
    "_allgather_base_": ("all_gather", "output_tensor"),
    "allgather_coalesced_": ("all_gather", "output_lists"),
    "allgather_into_tensor_coalesced_": ("all_gather", "outputs"),
    "reduce_scatter_": ("reduce_scatter", "input_tensors"),
    "_reduce_scatter_base_": ("reduce_scatter", "input_tensor"),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "inputs"),
    "allreduce_": ("all_reduce", "tensors"),
    "allreduce_coalesced_": ("all_reduce", "tensors"),
    "alltoall_": ("all_to_all", "input_tensors"),
    "alltoall_base_": ("all_to_all", "input"),
    "broadcast_": ("broadcast", "tensors"),
    "reduce_": ("reduce", "tensors"),
    "gather_": ("gather", "input_tensors"),
    "scatter_": ("scatter", "output_tensors"),
    "send": ("send", "tensors"),
    "recv_": ("recv", "tensors"),
    "recv_any_source_": ("recv", "tensors"),
}
_FUNCTIONAL = {
    "all_gather_into_tensor": ("all_gather", _OUT),
    "all_gather_into_tensor_out": ("all_gather", "out"),
    "all_gather_into_tensor_coalesced": ("all_gather", _OUT),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "reduce_scatter_tensor_out": ("reduce_scatter", "input"),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", "inputs"),
    "all_reduce": ("all_reduce", "input"),
    "all_reduce_": ("all_reduce", "input"),
    "all_reduce_coalesced": ("all_reduce", "inputs"),
    "all_reduce_coalesced_": ("all_reduce", "inputs"),
    "all_to_all_single": ("all_to_all", "input"),
    "broadcast": ("broadcast", "input"),
    "broadcast_": ("broadcast", "input"),
    "isend": ("send", "tensor"),
    "irecv": ("recv", "tensor"),
}
# The autograd wrappers (`_c10d_functional_autograd`) dispatch to `_c10d_functional`; whichever of the two
# reaches this mode is counted, never both (ops run inside the handler are not seen again).
_OPS: dict[tuple[str, str], tuple[str, str]] = {
    **{("c10d", k): v for k, v in _C10D.items()},
    **{
        (ns, k): v
        for ns in ("_c10d_functional", "_c10d_functional_autograd", "c10d_functional")
        for k, v in _FUNCTIONAL.items()
    },
}
_NAMESPACES = frozenset(ns for ns, _ in _OPS)


@dataclass(frozen=True)
class CommRecord:
    kind: str  # all_gather, reduce_scatter, all_reduce, all_to_all, broadcast, reduce, gather, scatter, ...
    axis: str  # mesh axis name, "world", or "other:<group name>"
    bytes: int  # per-rank payload
    op: str  # the dispatcher op, e.g. "c10d._allgather_base_"


@dataclass
class CommTiming:
    """Seconds of one (axis, kind): `exposed` = the caller blocked (issue + wait); `issued` = from issue to
    the end of the wait. `timed` turns False once an op of the kind ran whose wait is invisible (c10d)."""

    exposed: float = 0.0
    issued: float = 0.0
    timed: bool = True

    def as_dict(self) -> dict[str, float | None]:
        if not self.timed:
            return {"exposed_s": None, "issued_s": None}
        return {"exposed_s": self.exposed, "issued_s": self.issued}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _group_name(value) -> str | None:
    """The name of a process group given as a ProcessGroup, its boxed ScriptObject, or a name string."""
    if isinstance(value, str):
        return value
    if isinstance(value, torch.ScriptObject):
        value = dist.ProcessGroup.unbox(value)
    if isinstance(value, dist.ProcessGroup):
        return value.group_name
    return None


def _as_group(value) -> dist.ProcessGroup:
    if isinstance(value, dist.ProcessGroup):
        return value
    get_group = getattr(value, "get_group", None)  # a 1-D DeviceMesh (e.g. a flattened one)
    if get_group is not None:
        return get_group()
    raise TypeError(f"expected a ProcessGroup or a 1-D DeviceMesh, got {type(value).__name__}")


def mesh_axis_groups(mesh, extra: Mapping[str, object] | None = None) -> dict[str, dist.ProcessGroup]:
    """{axis name: ProcessGroup} for every named axis of `mesh`, then `extra` ({name: 1-D mesh or group},
    e.g. flattened meshes such as `dp` or `dp_shard_cp`)."""
    names = mesh.mesh_dim_names
    if not names:
        raise ValueError("mesh_axis_groups needs a DeviceMesh with mesh_dim_names")
    groups = {name: mesh.get_group(name) for name in names}
    for name, value in (extra or {}).items():
        groups[name] = _as_group(value)
    return groups


class CommCounter(TorchDispatchMode):
    """Counts every collective issued while active; see the module docstring for what is counted."""

    def __init__(self, mesh_axes: Mapping[str, object] | None = None, *, keep_records: bool = True):
        super().__init__()
        self._axis_of: dict[str, str] = {}
        for axis, group in (mesh_axes or {}).items():
            self._axis_of.setdefault(_as_group(group).group_name, axis)  # first registration wins
        self.keep_records = keep_records
        self.records: list[CommRecord] = []
        self.seconds = 0.0
        """Wall time inside collective calls: blocking collectives (gloo) in full; async ones (NCCL) only
        their launch — an estimate of exposed communication, not a measurement of link time."""
        self._totals: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        self._timing: dict[str, dict[str, CommTiming]] = defaultdict(lambda: defaultdict(CommTiming))
        self._in_flight: dict[int, tuple] = {}
        """id(result of a functional collective) -> (the result, its timing, issue time), until waited."""

    # ------------------------------------------------------------------ results
    def reset(self) -> None:
        self.seconds = 0.0
        self.records.clear()
        self._totals.clear()
        self._timing.clear()
        self._in_flight.clear()

    def exposed(self) -> dict[str, dict[str, dict[str, float | None]]]:
        """{axis: {kind: {"exposed_s": float | None, "issued_s": float | None}}} (None: not measurable)."""
        return {
            axis: {kind: timing.as_dict() for kind, timing in kinds.items()}
            for axis, kinds in self._timing.items()
        }

    def exposed_by_axis(self) -> dict[str, float | None]:
        """{axis: seconds the caller waited on its collectives}, None where some kind was not measurable."""
        out: dict[str, float | None] = {}
        for axis, kinds in self._timing.items():
            timings = list(kinds.values())
            out[axis] = sum(t.exposed for t in timings) if all(t.timed for t in timings) else None
        return out

    def summary(self) -> dict[str, dict[str, dict[str, int]]]:
        """{axis: {kind: {"bytes": int, "calls": int}}}."""
        return {
            axis: {kind: {"bytes": b, "calls": c} for kind, (b, c) in kinds.items()}
            for axis, kinds in self._totals.items()
        }

    def bytes_by_axis(self) -> dict[str, int]:
        return {axis: sum(b for b, _ in kinds.values()) for axis, kinds in self._totals.items()}

    def total_bytes(self) -> int:
        return sum(self.bytes_by_axis().values())

    # ------------------------------------------------------------------ interception
    def _axis(self, group_name: str | None) -> str:
        stack = getattr(_SCOPE, "stack", None)
        if stack:
            return stack[-1]
        if group_name is None:
            return "other:?"
        axis = self._axis_of.get(group_name)
        if axis is not None:
            return axis
        if dist.is_initialized() and group_name == dist.distributed_c10d._get_default_group().group_name:
            return "world"
        return f"other:{group_name}"

    def _record(self, func, spec, args, kwargs, out, start: float, end: float) -> None:
        kind, payload = spec
        kind = getattr(_SCOPE, "kind", None) or kind
        bound = dict(zip((a.name for a in func._schema.arguments), args))
        bound.update(kwargs)
        group = bound.get("process_group", bound.get("group_name"))
        nbytes = _nbytes(out if payload == _OUT else bound.get(payload))
        axis = self._axis(_group_name(group))
        op = f"{func.namespace}.{func._opname}"
        if self.keep_records:
            self.records.append(CommRecord(kind, axis, nbytes, op))
        total = self._totals[axis][kind]
        total[0] += nbytes
        total[1] += 1
        self._time_issue(func.namespace == "c10d", self._timing[axis][kind], out, start, end)

    def _time_issue(self, c10d: bool, timing: CommTiming, out, start: float, end: float) -> None:
        timing.exposed += end - start
        if c10d:
            timing.timed = False  # waited on a Work handle, out of sight
        else:
            results = [out] if isinstance(out, torch.Tensor) else list(out or ())
            for t in results:  # a coalesced op returns one tensor per input, each waited on its own
                if isinstance(t, torch.Tensor):
                    self._in_flight[id(t)] = (t, timing, start)

    def _time_wait(self, waited, start: float, end: float) -> None:
        self.seconds += end - start
        entry = self._in_flight.pop(id(waited), None)
        if entry is None or entry[0] is not waited:
            return  # issued before this counter was entered (or reset): bytes were not counted either
        _, timing, issued_at = entry
        timing.exposed += end - start
        timing.issued += end - issued_at

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        # Let tensor subclasses (DTensor) desugar first: their collectives come back here on plain tensors.
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        if func.namespace == "_c10d_functional" and func._opname == "wait_tensor":
            start = time.perf_counter()  # blocked on an async functional collective: communication time
            out = func(*args, **kwargs)
            self._time_wait(args[0] if args else kwargs.get("tensor"), start, time.perf_counter())
            return out
        spec = _OPS.get((func.namespace, func._opname)) if func.namespace in _NAMESPACES else None
        if spec is None:
            return func(*args, **kwargs)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        end = time.perf_counter()
        self.seconds += end - start
        self._record(func, spec, args, kwargs, out, start, end)
        return out
