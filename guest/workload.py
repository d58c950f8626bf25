"""Guest workloads as pure state machines over guest ktime (integer ns).

``TimerStorm``: a vCPU keeps ``timers`` guest timers at random expiries
``[min_ns, max_ns)`` ahead; the earliest one is what the clock-event device must be
programmed for.  On each device interrupt every timer that is due runs (its lateness,
handler time minus requested expiry, is recorded) and is re-armed at a new random
expiry.  An interrupt with nothing due yet is an *early device event*: counted, and no
callback runs early (DESIGN.md section 6, invariant 1).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

__all__ = ["TimerStorm", "Expired"]


@dataclass(frozen=True, slots=True)
class Expired:
    timer: int
    expiry: int
    lateness: int


@dataclass
class TimerStorm:
    seed: int
    timers: int = 8
    min_ns: int = 100_000
    max_ns: int = 2_000_000
    early: int = 0
    events: int = 0
    _queue: list[tuple[int, int]] = field(default_factory=list)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if self.timers < 1:
            raise ValueError("timers must be >= 1")
        if not 0 < self.min_ns < self.max_ns:
            raise ValueError("need 0 < min_ns < max_ns")
        self._rng = random.Random(self.seed)

    def start(self, now: int) -> None:
        self._queue = [(now + self._delay(), i) for i in range(self.timers)]
        heapq.heapify(self._queue)

    def _delay(self) -> int:
        return self._rng.randrange(self.min_ns, self.max_ns)

    def next_expiry(self) -> int:
        """The earliest armed expiry: what the clock-event device must fire for."""
        return self._queue[0][0]

    def on_interrupt(self, now: int) -> list[Expired]:
        """Run every timer due at ``now``; re-arm each.  Empty list = early event."""
        ran: list[Expired] = []
        while self._queue and self._queue[0][0] <= now:
            expiry, timer = heapq.heappop(self._queue)
            ran.append(Expired(timer, expiry, now - expiry))
        for item in ran:
            heapq.heappush(self._queue, (now + self._delay(), item.timer))
        if ran:
            self.events += len(ran)
        else:
            self.early += 1
        return ran
