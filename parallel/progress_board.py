"""Per-rank progress records in the rendezvous store: what a timed-out rank reads about its peers.

Each rank keeps one small JSON record under its own key, written by its watchdog's publisher thread at
most every few seconds, never by the training thread. A rank whose watchdog fires also appends its rank
to one arrivals key, so learning who else timed out costs one read of O(world) bytes, not one read per
rank, and it reads full records only of the ranks its report is about.

Every call goes through a clone of the default group's store (one connection per thread, a short
timeout). Callers still run them off the training thread and bound them: when the process that hosts
the store is stopped (rank 0 under torchrun with a private store, as our launchers set it up), a read
can hang well past its timeout.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

__all__ = ["PeerView", "ProgressBoard", "exchange", "wait_for_reports"]

_ARRIVED = "timed_out"
_ARRIVED_COUNT = "timed_out_count"
_REPORTED_COUNT = "reported_count"


def _base_store(store: dist.Store) -> dist.Store:
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store


class ProgressBoard:
    """One connection to the progress records of this job attempt."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        timeout_s: float = 5.0,
        address: str = "",
        host_rank: int | None = None,
    ):
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.address = address
        """host:port of the store, for messages ("" when it is not a TCP store)."""
        self.host_rank = host_rank
        """The rank whose process serves the store, when that is a training rank."""

    @classmethod
    def for_default_group(cls, timeout_s: float = 5.0) -> ProgressBoard | None:
        """The board on the default group's store, under a key prefix of this restart attempt; None when
        torch.distributed is not running or this torch cannot clone a store."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        default = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
        if default is None or not hasattr(default, "clone"):
            return None
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"megagen/progress/{attempt}", default)
        base = _base_store(default)
        address, host_rank = "", None
        if isinstance(base, dist.TCPStore):
            address = f"{base.host}:{base.port}"
            # torch.distributed's env:// and tcp:// rendezvous start the server in rank 0; torchrun's
            # shared store (TORCHELASTIC_USE_AGENT_STORE=True) lives in its agent instead.
            host_rank = None if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else 0
        return cls(store, dist.get_rank(), dist.get_world_size(), timeout_s, address, host_rank)

    def connect(self) -> ProgressBoard:
        """A new connection with this board's timeout, for use by one other thread."""
        store = self.store.clone()
        store.set_timeout(timedelta(seconds=self.timeout_s))
        return ProgressBoard(store, self.rank, self.world_size, self.timeout_s, self.address, self.host_rank)

    def publish(self, record: dict) -> None:
        self.store.set(f"rank/{self.rank}", json.dumps(record, separators=(",", ":")))

    def arrive(self) -> None:
        """Say that this rank's watchdog fired."""
        self.store.append(_ARRIVED, f"{self.rank},")
        self.store.add(_ARRIVED_COUNT, 1)

    def arrived_count(self) -> int:
        return self.store.add(_ARRIVED_COUNT, 0)

    def reported(self) -> None:
        """Say that this rank has written its report."""
        self.store.add(_REPORTED_COUNT, 1)

    def reported_count(self) -> int:
        return self.store.add(_REPORTED_COUNT, 0)

    def arrivals(self) -> set[int]:
        if not self.store.check([_ARRIVED]):
            return set()
        text = self.store.get(_ARRIVED).decode()
        return {int(r) for r in text.split(",") if r.strip().isdigit()}

    def read(self, ranks, into: dict[int, dict] | None = None) -> dict[int, dict]:
        """The records of `ranks` that exist and parse, added to `into` one by one (peers' records are
        data: JSON, nothing else)."""
        records = {} if into is None else into
        for rank in ranks:
            key = f"rank/{rank}"
            if not self.store.check([key]):
                continue
            try:
                record = json.loads(self.store.get(key))
            except ValueError:
                continue
            if isinstance(record, dict):
                records[rank] = record
        return records


@dataclass
class PeerView:
    """What a timed-out rank learnt from the store, filled in as it goes: a cut-off exchange still says
    how far it got."""

    answered: bool = False
    """The store answered at least one read."""
    arrived: set[int] | None = None
    """Ranks whose watchdog fired too (this one included); None until read."""
    records: dict[int, dict] = field(default_factory=dict)
    waited_s: float = 0.0
    lost: str | None = None
    """Why the connection to the store broke (its host process is gone), if it did."""

    def failed(self, exc: Exception) -> None:
        if isinstance(exc, getattr(dist, "DistNetworkError", ())):
            self.lost = str(exc).splitlines()[0][:160]


def exchange(
    board: ProgressBoard,
    record: dict,
    ranks: list[int],
    grace_s: float,
    view: PeerView,
    max_records: int = 64,
    poll_s: float = 0.5,
) -> None:
    """Publish this rank's final `record`, say it timed out, wait up to `grace_s` for every rank to do the
    same, then read the records of `ranks` (those that did not time out first, at most `max_records`).

    Live ranks stuck in the same step time out within a poll of each other; a rank that has not done so
    after `grace_s` is stopped, hung with the interpreter lock held, dead, or stuck outside a step.
    """
    conn = board.connect()
    conn.publish(record)
    conn.arrive()
    start = time.monotonic()
    while True:
        count = conn.arrived_count()
        view.answered = True
        view.waited_s = time.monotonic() - start
        if count >= board.world_size or view.waited_s >= grace_s:
            break
        time.sleep(poll_s)
    view.arrived = conn.arrivals()
    first = [r for r in ranks if r not in view.arrived] + [r for r in ranks if r in view.arrived]
    conn.read(first[:max_records], into=view.records)


def wait_for_reports(board: ProgressBoard, min_s: float, max_s: float, poll_s: float = 0.5) -> None:
    """After this rank's report: wait until every rank that timed out has written its report too — at
    least `min_s` (for ranks that time out a little later) unless every rank has, at most `max_s`.

    The first rank to exit makes torchrun stop the others, and takes the store with it when it hosts
    it: without this a rank that timed out a second later would be cut off before its report.
    """
    conn = board.connect()
    conn.reported()
    start = time.monotonic()
    while time.monotonic() - start < max_s:
        arrived, reported = conn.arrived_count(), conn.reported_count()
        if reported >= arrived and (arrived >= board.world_size or time.monotonic() - start >= min_s):
            return
        time.sleep(poll_s)
