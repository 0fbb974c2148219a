"""The entry of a tensor-parallel region under SP with parallel.overlap: which overlap a call runs.

Why a separate entry: with overlap off every region takes `RegionEntry.run` (bitwise today's path). With
it on, a token-wise region runs in sequence pieces (`sp_pipeline.py`) and any other region runs its
column-parallel GEMMs local rows first (`sp_local_first.py`), each only where `tp_overlap_schedule`
says it pays; otherwise the plain path.
"""

from __future__ import annotations

import torch
from torch import nn

from megagen.parallel.region_entry import SEQ_DIM, RegionEntry
from megagen.parallel.sp_local_first import gather_local_first, release
from megagen.parallel.sp_pipeline import run_in_pieces
from megagen.parallel.tp_overlap_schedule import local_first_pays, sp_pieces


class OverlappedRegionEntry(RegionEntry):
    """`RegionEntry` that overlaps: `row_output` (the one row-parallel linear) set for a token-wise region,
    else `local_first` (its column-parallel linears)."""

    def __init__(self, *args, row_output: nn.Module | None, columns: list[nn.Module]):
        super().__init__(*args)
        self.row_output = row_output
        # pieces: a column-parallel GEMM on an input shared by every piece runs once per call
        self.columns = columns if row_output is not None else []
        self.local_first = columns if row_output is None else []

    def __repr__(self) -> str:
        return super().__repr__() + (", sp_pipelined" if self.row_output is not None else ", local_first")

    def run(self, forward, args: tuple, kwargs: dict):
        if torch.compiler.is_compiling():  # compiled blocks keep the plain path
            return super().run(forward, args, kwargs)
        pieces = self._pieces(args, kwargs)
        if pieces > 1:
            return self._run_pipelined(forward, args, kwargs, pieces)
        key = self._local_first_input(args, kwargs)
        if key is not None:
            return self._run_local_first(forward, args, kwargs, key)
        return super().run(forward, args, kwargs)

    def _seq_inputs(self, args: tuple, kwargs: dict) -> dict:
        """The declared sequence inputs present in a call, keyed by position (int) or keyword (str)."""
        seq = self.region.seq_args
        found = {i: x for i, (name, x) in enumerate(zip(self.arg_names, args)) if name in seq}
        found.update({name: x for name, x in kwargs.items() if name in seq})
        return found

    def _pieces(self, args: tuple, kwargs: dict) -> int:
        """1 unless the region is token-wise, every sequence input a tensor of one length, and
        `sp_pieces` finds a split that pays."""
        inputs = list(self._seq_inputs(args, kwargs).values())
        if self.row_output is None or not inputs:
            return 1
        if not all(isinstance(x, torch.Tensor) and x.dim() >= 2 for x in inputs):
            return 1
        x = inputs[0]
        if any(t.shape[SEQ_DIM] != x.shape[SEQ_DIM] for t in inputs):
            return 1
        return sp_pieces(x.shape[SEQ_DIM], x.shape[-1], self.group.size())

    def _run_pipelined(self, forward, args: tuple, kwargs: dict, pieces: int) -> torch.Tensor:
        """`forward` run piece by piece on the gathered sequence pieces, its row-parallel output reduced
        per piece (`sp_pipeline.run_in_pieces`); the bias is added once to the whole local shard."""
        linear = self.row_output
        args, kwargs = self._prepare_others(args, kwargs)

        def body(gathered: dict) -> torch.Tensor:
            a = tuple(gathered.get(i, x) for i, x in enumerate(args))
            k = {name: gathered.get(name, x) for name, x in kwargs.items()}
            linear.defer_sum = True
            try:
                out = forward(*a, **k)
            finally:
                linear.defer_sum = False
            partial, linear.deferred = linear.deferred, None
            if out is not partial:
                raise RuntimeError(
                    f"token_wise region {self.region} must return its row-parallel linear's output as is"
                )
            return out

        seq = self._seq_inputs(args, kwargs)
        shared = [
            x
            for x in (*args, *kwargs.values())
            if isinstance(x, torch.Tensor) and not any(x is t for t in seq.values())
        ]
        for col in self.columns:
            col.once = {id(x): (x, None) for x in shared}
        try:
            out = run_in_pieces(body, seq, pieces, self.group)
        finally:
            for col in self.columns:
                col.once = None
        return out if linear.bias is None else out + linear.bias

    def _local_first_input(self, args: tuple, kwargs: dict):
        """The key of the sequence input whose GEMMs run local-first in this call, else None: the first
        one that feeds the region's column-parallel linears (other sequence inputs, e.g. rotary tables,
        are gathered as usual)."""
        if not self.local_first:
            return None
        widths = {lin.in_features for lin in self.local_first}
        for key, x in self._seq_inputs(args, kwargs).items():
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-1] in widths:
                pays = local_first_pays(x.shape[SEQ_DIM], x.shape[-1], self.group.size())
                return key if pays else None
        return None

    def _run_local_first(self, forward, args: tuple, kwargs: dict, key) -> torch.Tensor:
        """`forward` on the gathered input, its column-parallel GEMMs on that input done local rows first."""
        x = args[key] if isinstance(key, int) else kwargs[key]
        args, kwargs = self._prepare_others(args, kwargs, keep=key)
        linears = [lin for lin in self.local_first if lin.in_features == x.shape[-1]]
        gathered = gather_local_first(x, linears, self.group)
        args = tuple(gathered if i == key else v for i, v in enumerate(args))
        kwargs = {name: gathered if name == key else v for name, v in kwargs.items()}
        try:
            return forward(*args, **kwargs)
        finally:
            release(linears, str(self.region))

    def _prepare_others(self, args: tuple, kwargs: dict, keep=None) -> tuple[tuple, dict]:
        """The call's inputs brought into the region, all but the sequence ones (those enter piece by
        piece) — or, with `keep`, all but that one input (it enters local-first)."""

        def held(key, name) -> bool:
            return key == keep if keep is not None else name in self.region.seq_args

        args = (
            tuple(
                x if held(i, name) else self._enter(name, x)
                for i, (name, x) in enumerate(zip(self.arg_names, args))
            )
            + args[len(self.arg_names) :]
        )
        return args, {name: x if held(name, name) else self._enter(name, x) for name, x in kwargs.items()}
