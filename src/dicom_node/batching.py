"""Draining a work queue in batches, for the threads that write what many callers hand them."""

from __future__ import annotations

import queue
from typing import TypeVar

T = TypeVar("T")


def take_batch(work: "queue.Queue[T | None]", first: T, limit: int) -> list[T]:
    """`first` and whatever else waits in `work`, at most `limit` items, without blocking. A None
    (the stop sentinel) ends the batch and is put back, so that the caller's next `get` sees it."""
    batch = [first]
    while len(batch) < limit:
        try:
            nxt = work.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            work.put(None)
            break
        batch.append(nxt)
    return batch
