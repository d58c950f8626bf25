"""Guest hrtimers: a per-vCPU queue whose earliest timer programs the clock-event device.

Modelled on ``kernel/time/hrtimer.c``:

* :class:`HrtimerQueue` holds timers ordered by (expiry, start order); ``start``,
  ``cancel`` and ``forward`` by timer id.
* :class:`HighResTimers` is ``hrtimer_interrupt`` plus ``hrtimer_reprogram``: the
  earliest expiry is what the active clock-event device is programmed for; on a device
  interrupt every timer due at "now" runs and the next one is programmed.  If
  programming answers -ETIME (the next timer became due meanwhile), expire again and
  retry, as Linux loops.  A device interrupt that finds nothing due is an *early device
  event*: counted, and no callback runs before its expiry (DESIGN.md invariant 1).

Callbacks are plain functions ``callback(now, expires) -> new_expiry | None`` (``None``
= HRTIMER_NORESTART); they do no exits, so they cannot block the interrupt path.

Every arming gets its own id (the queue's start order, unique per vCPU), kept from
``start`` to the callback or the cancel: the chaos history (``host/chaos/``) follows a
timer by it, not by matching times.  ``HrtimerQueue.listener`` hears every start, cancel
and replacement, and :attr:`HighResTimers.programming` names the arming the device is
being programmed for while that exit is out.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from vtick.guest.clockevents import KTIME_MAX, ClockEventDevice, ClockEvents
from vtick.guest.cpu import KernelOp
from vtick.proto.eventlog import CANCEL_CANCELLED, CANCEL_REPLACED, G_ARM, G_CANCEL

__all__ = ["HrtimerQueue", "HighResTimers", "HrtimerCallback", "Expiry"]

#: hrtimer_interrupt's retries before it declares a hang (kernel/time/hrtimer.c)
HANG_RETRIES = 3
#: the longest delay it then programs ("Give the CPU at least 100ms to catch up")
HANG_MAX_DELAY_NS = 100_000_000

#: callback(now, expires) -> new expiry (restart) or None (done)
HrtimerCallback = Callable[[int, int], int | None]


@dataclass(frozen=True, slots=True)
class Expiry:
    """One timer callback that ran: for lateness accounting."""

    timer: Hashable
    expires: int
    ran_at: int
    #: when the device was last programmed before this callback ran (0: never)
    programmed_at: int = 0
    #: the arming's id (its start order in the queue; -1: unknown)
    arm: int = field(default=-1, compare=False)

    @property
    def lateness(self) -> int:
        return self.ran_at - self.expires


@dataclass
class HrtimerQueue:
    """Exact queue of guest hrtimers (a heap with lazy deletion, like the host's baseline)."""

    _heap: list[tuple[int, int, Hashable]] = field(default_factory=list)
    _armed: dict[Hashable, tuple[int, int, HrtimerCallback]] = field(default_factory=dict)
    _order: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    #: told (G_ARM, arm id, expires) and (G_CANCEL, arm id, CANCEL_*) (the chaos
    #: history, vtick.proto.eventlog); None = not recording
    listener: Callable[[int, int, int], None] | None = None
    #: the arm id of the timer pop_due returned last
    popped_arm: int = -1

    def __len__(self) -> int:
        return len(self._armed)

    def start(self, timer: Hashable, expires: int, callback: HrtimerCallback) -> None:
        """``hrtimer_start`` (absolute mode): (re)arm ``timer`` for ``expires``."""
        order = next(self._order)
        if self.listener is not None:
            old = self._armed.get(timer)
            if old is not None:  # hrtimer_start on an armed timer removes it first
                self.listener(G_CANCEL, old[1], CANCEL_REPLACED)
            self.listener(G_ARM, order, expires)
        self._armed[timer] = (expires, order, callback)
        heapq.heappush(self._heap, (expires, order, timer))

    def cancel(self, timer: Hashable) -> bool:
        """``hrtimer_cancel``: True if it was armed."""
        entry = self._armed.pop(timer, None)
        if entry is not None and self.listener is not None:
            self.listener(G_CANCEL, entry[1], CANCEL_CANCELLED)
        return entry is not None

    def expires(self, timer: Hashable) -> int | None:
        entry = self._armed.get(timer)
        return None if entry is None else entry[0]

    def forward(self, timer: Hashable, now: int, interval: int) -> int:
        """``hrtimer_forward``: move an armed timer past ``now`` in whole ``interval``s.

        Returns the number of intervals it moved (the overruns).
        """
        entry = self._armed.get(timer)
        if entry is None or interval <= 0:
            return 0
        expires, _, callback = entry
        if expires > now:
            return 0
        overruns = (now - expires) // interval + 1
        self.start(timer, expires + overruns * interval, callback)
        return overruns

    def _prune(self) -> None:
        heap = self._heap
        while heap:
            expires, order, timer = heap[0]
            entry = self._armed.get(timer)
            if entry is not None and entry[0] == expires and entry[1] == order:
                return
            heapq.heappop(heap)

    def next_expiry(self) -> int | None:
        self._prune()
        return self._heap[0][0] if self._heap else None

    def next_arm(self) -> int:
        """The arm id of the earliest timer (0 when none)."""
        self._prune()
        return self._heap[0][1] if self._heap else 0

    def pop_due(self, now: int) -> tuple[Hashable, int, HrtimerCallback] | None:
        """Remove and return the earliest timer due at ``now``, or None."""
        self._prune()
        if not self._heap or self._heap[0][0] > now:
            return None
        expires, order, timer = heapq.heappop(self._heap)
        _, _, callback = self._armed.pop(timer)
        self.popped_arm = order
        return timer, expires, callback


class HighResTimers:
    """``hrtimer_interrupt`` / ``hrtimer_reprogram`` over one clock-event device.

    Args:
        core: the vCPU's clockevents core (its clock is the guest's ktime).
        dev: the device the queue programs (must be in oneshot mode).
        on_expiry: called for every callback that ran (lateness accounting).
    """

    def __init__(
        self,
        core: ClockEvents,
        dev: ClockEventDevice,
        on_expiry: Callable[[Expiry], None] | None = None,
    ) -> None:
        self.core = core
        self._dev = dev
        self.queue = HrtimerQueue()
        self.on_expiry = on_expiry
        self.early = 0  # device interrupts with nothing due
        self.programmed_at = 0  # when the device was last programmed
        self.interrupts = 0
        self.retries = 0  # -ETIME answers that made hrtimer_interrupt loop
        self.hangs = 0  # loops cut short after HANG_RETRIES (cpu_base->nr_hangs)
        self.ran = 0
        #: the arm id the device is being programmed for while that exit is out (0: none)
        self.programming = 0

    @property
    def dev(self) -> ClockEventDevice:
        """The device to program: the core's active one, which can change at run time
        (``ClockEvents.exchange``), as Linux's tick layer follows its current device."""
        return self.core.active or self._dev

    @property
    def programmed(self) -> int:
        return self.dev.next_event

    def _run_due(self, now: int) -> int:
        ran = 0
        while (item := self.queue.pop_due(now)) is not None:
            timer, expires, callback = item
            ran += 1
            if self.on_expiry is not None:
                self.on_expiry(
                    Expiry(timer, expires, now, self.programmed_at, arm=self.queue.popped_arm)
                )
            again = callback(now, expires)
            if again is not None:
                self.queue.start(timer, again, callback)
        self.ran += ran
        return ran

    def reprogram(self) -> KernelOp[None]:
        """Program the device for the earliest timer if that changed (``hrtimer_reprogram``).

        If the earliest timer is already due, run it and look again (what Linux's
        -ETIME loop in ``hrtimer_interrupt`` achieves), three times at most: then, as
        ``hrtimer_interrupt`` does when it detects a hang ("We give it 3 attempts to avoid
        overreacting on some spurious event"), the device is programmed with force for
        now + the time spent looping, at most 100 ms, so the CPU gets to do something
        else (take its other interrupts) meanwhile.  Without the limit a vCPU whose exits
        take longer than its timers' spacing never left this loop.
        """
        entry = self.core.clock()
        attempts = 0
        while True:
            nxt = self.queue.next_expiry()
            if nxt is None:
                self.dev.next_event = KTIME_MAX
                return
            if nxt == self.dev.next_event:
                return
            self.programmed_at = self.core.clock()
            self.programming = self.queue.next_arm()
            try:
                rc = yield from self.core.program_event(self.dev, nxt, force=False)
            finally:
                self.programming = 0
            if rc == 0:
                return
            self.retries += 1
            self.dev.next_event = KTIME_MAX
            self._run_due(self.core.clock())
            attempts += 1
            if attempts >= HANG_RETRIES and self.queue.next_expiry() is not None:
                self.hangs += 1
                now = self.core.clock()
                delay = min(max(now - entry, 1), HANG_MAX_DELAY_NS)
                self.programmed_at = now
                yield from self.core.program_event(self.dev, now + delay, force=True)
                return

    def interrupt(self) -> KernelOp[int]:
        """The device fired: run everything due, then program the next expiry.

        Returns the number of callbacks run (0 = an early device event).
        """
        self.interrupts += 1
        self.dev.next_event = KTIME_MAX  # a oneshot device is spent once it fired
        ran = self._run_due(self.core.clock())
        if not ran:
            self.early += 1
        yield from self.reprogram()
        return ran
