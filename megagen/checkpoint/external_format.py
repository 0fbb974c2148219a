"""Outside checkpoint formats (e.g. diffusers): how megagen tensors are made of another library's tensors.

A spec that can be imported from / exported to an outside format has a *table* (a module named in
`TABLES`) with two functions of the preset's architecture:
  - `tensor_rules(arch) -> {megagen name: TensorRule}`: which outside tensors make each megagen tensor;
  - `outside_config(arch) -> dict`: the outside config that describes the same model (import compares
    the file's config with it field by field, export writes it).
A `TensorRule` that changes a layout works row by row (dim 0), the dim FSDP and column-parallel TP shard:
a rank reading rows [a, b) of a megagen tensor reads only the outside rows those come from
(`RuleReader`), never a whole tensor; a tensor taken as it is passes any block straight through (e.g. a
row-parallel weight sharded on dim 1). A second outside format is one more table.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch

from megagen.checkpoint.layout import CheckpointError

# (spec name, format) → module holding that spec's table for the format
TABLES = {("wan", "diffusers"): "megagen.specs.wan.diffusers_map"}


@dataclass(frozen=True)
class TensorRule:
    """One megagen tensor built from outside tensors, row by row.

    `sources` are concatenated along their row dim (after dropping `squeeze` leading size-1 dims: a
    (1, 6, d) table is 6 rows); target row r is concatenated row `row_perm[r]` (identity when None); each
    row has its dims permuted by `inner_perm` (dims of one row, e.g. conv (C, kt, kh, kw)) and, with
    `flatten`, is flattened into one vector (a conv kernel becomes a linear's input features).
    """

    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    """the outside tensors' shapes, as the preset expects them"""
    squeeze: int = 0
    row_perm: tuple[int, ...] | None = None
    inner_perm: tuple[int, ...] | None = None
    flatten: bool = False

    @property
    def is_direct(self) -> bool:
        """One outside tensor taken as it is: slices pass straight through (any dim may be sharded)."""
        plain = self.row_perm is None and self.inner_perm is None and not self.flatten
        return len(self.sources) == 1 and self.squeeze == 0 and plain

    def _row_shape(self) -> tuple[int, ...]:
        return tuple(self.shapes[0][self.squeeze + 1 :])

    def _target_row_shape(self) -> tuple[int, ...]:
        row = self._row_shape()
        if self.inner_perm is not None:
            row = tuple(row[i] for i in self.inner_perm)
        return (math.prod(row),) if self.flatten and row else row

    def source_rows(self) -> list[int]:
        return [s[self.squeeze] for s in self.shapes]

    def target_shape(self) -> tuple[int, ...]:
        if self.is_direct:
            return tuple(self.shapes[0])
        return (sum(self.source_rows()), *self._target_row_shape())

    def rows_to_target(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, *row shape) outside rows → (n, *target row shape)."""
        if self.inner_perm is not None:
            rows = rows.permute(0, *(i + 1 for i in self.inner_perm))
        return rows.reshape(rows.shape[0], *self._target_row_shape())

    def rows_to_outside(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of `rows_to_target`."""
        row = self._row_shape()
        if self.inner_perm is None:
            return rows.reshape(rows.shape[0], *row)
        permuted = tuple(row[i] for i in self.inner_perm)
        inverse = [0] * len(self.inner_perm)
        for pos, i in enumerate(self.inner_perm):
            inverse[i] = pos
        return rows.reshape(rows.shape[0], *permuted).permute(0, *(i + 1 for i in inverse))


def _runs(global_rows: list[int], sizes: list[int]) -> list[tuple[int, int, int]]:
    """(source index, first row in that source, count) of each run of consecutive rows of one source."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    runs: list[tuple[int, int, int]] = []
    for g in global_rows:
        src = max(i for i, s in enumerate(starts) if s <= g)
        local = g - starts[src]
        if runs and runs[-1][0] == src and runs[-1][1] + runs[-1][2] == local:
            runs[-1] = (src, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((src, local, 1))
    return runs


class RuleReader:
    """`reader[slices]` of a megagen tensor (as `parallel.materialize.read_local` asks for blocks), read
    from the outside tensors' safetensors slices: only the outside rows behind the requested rows."""

    def __init__(self, rule: TensorRule, slices: list):
        self.rule, self.slices = rule, slices

    def __getitem__(self, index):
        rule = self.rule
        index = index if isinstance(index, tuple) else (index,)
        if rule.is_direct:
            return self.slices[0][index]
        if index == (Ellipsis,):
            index = tuple(slice(0, n) for n in rule.target_shape())
        wanted = range(rule.target_shape()[0])[index[0]]
        order = [rule.row_perm[r] for r in wanted] if rule.row_perm is not None else list(wanted)
        parts = []
        for src, first, count in _runs(order, rule.source_rows()):
            lead = (0,) * rule.squeeze
            parts.append(rule.rows_to_target(self.slices[src][(*lead, slice(first, first + count))]))
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        return rows[(slice(None), *index[1:])]


def to_outside(rule: TensorRule, full: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outside tensors of a full megagen tensor (export): the exact inverse of reading them."""
    if rule.is_direct:
        return {rule.sources[0]: full.reshape(rule.shapes[0])}
    concat = rule.rows_to_outside(full)
    if rule.row_perm is not None:
        placed = torch.empty_like(concat)
        placed[list(rule.row_perm)] = concat
        concat = placed
    out, start = {}, 0
    for name, shape, rows in zip(rule.sources, rule.shapes, rule.source_rows()):
        out[name] = concat[start : start + rows].reshape(shape).contiguous()
        start += rows
    return out


def table_for(spec_name: str, fmt: str, key: str):
    """The table module of `spec_name` for `fmt`, or an error naming the spec and the formats it has."""
    module = TABLES.get((spec_name, fmt))
    if module is None:
        known = sorted(s for s, f in TABLES if f == fmt)
        raise CheckpointError(
            key,
            f"spec {spec_name!r} has no {fmt} mapping (specs with one: {', '.join(known) or 'none'})",
        )
    return importlib.import_module(module)


def config_mismatches(found: dict, expected: dict, fmt: str, label: str) -> list[str]:
    """`field: <fmt> config has X, preset <label> has Y` for every field that differs."""
    out = []
    for name, want in expected.items():
        have = found.get(name)
        if isinstance(have, list):
            have = tuple(have)
        if isinstance(want, list):
            want = tuple(want)
        if name not in found:
            out.append(f"{name}: {fmt} config lacks it, preset {label} has {want!r}")
        elif have != want:
            out.append(f"{name}: {fmt} config has {have!r}, preset {label} has {want!r}")
    return out
