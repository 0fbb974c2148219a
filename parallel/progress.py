"""How far this rank has got in its collectives, for the step watchdog: counted by c10d itself.

Both sources below live in c10d, under every caller — megagen's collectives, FSDP2's all-gathers and
reduce-scatters, DTensor redistributions, functional collectives — and cost the training thread nothing
beyond what c10d already does (no dispatch mode, no Python per op):

* the per-group collective sequence number (`ProcessGroup._get_sequence_number_for_group`): how many
  collectives this rank has issued on the group. It is the same count on every rank of the group, so a
  rank whose number is lower than its peers' has not reached the collective they wait in.
* torch's flight recorder (a ring buffer of the last collectives, `TORCH_FR_BUFFER_SIZE` entries): which
  issued collectives have not completed — the one a blocked rank waits for, whether it waits in
  `Work.wait()` (FSDP2), in `wait_tensor` (`parallel/collectives.py`) or, on NCCL, in a later stream
  synchronisation. It must be switched on before the process group is created (`enable_flight_recorder`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["CollectiveProgress", "Pending", "enable_flight_recorder", "flight_recorder_on", "pending_in_dump"]

FLIGHT_RECORDER_ENTRIES = 2000
# Read by c10d in this order; the first one set decides (0 = off).
_FR_SIZE_VARS = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
# The recorders' JSON dumps: gloo's (and, in newer torch, every backend's); NCCL's in CUDA builds.
_DUMPS = ("_dump_fr_trace_json", "_dump_nccl_trace_json")
# c10d's names for a collective (gloo and NCCL differ) -> the names megagen reports. The name is what the
# backend runs: gloo runs a reduce-scatter as an all_reduce (the report's "waiting at" names the call).
_KINDS = {
    "allgather": "all_gather",
    "_allgather_base": "all_gather",
    "allgather_into_tensor_coalesced": "all_gather",
    "allgather_coalesced": "all_gather",
    "allreduce": "all_reduce",
    "allreduce_coalesced": "all_reduce",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "alltoall": "all_to_all",
    "alltoall_base": "all_to_all",
}


def enable_flight_recorder(entries: int = FLIGHT_RECORDER_ENTRIES) -> None:
    """Switch torch's flight recorder on for the process groups created after this call, unless the
    environment already sizes it (an explicit 0 keeps it off)."""
    if not any(os.environ.get(name) for name in _FR_SIZE_VARS):
        os.environ["TORCH_FR_BUFFER_SIZE"] = str(entries)


def flight_recorder_on() -> bool:
    for name in _FR_SIZE_VARS:
        value = os.environ.get(name)
        if value:
            try:
                return int(value) > 0
            except ValueError:
                return False
    return False


@dataclass(frozen=True)
class Pending:
    """One collective this rank issued that has not completed."""

    kind: str  # all_gather, reduce_scatter, all_reduce, ...
    group: str  # process-group name (the same on every rank of the group)
    axis: str  # mesh axis name, "world", or "group <name>"
    seq: int  # its number among the group's collectives (p2p ops: among the group's p2p ops)
    p2p: bool = False

    def describe(self) -> str:
        return f"{self.kind} on {self.axis} #{self.seq}" + (" (p2p)" if self.p2p else "")


def pending_in_dump(dump: bytes | str, axis_of: Mapping[str, str]) -> list[Pending]:
    """The not-completed collectives of a flight-recorder JSON dump, oldest first.

    `axis_of` names process groups ({group name: axis}); other groups are named "group <name>".
    """
    entries = json.loads(dump).get("entries") or []
    found = []
    for entry in sorted(entries, key=lambda e: e.get("record_id") or 0):
        if entry.get("retired", True) or entry.get("state") == "completed":
            continue
        group = str((entry.get("process_group") or ["?"])[0])
        name = str(entry.get("profiling_name") or "?").rpartition(":")[2]  # "gloo:all_gather"
        p2p = bool(entry.get("is_p2p"))
        seq = int(entry.get("p2p_seq_id" if p2p else "collective_seq_id") or 0)
        axis = axis_of.get(group, f"group {group}")
        found.append(Pending(_KINDS.get(name, name.lstrip("_")), group, axis, seq, p2p))
    return found


def _counts(group: dist.ProcessGroup) -> bool:
    """Whether the group's backend keeps a collective sequence number (gloo and NCCL do)."""
    try:
        group._get_sequence_number_for_group()
    except (RuntimeError, AttributeError):
        return False
    return True


class CollectiveProgress:
    """This rank's collective counts on the groups it trains with, and what it is waiting for.

    Safe to call from another thread while the training thread is blocked inside a collective.
    """

    def __init__(self, axes: Mapping[str, dist.ProcessGroup]):
        """`axes`: {axis name: process group}; where two axes share a group the first name is kept."""
        self._groups: dict[str, dist.ProcessGroup] = {}
        self.axis_of: dict[str, str] = {}
        """{group name: axis name}."""
        for axis, group in axes.items():
            name = group.group_name
            if name in self._groups or not _counts(group):
                continue
            self._groups[name] = group
            self.axis_of[name] = axis
        self.members: dict[str, list[int]] = {
            name: dist.get_process_group_ranks(group) for name, group in self._groups.items()
        }
        """{group name: global ranks of the group}."""

    def sequence_numbers(self) -> dict[str, int]:
        """{group name: collectives this rank has issued on it}."""
        return {name: group._get_sequence_number_for_group() for name, group in self._groups.items()}

    def pending(self) -> list[Pending] | None:
        """Issued, not completed, oldest first; None when the flight recorder is off or unavailable."""
        if not flight_recorder_on():
            return None
        found: dict[tuple[str, int, bool], Pending] = {}
        dumped = False
        for name in _DUMPS:
            dump = getattr(torch._C._distributed_c10d, name, None)
            if dump is None:
                continue
            try:
                entries = pending_in_dump(dump(True, True), self.axis_of)  # collectives, only active ones
            except (RuntimeError, ValueError, TypeError):  # a dump format this code does not know
                continue
            dumped = True
            for p in entries:
                found.setdefault((p.group, p.seq, p.p2p), p)
        return list(found.values()) if dumped else None
