"""Sharded, atomic, optionally asynchronous checkpoint saving with rotation (torch.distributed.checkpoint).

Save protocol (every rank calls `save` at the same step):
  1. wait for the previous save (async: this rank's write, and on rank 0 its publication);
  2. each rank writes its RNG file and its DCP shard into `<dir>/step-NNNNNN.tmp-<nonce>/` (the nonce is
     agreed once per run, so every rank names the same directory);
  3. DCP gathers every rank's write result on rank 0, which writes the DCP index: when rank 0's save
     returns (sync) or its future completes (async), every rank's files are on disk;
     (each rank first hashes the files it wrote: writer.py);
  4. rank 0 then publishes: `megagen.json` with the manifest of file sizes and checksums, `COMPLETE`
     (with the checksum of `megagen.json`), rename to `<dir>/step-NNNNNN/`, replace `latest`, delete sound
     checkpoints beyond `checkpoint.keep` (layout.rotate).
Publication needs no collective, so with `checkpoint.async_save` it runs on rank 0 in the background
writer's completion callback while training goes on. Async saves use a dedicated gloo process group
(created once per process) so the writer thread's collectives never interleave with training's.
Errors are agreed on by all ranks (one all-reduce per save) so that no rank continues alone.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from megagen.checkpoint.layout import (
    CheckpointError,
    clean_stale,
    publish,
    rotate,
    set_latest,
    step_name,
    tmp_name,
)
from megagen.checkpoint.state import write_rng
from megagen.checkpoint.writer import ChecksummingWriter

log = logging.getLogger("megagen")

_GROUPS: list[tuple[object, dist.ProcessGroup]] = []


def checkpoint_group() -> dist.ProcessGroup:
    """A gloo group over the whole world for background saves; one per default group (a collective)."""
    world = dist.group.WORLD
    for owner, group in _GROUPS:
        if owner is world:
            return group
    group = dist.new_group(backend="gloo")
    _GROUPS.append((world, group))
    return group


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def agree(ok: bool, device: torch.device) -> bool:
    """True on every rank iff `ok` on every rank (one all-reduce; trivially `ok` in one process)."""
    if not _distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class _Pending:
    """One save in flight: its future, and (rank 0) its publication once every rank has written."""

    def __init__(self, step: int, tmp: Path, final: Path, meta: dict, publisher):
        self.step, self.tmp, self.final, self.meta = step, tmp, final, meta
        self.publisher = publisher
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started = time.perf_counter()

    def on_written(self, future) -> None:
        try:
            future.result()
            if self.publisher is not None:
                self.publisher(self)
        except BaseException as exc:  # noqa: BLE001 - reported by wait() on the main thread
            self.error = exc
        finally:
            self.done.set()


class CheckpointManager:
    """Writes checkpoints of one run into `directory`; see the module docstring for the protocol."""

    def __init__(self, directory: str | Path, runtime, keep: int = 3, async_save: bool = False):
        self.dir = Path(directory)
        self.runtime = runtime
        self.keep = keep
        self.async_save = async_save
        self.rank = runtime.rank if _distributed() else 0
        self.device = runtime.device
        self.nonce = self._agree_nonce()
        self.group = checkpoint_group() if async_save and _distributed() else None
        self._pending: _Pending | None = None
        self.published: list[Path] = []  # rank 0: checkpoints this manager made visible, in order
        self.save_seconds: list[float] = []  # time the training loop was blocked per save

    # ------------------------------------------------------------------ set-up
    def _agree_nonce(self) -> str:
        value = torch.tensor([secrets.randbits(62)], dtype=torch.int64, device=self.device)
        if _distributed():
            dist.broadcast(value, src=0)
        return f"{int(value.item()):016x}"

    def prepare(self) -> None:
        """Create the directory and delete interrupted saves of earlier runs (rank 0), then barrier."""
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for p in clean_stale(self.dir):
                log.info("checkpoint: removed interrupted save %s", p)
        self._barrier()

    def _barrier(self) -> None:
        if _distributed():
            self.runtime.barrier()

    # ------------------------------------------------------------------ save
    def save(self, state: dict, meta: dict, step: int, wait: bool = False) -> None:
        """Write `state` (DCP) and `meta` (JSON) as checkpoint `step`; a collective on every rank."""
        t0 = time.perf_counter()
        self._finish_pending()
        tmp, final = self.dir / tmp_name(step, self.nonce), self.dir / step_name(step)
        rng = write_rng(tmp, self.rank, self.device)
        writer = ChecksummingWriter(tmp, self.rank, (rng,), single_file_per_rank=True, sync_files=True)
        publisher = self._publish if self.rank == 0 else None
        pending = _Pending(step, tmp, final, meta, publisher)
        no_dist = not _distributed()
        if self.async_save:
            future = dcp.async_save(state, storage_writer=writer, process_group=self.group, no_dist=no_dist)
            self._pending = pending
            future.add_done_callback(pending.on_written)
            self.save_seconds.append(time.perf_counter() - t0)
            if wait:
                self.wait()
            return
        ok, error = True, None
        try:
            dcp.save(state, storage_writer=writer, no_dist=no_dist)
            if publisher is not None:
                publisher(pending)
        except Exception as exc:  # noqa: BLE001 - agreed on below, then raised on every rank
            ok, error = False, exc
        self._raise_unless_agreed(ok, error, step)
        self._barrier()
        self.save_seconds.append(time.perf_counter() - t0)

    def _publish(self, pending: _Pending) -> None:
        """Rank 0, after every rank's files are written: make the checkpoint visible, then rotate."""
        publish(pending.tmp, pending.final, pending.meta)
        set_latest(self.dir, pending.final)
        self.published.append(pending.final)
        for p in rotate(self.dir, self.keep, pending.final):
            log.info("checkpoint: rotated out %s", p.name)
        log.info(
            "checkpoint: saved %s (%.2f s%s)",
            pending.final,
            time.perf_counter() - pending.started,
            ", async" if self.async_save else "",
        )

    def _finish_pending(self) -> None:
        """Wait for the save in flight (this rank's write; on rank 0 also its publication)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.done.wait()
        ok = pending.error is None
        self._raise_unless_agreed(ok, pending.error, pending.step)

    def _raise_unless_agreed(self, ok: bool, error: BaseException | None, step: int) -> None:
        if agree(ok, self.device):
            return
        if error is not None:
            raise CheckpointError(
                "checkpoint.dir", f"saving step {step} into {self.dir} failed: {error}"
            ) from error
        raise CheckpointError("checkpoint.dir", f"saving step {step} into {self.dir} failed on another rank")

    def wait(self) -> None:
        """Block until every save issued so far is complete and visible (a collective)."""
        self._finish_pending()
        self._barrier()

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def close(self) -> None:
        """Forget a save still in flight without waiting (after a failure no collective is safe): its
        directory stays `.tmp-*`, is never loaded, and is deleted by the next run."""
        self._pending = None
