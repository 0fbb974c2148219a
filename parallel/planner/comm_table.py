"""The tally every communication prediction fills: bytes and calls per mesh axis and collective kind."""

from __future__ import annotations

from collections import defaultdict


class CommTable:
    """{axis: {kind: [bytes, calls]}}, in the accounting convention of parallel/comm.py."""

    def __init__(self):
        self.table = defaultdict(lambda: defaultdict(lambda: [0, 0]))

    def add(self, axis: str, kind: str, nbytes: float, calls: int = 1) -> None:
        if calls <= 0:
            return
        cell = self.table[axis][kind]
        cell[0] += int(nbytes) * calls
        cell[1] += calls

    def add_total(self, axis: str, kind: str, nbytes: int, calls: int) -> None:
        """`calls` collectives moving `nbytes` in all."""
        if calls > 0:
            cell = self.table[axis][kind]
            cell[0] += nbytes
            cell[1] += calls

    def as_dict(self) -> dict:
        return {
            a: {k: {"bytes": v[0], "calls": v[1]} for k, v in kinds.items()}
            for a, kinds in self.table.items()
        }
