"""A de-duplicating work queue of object keys, drained by a bounded pool of worker threads.

Change events and the resync timer only say "look at this job again"; ten events for one job
while it waits are one pass, and a key that changes while a worker has it is queued once more
after that pass (so no change is lost and no two passes of one key run at once). The pool bounds
concurrency, so a thousand jobs need neither a thousand threads nor one thread in series.

Two lanes: `urgent` keys (a job new to the operator or with a new spec: someone waits for its
Job) are handed out before the others (child-Job changes, resyncs, retries: status upkeep). In a
burst of a thousand new jobs each new job then waits only behind other new jobs, not behind the
status passes of the ones already started. Those are not starved by an endless stream of new
jobs either: after URGENT_RUN urgent keys in a row, a waiting normal key goes next.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)
URGENT, NORMAL = 0, 1
LANES = ("urgent", "normal")
URGENT_RUN = 16  # urgent keys handed out in a row while normal ones wait (then one normal key)


class WorkQueue:
    def __init__(self, on_wait: Callable[[str, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """on_wait: called with the lane ("urgent", "normal") and seconds in the queue of each
        handed-out key (a metric)."""
        self._cond = threading.Condition()
        self._lanes: tuple[deque[Hashable], deque[Hashable]] = (deque(), deque())
        self._queued: dict[Hashable, tuple[int, float]] = {}  # key -> (lane, queued at)
        self._active: set[Hashable] = set()
        self._again: dict[Hashable, int] = {}  # key -> lane, to queue after its running pass
        self._on_wait, self._clock = on_wait, clock
        self._run = 0  # urgent keys handed out in a row

    def __len__(self) -> int:
        with self._cond:
            return len(self._queued)

    def add(self, key: Hashable, urgent: bool = False) -> None:
        with self._cond:
            self._add(key, URGENT if urgent else NORMAL)

    def _add(self, key: Hashable, lane: int) -> None:
        if key in self._active:
            self._again[key] = min(lane, self._again.get(key, NORMAL))
            return
        queued = self._queued.get(key)
        if queued is not None and queued[0] <= lane:
            return
        # New, or moving up to the urgent lane (its NORMAL entry is skipped when reached).
        self._queued[key] = (lane, queued[1] if queued else self._clock())
        self._lanes[lane].append(key)
        self._cond.notify()

    def _pop(self) -> Hashable | None:
        lanes = (NORMAL, URGENT) if self._run >= URGENT_RUN else (URGENT, NORMAL)
        for lane in lanes:
            order = self._lanes[lane]
            while order:
                key = order.popleft()
                if self._queued.get(key, (None,))[0] == lane:  # else a stale entry of a moved key
                    self._run = self._run + 1 if lane == URGENT else 0
                    return key
        return None

    def get(self, stop: threading.Event, poll: float = 0.5) -> Hashable | None:
        """The next key (now owned by the caller until `done`), or None once `stop` is set."""
        with self._cond:
            while (key := self._pop()) is None:
                if stop.is_set():
                    return None
                self._cond.wait(poll)
            lane, since = self._queued.pop(key)
            self._active.add(key)
        if self._on_wait:
            self._on_wait(LANES[lane], self._clock() - since)
        return key

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._active.discard(key)
            lane = self._again.pop(key, None)
            if lane is not None:
                self._add(key, lane)


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
