"""Host hrtimers: every armed host timer for every vCPU, ordered by exact expiry.

A minimal exact queue (a binary heap with lazy deletion, as SimPy and trio keep theirs):
arm, cancel and re-arm by timer handle, ``next_expiry`` for the event loop to sleep on,
``expire(now)`` to collect what is due.  A timer never fires before its expiry, and
equal expiries fire in arming order.  The host device models arm and cancel through
this API and keep no queue of their own, as KVM's LAPIC uses the kernel's hrtimer.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable

__all__ = ["HrtimerQueue"]


class HrtimerQueue:
    """Exact timer queue keyed by an opaque, hashable timer handle."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Hashable]] = []
        self._armed: dict[Hashable, tuple[int, int]] = {}  # handle -> (expiry, order)
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._armed)

    def arm(self, handle: Hashable, expiry: int) -> None:
        """Arm ``handle`` to fire at ``expiry`` ns; re-arming replaces the old expiry."""
        entry = (expiry, next(self._order))
        self._armed[handle] = entry
        heapq.heappush(self._heap, (entry[0], entry[1], handle))

    def cancel(self, handle: Hashable) -> bool:
        """Disarm ``handle``; True if it was armed."""
        return self._armed.pop(handle, None) is not None

    def expiry(self, handle: Hashable) -> int | None:
        entry = self._armed.get(handle)
        return None if entry is None else entry[0]

    def _prune(self) -> None:
        heap = self._heap
        while heap:
            expiry, order, handle = heap[0]
            if self._armed.get(handle) == (expiry, order):
                return
            heapq.heappop(heap)

    def next_expiry(self) -> int | None:
        """The earliest armed expiry, for the event loop to sleep until."""
        self._prune()
        return self._heap[0][0] if self._heap else None

    def expire(self, now: int) -> list[Hashable]:
        """Disarm and return every timer with expiry <= ``now``, earliest first."""
        fired: list[Hashable] = []
        heap = self._heap
        while True:
            self._prune()
            if not heap or heap[0][0] > now:
                return fired
            _, _, handle = heapq.heappop(heap)
            del self._armed[handle]
            fired.append(handle)
