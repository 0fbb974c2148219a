"""The watchdog's one-line report: where this rank is stuck, and which ranks have not reached that point.

Pure formatting over the records the watchdog gathered (this rank's and its peers', see
`parallel/progress_board.py`), so every case is unit-tested without a hang:

    megagen watchdog: rank 1: step 3 has run 5.2s > 5s (train.step_timeout_s=5); blocked in all_gather
    on dp_shard_cp #57, waiting at …/_fsdp_collectives.py:301 (foreach_all_gather_copy_out); ranks not at
    this point: 0 (no report within 2s: stopped, hung or dead; last record 1.3s old: step 3,
    dp_shard_cp #56); exiting with code 86
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from megagen.parallel.progress_board import PeerView

MAX_NAMED = 8  # ranks named in one report; the rest are counted


@dataclass(frozen=True)
class Groups:
    """The process groups of this rank: {group name: global ranks} and {group name: axis name}."""

    members: Mapping[str, list[int]]
    axis_of: Mapping[str, str]


@dataclass(frozen=True)
class Store:
    """How the peers' records were (not) reached."""

    address: str
    host_rank: int | None
    timeout_s: float
    grace_s: float


def _pending_text(pending: list[dict]) -> str:
    first, rest = pending[0], pending[1:]
    text = f"blocked in {first['kind']} on {first['axis']} #{first['seq']}"
    if rest:
        text += " (also pending: " + ", ".join(f"{p['kind']} on {p['axis']} #{p['seq']}" for p in rest) + ")"
    return text


def _local_text(me: dict, groups: Groups | None, where: str | None) -> str:
    if groups is None:
        text = ""
    elif me.get("pending") is None:
        text = "; collective unknown (torch's flight recorder is off: TORCH_FR_BUFFER_SIZE=0)"
    elif not me["pending"]:
        text = "; not waiting for a collective (computing, loading data or synchronising the device)"
    else:
        text = "; " + _pending_text(me["pending"])
    return text + (f", waiting at {where}" if where else "")


def _targets(me: dict, groups: Groups) -> dict[str, int]:
    """{group: the collective number a peer must have reached}: the oldest pending one of each group it
    waits in, else (nothing pending or unknown) what this rank has issued on every group."""
    if me.get("pending"):
        targets: dict[str, int] = {}
        for p in me["pending"]:
            if not p.get("p2p") and p["group"] in groups.members:
                targets.setdefault(p["group"], p["seq"])
        if targets:
            return targets
    return dict(me.get("seq") or {})


def ranks_concerned(me: dict, groups: Groups) -> list[int]:
    """The other ranks of the groups this rank waits in (of all its groups when it waits in none)."""
    targets = _targets(me, groups)
    return sorted({r for g in targets for r in groups.members[g]} - {me["rank"]})


def _last_seen(record: dict, focus: list[str], groups: Groups, now: float) -> str:
    seqs = record.get("seq") or {}
    where = ", ".join(f"{groups.axis_of.get(g, g)} #{seqs[g]}" for g in focus if g in seqs)
    age = now - float(record.get("wall", now))
    text = f"last record {max(age, 0.0):.1f}s old: step {record.get('step')}"
    return text + (f", {where}" if where else "")


def _peer_text(rank: int, targets, groups: Groups, view: PeerView, store: Store, now: float):
    """Why `rank` holds this point up, or None when it reached it too."""
    focus = [g for g in targets if rank in groups.members[g]]
    record = view.records.get(rank)
    if rank not in view.arrived:
        seen = _last_seen(record, focus, groups, now) if record else "no record at all"
        return f"no report within {store.grace_s:g}s: stopped, hung or dead; {seen}"
    if record is None:
        return None
    seqs = record.get("seq") or {}
    behind = [g for g in focus if seqs.get(g, -1) < targets[g]]
    if not behind:
        return None
    reached = ", ".join(f"{groups.axis_of.get(g, g)} #{seqs.get(g, '?')} of #{targets[g]}" for g in behind)
    pending = record.get("pending")
    doing = _pending_text(pending) if pending else "not in a collective"
    return f"timed out in step {record.get('step')} at {reached}, {doing}"


def _peers_text(me: dict, groups: Groups, view: PeerView | None, store: Store, world_size: int, now: float):
    targets = _targets(me, groups)
    ranks = ranks_concerned(me, groups)
    if not ranks:
        return ""
    if view is None:
        return "; peers' progress unavailable (no store to read it from)"
    if not view.answered or view.arrived is None:
        at = f" {store.address}" if store.address else ""
        host = store.host_rank if store.host_rank != me["rank"] else None
        if view.lost:  # its process is gone: exited (maybe after its own report), not necessarily stuck
            by = f" (hosted by rank {host}, which has exited)" if host is not None else ""
            return f"; peers' progress unavailable: the rendezvous store{at}{by} is gone: {view.lost}"
        silent = f"did not answer within {store.timeout_s:g}s"
        if host is not None:
            return (
                f"; ranks not at this point: {host} (it hosts the rendezvous store{at}, which {silent}: "
                "stopped, hung or dead)"
            )
        return f"; peers' progress unavailable: the rendezvous store{at} {silent}"
    late = []
    for rank in ranks:
        why = _peer_text(rank, targets, groups, view, store, now)
        if why is not None:
            late.append(f"{rank} ({why})")
    outside = sorted(set(range(world_size)) - view.arrived - set(ranks) - {me["rank"]})
    tail = ""
    if outside:
        named = ", ".join(map(str, outside[:MAX_NAMED])) + (" …" if len(outside) > MAX_NAMED else "")
        tail = f"; {len(outside)} rank(s) outside these groups did not report either: {named}"
    if not late:
        axes = ", ".join(groups.axis_of.get(g, g) for g in targets)
        return (
            f"; every other rank of {axes} reached this point and timed out too (a hang inside the "
            f"collective library or the network, not a late rank){tail}"
        )
    more = f", and {len(late) - MAX_NAMED} more" if len(late) > MAX_NAMED else ""
    return "; ranks not at this point: " + ", ".join(late[:MAX_NAMED]) + more + tail


def build_report(
    me: dict,
    elapsed_s: float,
    limit: str,
    exit_code: int,
    groups: Groups | None = None,
    view: PeerView | None = None,
    store: Store | None = None,
    world_size: int = 1,
    where: str | None = None,
    now: float = 0.0,
) -> str:
    """`me`: this rank's final record (rank, step, seq, pending); `groups` None for a single process."""
    text = f"megagen watchdog: rank {me['rank']}: step {me['step']} has run {elapsed_s:.1f}s > {limit}"
    text += _local_text(me, groups, where)
    if groups is not None and store is not None:
        text += _peers_text(me, groups, view, store, world_size, now)
    return text + f"; exiting with code {exit_code}"
