"""A persistent group of gloo worker processes that runs test cases on every rank.

Starting an 8-rank gloo group costs ~16 s on the CI machine, so multi-process tests share one group per
world size instead of launching one per case:

    pool = DistributedPool(4)
    results = pool.run("tests.distributed.cases_comm:fsdp_counts", hidden=8)   # one result per rank

`run` imports `module:function` in every worker and calls it with the keyword arguments; the function uses
torch.distributed's default (gloo) group or builds DeviceMeshes from it, and returns a picklable value.

Failure handling: an exception on any rank is re-raised here as `WorkerError` naming the rank and carrying
the remote traceback; a rank that dies, or a call that outlives its timeout (a hung collective), tears the
whole group down (`WorkerError` / `TimeoutError`). Other ranks may be stuck in a collective waiting for the
failed one, so a failed call never leaves a half-usable group behind: the next `run` starts a fresh one.

Workers inherit this process's stdout/stderr (under pytest they show up in the failing test's captured
output, or live with `-s`); on a timeout each worker's Python stack is dumped to stderr before it is killed.
"""

from __future__ import annotations

import atexit
import faulthandler
import importlib
import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback
import weakref

import torch
import torch.multiprocessing as mp

_START_TIMEOUT_S = 120.0
_POLL_S = 0.1
_ERROR_GRACE_S = 1.0  # after a first error, how long to wait for other ranks' errors (better messages)
_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()


class WorkerError(RuntimeError):
    """An exception raised in a worker (or a worker that died), re-raised in the parent."""

    def __init__(self, rank: int, message: str, remote_traceback: str = "", others: dict | None = None):
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.other_errors = others or {}
        text = f"rank {rank}: {message}"
        if self.other_errors:
            text += f"\n(also failed: ranks {sorted(self.other_errors)})"
        if remote_traceback:
            text += f"\n--- traceback on rank {rank} ---\n{remote_traceback.rstrip()}"
        super().__init__(text)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resolve(target: str):
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _worker_main(rank: int, world_size: int, port: int, parent_pid: int, tasks, results) -> None:
    """Body of one worker: join the gloo group, then run tasks until the sentinel `None` arrives."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # parent dumps stacks on timeout
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        results.put((-1, rank, False, _describe(exc)))
        return
    results.put((-1, rank, True, None))  # ready
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:  # the parent died without closing us: do not linger
                break
            continue
        if task is None:
            break
        call_id, target, kwargs = task
        try:
            value = _resolve(target)(**kwargs)
            payload = pickle.dumps(value)  # plain pickle: tensors are copied, not shared through shm
            results.put((call_id, rank, True, payload))
        except BaseException as exc:  # noqa: BLE001 - any failure goes back to the parent
            results.put((call_id, rank, False, _describe(exc)))
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - shutting down anyway
        pass


def _describe(exc: BaseException) -> tuple[str, str]:
    return f"{type(exc).__name__}: {exc}", traceback.format_exc()


class DistributedPool:
    """`world_size` gloo processes started once and reused for many `run` calls."""

    def __init__(self, world_size: int, start_timeout: float = _START_TIMEOUT_S):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.start_timeout = start_timeout
        self._ctx = mp.get_context("spawn")
        self._procs: list = []
        self._tasks: list = []
        self._results = None
        self._call_id = 0
        self.starts = 0  # how many times a group was started (restarts after failures included)

    # ------------------------------------------------------------------ lifecycle
    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> None:
        """Spawn the workers and wait until every rank has joined the process group."""
        if self._procs:
            return
        port = _free_port()
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.world_size)]
        # The workers read OMP_NUM_THREADS when torch initialises; set it in the environment they inherit.
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            for rank in range(self.world_size):
                p = self._ctx.Process(
                    target=_worker_main,
                    args=(rank, self.world_size, port, os.getpid(), self._tasks[rank], self._results),
                    name=f"dist-pool-{self.world_size}-rank{rank}",
                    daemon=False,  # workers may start processes of their own (data loader workers)
                )
                p.start()
                self._procs.append(p)
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        self.starts += 1
        _LIVE_POOLS.add(self)
        self._collect(-1, self.start_timeout, what="start-up (init_process_group)")

    def close(self) -> None:
        """Ask workers to leave the group and exit; kill any that do not within a few seconds."""
        if not self._procs:
            return
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001 - a broken pipe means the worker is gone already
                pass
        deadline = time.monotonic() + 10.0
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._teardown()

    def _teardown(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.terminate()
        for p in self._procs:
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        for q in [*self._tasks, self._results]:
            if q is not None:
                q.cancel_join_thread()  # never block on data queued for a dead worker
                q.close()
        self._procs, self._tasks, self._results = [], [], None

    def __enter__(self) -> DistributedPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._teardown()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ calls
    def run(self, target: str, *, timeout: float = 300.0, **kwargs) -> list:
        """Call `target(**kwargs)` on every rank; return the per-rank results in rank order."""
        module_name, sep, attr = target.partition(":")
        if not (module_name and sep and attr):
            raise ValueError(f"target must look like 'package.module:function', got {target!r}")
        if not self.alive:
            self._teardown()
            self.start()
        self._call_id += 1
        call_id = self._call_id
        for q in self._tasks:
            q.put((call_id, target, kwargs))
        return self._collect(call_id, timeout, what=f"call {target}")

    def _collect(self, call_id: int, timeout: float, what: str) -> list:
        deadline = time.monotonic() + timeout
        values: dict[int, object] = {}
        errors: dict[int, tuple[str, str]] = {}
        error_deadline = None
        while len(values) + len(errors) < self.world_size:
            now = time.monotonic()
            if error_deadline is not None and now > error_deadline:
                break
            if now > deadline:
                missing = sorted(set(range(self.world_size)) - set(values) - set(errors))
                self._dump_stacks()
                self._teardown()
                raise TimeoutError(
                    f"{what} on {self.world_size} ranks timed out after {timeout:.0f} s; ranks that never "
                    f"answered: {missing} (likely a hung or mismatched collective; stacks dumped to stderr). "
                    "The pool was torn down and restarts on the next call."
                )
            try:
                cid, rank, ok, payload = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                for rank, p in enumerate(self._procs):
                    if not p.is_alive() and rank not in values and rank not in errors:
                        errors[rank] = (f"worker process died (exit code {p.exitcode})", "")
                if errors and error_deadline is None:
                    error_deadline = time.monotonic() + _ERROR_GRACE_S
                continue
            if cid != call_id:
                continue  # stale message from an abandoned call: cannot happen after a teardown, but cheap
            if ok:
                values[rank] = payload
            else:
                errors[rank] = payload
                if error_deadline is None:
                    error_deadline = time.monotonic() + _ERROR_GRACE_S
        if errors:
            self._teardown()
            first = min(errors)
            message, tb = errors[first]
            others = {r: e for r, e in errors.items() if r != first}
            raise WorkerError(first, f"{what} failed: {message}", tb, others)
        if call_id == -1:
            return []
        return [pickle.loads(values[r]) for r in range(self.world_size)]

    def _dump_stacks(self) -> None:
        """Have each live worker print its Python stacks to the shared stderr, one rank at a time."""
        if not hasattr(signal, "SIGUSR1"):
            return
        for rank, p in enumerate(self._procs):
            if p.is_alive() and p.pid is not None:
                header = f"\n--- DistributedPool({self.world_size}): stacks of rank {rank}, pid {p.pid} ---\n"
                os.write(2, header.encode())
                try:
                    os.kill(p.pid, signal.SIGUSR1)
                except OSError:
                    continue
                time.sleep(0.3)


@atexit.register
def _close_live_pools() -> None:
    # Runs before multiprocessing's own exit hook (atexit is LIFO), which would join non-daemon workers.
    for pool in list(_LIVE_POOLS):
        pool.close()
