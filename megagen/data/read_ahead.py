"""Iterate a producer on a background thread, a few items ahead: the loaders' read-ahead.

numpy's copies release the GIL, so reading the next micro-batches on a thread overlaps the training step
with no worker processes; order, exceptions and shutdown behave as if the consumer iterated itself.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator


def on_thread(make_items, finish, depth: int, name: str = "megagen-read-ahead") -> Iterator:
    """Iterate `make_items()` on a background thread, `depth` items ahead, applying `finish` there.

    Order is kept (one thread); an exception raised while producing item i is raised by the consumer at
    item i; the thread is stopped and joined when the consumer finishes or stops early."""
    items: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = None
        try:
            source = make_items()
            while not stop.is_set():
                try:
                    item = next(source)
                except StopIteration:
                    put((False, None))
                    return
                item = finish(item) if finish is not None else item
                if not put((True, item)):
                    return
        except BaseException as exc:  # raised in the consumer, at this item
            put((False, exc))
        finally:
            close = getattr(source, "_shutdown_workers", None)  # a DataLoader's worker processes
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if ok:
                yield item
            elif item is None:
                return
            else:
                raise item
    finally:
        stop.set()
        thread.join()
