"""A de-duplicating work queue of object keys, drained by a bounded pool of worker threads.

Change events and the resync timer only say "look at this job again"; ten events for one job
while it waits are one pass, and a key that changes while a worker has it is queued once more
after that pass (so no change is lost and no two passes of one key run at once). The pool bounds
concurrency, so a thousand jobs need neither a thousand threads nor one thread in series.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)


class WorkQueue:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._order: deque[Hashable] = deque()
        self._queued: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._again: set[Hashable] = set()

    def __len__(self) -> int:
        with self._cond:
            return len(self._order)

    def add(self, key: Hashable) -> None:
        with self._cond:
            self._add(key)

    def _add(self, key: Hashable) -> None:
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._order.append(key)
            self._cond.notify()

    def get(self, stop: threading.Event, poll: float = 0.5) -> Hashable | None:
        """The next key (now owned by the caller until `done`), or None once `stop` is set."""
        with self._cond:
            while not self._order:
                if stop.is_set():
                    return None
                self._cond.wait(poll)
            key = self._order.popleft()
            self._queued.discard(key)
            self._active.add(key)
            return key

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._active.discard(key)
            if key in self._again:
                self._again.discard(key)
                self._add(key)


def start_workers(queue: WorkQueue, work: Callable[[Hashable], None], count: int,
                  stop: threading.Event) -> list[threading.Thread]:
    def loop() -> None:
        while (key := queue.get(stop)) is not None:
            try:
                work(key)
            except Exception:
                log.exception("reconcile of %s failed (retried on the next change or resync)", key)
            finally:
                queue.done(key)

    threads = [threading.Thread(target=loop, name=f"lora-worker-{i}", daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads
