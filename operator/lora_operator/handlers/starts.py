"""Count-then-create without a race: the namespace's running-job limit holds under parallel passes.

The limit check counts the namespace's unfinished trainer Jobs and then creates one. Passes run
on a pool of workers, and the Job list comes from an informer that lags the apiserver, so two
jobs applied together could both count N-1 and both start. Two rules close that:

  * one start at a time per namespace: the count and the create happen under the namespace's lock;
  * Jobs this process created count until the list shows them (or TTL_S passes: a Job that never
    shows up was deleted, and the live list is then the truth again).

The operator runs as one active replica (leader election), so an in-process ledger is enough.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

TTL_S = 120.0


class StartLedger:
    def __init__(self, clock: Callable[[], float] = time.monotonic, ttl_s: float = TTL_S):
        self._clock, self._ttl = clock, ttl_s
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._started: dict[str, dict[str, tuple[str, float]]] = {}  # ns -> Job name -> (owner, at)

    def lock(self, namespace: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(namespace, threading.Lock())

    def started(self, namespace: str, job_name: str, owner: str) -> None:
        with self._guard:
            self._started.setdefault(namespace, {})[job_name] = (owner, self._clock())

    def unseen(self, namespace: str, listed: Iterable[str], owner: str) -> int:
        """Jobs of other owners this process started in `namespace` that `listed` (the Job names
        the list shows) does not hold yet; forgets the ones it shows and the expired ones."""
        shown, now = set(listed), self._clock()
        with self._guard:
            mine = self._started.get(namespace, {})
            for name in [n for n, (_, at) in mine.items() if n in shown or now - at > self._ttl]:
                del mine[name]
            if not mine:
                self._started.pop(namespace, None)
            return sum(1 for o, _ in mine.values() if o != owner)
