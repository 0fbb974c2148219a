"""Record a model's construction and initialisation on the meta device; replay it one tensor at a time.

Why: a rank must not hold the whole model to initialise its shards, and the initial weights must be the
same on every mesh. Building and initialising on the meta device costs no memory, so every rank can run
the spec's own `build` and `init_weights` on the full model while this module records every operation that
creates or writes a tensor. `InitRecord.full_tensor(name)` later re-runs, on the CPU, only the operations
that a parameter's (or buffer's) final value depends on and returns that one full tensor; the engine keeps
this rank's slice of it and drops the rest, so a rank's peak is its shards plus the largest parameter.

Values do not depend on the mesh or on the order of replay: every random operation draws from its own
generator, seeded from (seed, the name of the parameter it initialises, how many random operations that
parameter had before). Tensors are followed by storage, so views (`weight[:, n:].zero_()`), tied
parameters, buffers computed in `__init__` and one parameter initialised from another all replay as they
ran. Operations that overwrite a whole tensor without reading it (`normal_`, `zero_`, `copy_` ...) make
earlier writes to it dead, so `nn.Linear`'s default init followed by the spec's `init_weights` costs one
draw, not two. Nothing here knows any model.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# In-place ops whose result does not depend on the tensor's previous values.
_OVERWRITE = frozenset(
    {"normal_", "uniform_", "zero_", "fill_", "copy_", "random_", "bernoulli_", "exponential_"}
    | {"cauchy_", "log_normal_", "geometric_"}
)


@dataclass(frozen=True)
class TensorRef:
    """A tensor argument as a view of a recorded storage (what `set_` needs to rebuild it)."""

    key: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype


@dataclass
class _Op:
    func: object
    args: tuple
    kwargs: dict
    reads: frozenset[int]
    """Storages whose values the op reads (a partially or read-modify-written one counts)."""
    writes: tuple[int, ...]
    """Storages the op mutates, in argument order (an order that is the same in every process)."""
    overwrites: frozenset[int]
    """Storages the op writes entirely without reading them: earlier writes to them are dead."""
    makes: tuple[tuple[int, TensorRef], ...]
    """(index among the flattened outputs, ref) of every storage the op creates."""
    random: bool
    seed: int = 0


@dataclass
class _Storage:
    nbytes: int
    keep: object
    """The recorded storage itself: keeps its identity (the key) from being reused while recording."""


def seed_for(seed: int, name: str, ordinal: int) -> int:
    """A 63-bit generator seed from the run seed, a tensor name and the random op's ordinal (stable
    across processes and Python versions, unlike `hash`)."""
    digest = hashlib.sha256(f"{seed}/{name}/{ordinal}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _ref(t: torch.Tensor) -> TensorRef:
    return TensorRef(_key(t), tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)


def _covers_storage(t: torch.Tensor) -> bool:
    return (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.numel() * t.element_size() == t.untyped_storage().nbytes()
    )


def _written_args(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an op mutates, from its schema's `Tensor(a!)` annotations."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        out.extend(v for v in values if isinstance(v, torch.Tensor))
    return out


class _Recorder(TorchDispatchMode):
    """Runs every op (on meta it computes only shapes) and logs those that create or write storage."""

    def __init__(self, record: InitRecord):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.record._log(func, args, kwargs, out)
        return out


@dataclass
class InitRecord:
    """Every op that built and initialised a model, and the storage behind each named tensor."""

    seed: int
    ops: list[_Op] = field(default_factory=list)
    storages: dict[int, _Storage] = field(default_factory=dict)
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    """Fully qualified parameter / buffer name → its view of a recorded storage."""
    _touching: dict[int, list[int]] = field(default_factory=dict)

    # ------------------------------------------------------------------ recording
    def _log(self, func, args: tuple, kwargs: dict, out) -> None:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = tree_flatten(out)[0]
        made = []
        for i, t in enumerate(outputs):
            if isinstance(t, torch.Tensor) and _key(t) not in self.storages:
                if any(_key(t) == _key(x) for x in inputs):
                    continue  # a view of an input that was never recorded (a constant)
                self.storages[_key(t)] = _Storage(t.untyped_storage().nbytes(), t.untyped_storage())
                made.append((i, _ref(t)))
        written = _written_args(func, args, kwargs)
        writes = tuple(dict.fromkeys(_key(t) for t in written if _key(t) in self.storages))
        if not made and not writes:
            return  # a view, or an op on constants only: nothing to replay
        overwrites = set()
        if func.overloadpacket.__name__ in _OVERWRITE and written and _covers_storage(written[0]):
            target = written[0]
            if not any(_key(t) == _key(target) for t in inputs if t is not target):
                overwrites = {_key(target)}
        reads = {_key(t) for t in inputs if _key(t) in self.storages} - overwrites

        def describe(a):
            if isinstance(a, torch.Tensor):
                return _ref(a) if _key(a) in self.storages else a  # a tensor made before recording
            return a

        op = _Op(
            func,
            tree_map(describe, args),
            tree_map(describe, kwargs),
            frozenset(reads),
            writes,
            frozenset(overwrites),
            tuple(made),
            torch.Tag.nondeterministic_seeded in func.tags,
        )
        index = len(self.ops)
        self.ops.append(op)
        for k in {*writes, *(ref.key for _, ref in made)}:
            self._touching.setdefault(k, []).append(index)

    def name_tensors(self, model: nn.Module) -> None:
        """Note every parameter and buffer of the recorded `model` by name, then seed the random ops."""
        params = model.named_parameters(remove_duplicate=False)
        for name, t in [*params, *model.named_buffers(remove_duplicate=False)]:
            if _key(t) not in self.storages:
                raise ValueError(f"{name} was not created while the model was recorded")
            self.tensors[name] = _ref(t)
        self._assign_seeds()

    def _assign_seeds(self) -> None:
        """Each random op's seed: (seed, name of the tensor it ends up in, ordinal among that tensor's)."""
        owner: dict[int, str] = {}
        for name, ref in self.tensors.items():
            owner.setdefault(ref.key, name)
        op_owner: list[str | None] = [None] * len(self.ops)
        for i in range(len(self.ops) - 1, -1, -1):  # a temporary belongs to the tensor it flows into
            op = self.ops[i]
            outs = [*op.writes, *(ref.key for _, ref in op.makes)]  # ordered: storage keys (addresses)
            mine = next((owner[k] for k in outs if k in owner), None)  # differ between processes
            op_owner[i] = mine
            if mine is not None:
                for k in op.reads:
                    owner.setdefault(k, mine)
        count: dict[str, int] = {}
        for op, name in zip(self.ops, op_owner):
            if op.random and name is not None:
                op.seed = seed_for(self.seed, name, count.get(name, 0))
                count[name] = count.get(name, 0) + 1

    # ------------------------------------------------------------------ replay
    def _needed_ops(self, key: int) -> list[int]:
        """Indices of the ops the final contents of storage `key` depend on, in recorded order."""
        need, chosen, seen = {key}, [], set()
        heap = [-i for i in self._touching.get(key, [])]
        heapq.heapify(heap)
        while heap:
            i = -heapq.heappop(heap)
            if i in seen:
                continue
            seen.add(i)
            op = self.ops[i]
            made = {ref.key for _, ref in op.makes}
            if not (made | set(op.writes)) & need:
                continue
            chosen.append(i)
            need -= made | op.overwrites
            for k in op.reads - need:
                need.add(k)
                for j in self._touching.get(k, []):
                    if j < i:
                        heapq.heappush(heap, -j)
        return sorted(chosen)

    def full_tensor(self, name: str) -> torch.Tensor:
        """The full value of parameter/buffer `name` on the CPU, replayed from the record."""
        if name not in self.tensors:
            raise KeyError(f"{name} is not a parameter or buffer of the recorded model")
        ref = self.tensors[name]
        env: dict[int, torch.UntypedStorage] = {}
        for i in self._needed_ops(ref.key):
            self._run(self.ops[i], env)
        return self._view(env, ref)

    def _view(self, env: dict, ref: TensorRef) -> torch.Tensor:
        if ref.key not in env:  # every write to it was dead (or it was never written): fresh memory
            env[ref.key] = torch.empty(self.storages[ref.key].nbytes, dtype=torch.uint8).untyped_storage()
        return torch.empty(0, dtype=ref.dtype).set_(env[ref.key], ref.offset, ref.size, ref.stride)

    def _run(self, op: _Op, env: dict) -> None:
        def resolve(a):
            if isinstance(a, TensorRef):
                return self._view(env, a)
            if isinstance(a, torch.device):
                return torch.device("cpu")
            if isinstance(a, torch.Generator):
                return None  # the op's own seeded generator is installed below
            if isinstance(a, torch.Tensor) and a.is_meta:
                raise ValueError("a meta tensor made before recording began has no values to replay")
            return a

        args, kwargs = tree_map(resolve, op.args), tree_map(resolve, op.kwargs)
        if "device" in kwargs:
            kwargs["device"] = torch.device("cpu")
        rng = _seeded_cpu_rng(op.seed) if op.random else contextlib.nullcontext()
        with rng:
            out = op.func(*args, **kwargs)
        outputs = tree_flatten(out)[0]
        for i, ref in op.makes:
            t = outputs[i]
            same = (
                tuple(t.stride()) == ref.stride
                and t.storage_offset() == ref.offset
                and t.untyped_storage().nbytes() == self.storages[ref.key].nbytes
            )
            if same:
                env[ref.key] = t.untyped_storage()
            else:  # the CPU kernel chose another layout than the meta one: keep the recorded layout
                self._view(env, ref).copy_(t)


@contextlib.contextmanager
def _seeded_cpu_rng(seed: int):
    """The CPU default generator seeded with `seed` for one op, restored afterwards (CUDA untouched)."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


@contextlib.contextmanager
def recording(seed: int):
    """`with recording(seed) as record:` build and initialise a model on the meta device inside; then
    call `record.name_tensors(model)`."""
    record = InitRecord(seed)
    with torch.device("meta"), _Recorder(record):
        yield record
