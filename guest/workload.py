"""Guest workloads as pure state machines over guest ktime (integer ns).

Each workload drives the guest kernel only through :class:`TimerKernel` (hrtimer
start/cancel, the periodic tick, smp_call_function), so the same workload runs over
every clock-event path.  ``TimerStormWorkload`` keeps ``timers`` hrtimers at random
expiries ``[min_ns, max_ns)`` ahead and re-arms each from its callback; lateness and
early device events are accounted by the kernel's hrtimer layer
(``vtick.guest.hrtimer.HighResTimers``; DESIGN.md section 6, invariant 1).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Protocol

from vtick.guest.cpu import KernelOp
from vtick.proto.catalog import WORKLOAD_NAMES

if TYPE_CHECKING:
    from vtick.guest.smp import Smp

__all__ = [
    "TimerStormWorkload",
    "TickWorkload",
    "TimerKernel",
    "IpiStormWorkload",
    "MixedWorkload",
    "Workload",
    "WORKLOADS",
]


class TimerStormWorkload:
    """The timer storm over the guest kernel's hrtimers (issue 4 workload ``timers``).

    ``timers`` hrtimers at random expiries ``[min_ns, max_ns)`` ahead; each callback
    re-arms its timer at a new random expiry.  Between interrupts, with probability
    ``churn_pct`` %, one timer is cancelled and restarted or re-armed before it fired
    (the normal life of an hrtimer: most are modified before they expire).
    """

    def __init__(
        self,
        kernel: TimerKernel,
        seed: int,
        timers: int = 8,
        min_ns: int = 100_000,
        max_ns: int = 2_000_000,
        churn_pct: int = 10,
    ) -> None:
        if timers < 1 or not 0 < min_ns < max_ns or not 0 <= churn_pct <= 100:
            raise ValueError("timers >= 1, 0 < min_ns < max_ns, 0 <= churn_pct <= 100")
        self.kernel = kernel
        self.rng = random.Random(seed)
        self.timers = timers
        self.min_ns = min_ns
        self.max_ns = max_ns
        self.churn_pct = churn_pct
        self.events = 0
        self.cancelled = 0
        self.rearmed = 0

    def _delay(self) -> int:
        return self.rng.randrange(self.min_ns, self.max_ns)

    def _fire(self, now: int, expires: int) -> int:
        self.events += 1
        return now + self._delay()

    def start(self, now: int) -> None:
        for i in range(self.timers):
            self.kernel.start_timer(("storm", i), now + self._delay(), self._fire)

    def between_interrupts(self, now: int) -> None:
        if self.rng.randrange(100) >= self.churn_pct:
            return
        timer = ("storm", self.rng.randrange(self.timers))
        if self.rng.random() < 0.5:
            self.kernel.cancel_timer(timer)
            self.cancelled += 1
        else:
            self.rearmed += 1
        self.kernel.start_timer(timer, now + self._delay(), self._fire)

    def task(self, now: int) -> KernelOp[None]:
        return
        yield  # pragma: no cover

    def wants_cpu(self, now: int) -> bool:
        """True when the vCPU has task work now (it must not halt)."""
        return False

    def counters(self) -> dict[str, int]:
        return {"storm_cancelled": self.cancelled, "storm_rearmed": self.rearmed}


class TickWorkload:
    """The periodic tick alone (issue 4 workload ``tick``): HZ interrupts a second."""

    def __init__(self, kernel: TimerKernel) -> None:
        self.kernel = kernel

    def start(self, now: int) -> None:
        self.kernel.start_tick()

    def between_interrupts(self, now: int) -> None:
        return

    def task(self, now: int) -> KernelOp[None]:
        return
        yield  # pragma: no cover

    def wants_cpu(self, now: int) -> bool:
        return False

    def counters(self) -> dict[str, int]:
        return {}


#: the IPI storm sends a reschedule IPI after every this many calls
RESCHEDULE_EVERY = 10


class IpiStormWorkload:
    """Every vCPU calls ``smp_call_function(wait=True)`` on all the others, back to back
    (issue 4 workload ``ipi``): the IPI paths under the heaviest load they can get."""

    def __init__(self, kernel: TimerKernel, pause_ns: int = 0) -> None:
        self.kernel = kernel
        self.pause_ns = pause_ns
        self.calls = 0
        self.failed_calls = 0
        self._next = 0

    def start(self, now: int) -> None:
        self._next = now

    def between_interrupts(self, now: int) -> None:
        return

    def task(self, now: int) -> KernelOp[None]:
        if now < self._next or len(self.kernel.smp.online) < 2:
            return  # nobody else online yet (they are still booting): nothing to call
        errors = yield from self.kernel.smp.call_function("noop", self.calls, wait=True)
        self.calls += 1
        if errors:
            self.failed_calls += 1
        if self.calls % RESCHEDULE_EVERY == 0:
            # now and then a reschedule IPI to the next online CPU (smp_send_reschedule)
            smp = self.kernel.smp
            others = sorted(c for c in smp.online if c != smp.cpu)
            if others:
                yield from smp.send_reschedule(others[self.calls // RESCHEDULE_EVERY % len(others)])
        self._next = now + self.pause_ns

    def wants_cpu(self, now: int) -> bool:
        return now >= self._next

    def counters(self) -> dict[str, int]:
        return {"ipi_calls": self.calls, "ipi_failed_calls": self.failed_calls}


class MixedWorkload:
    """The timer storm plus an ``smp_call_function(wait=True)`` every ``ipi_every_ns``
    from task context, triggered by an hrtimer (issue 4 workload ``mixed``)."""

    def __init__(self, kernel: TimerKernel, storm: TimerStormWorkload, ipi_every_ns: int) -> None:
        self.kernel = kernel
        self.storm = storm
        self.every = ipi_every_ns
        self.calls = 0
        self.failed_calls = 0
        self._due = False

    def _tick(self, now: int, expires: int) -> int:
        self._due = True
        return now + self.every

    def start(self, now: int) -> None:
        self.storm.start(now)
        self.kernel.start_timer("mixed-ipi", now + self.every, self._tick)

    def between_interrupts(self, now: int) -> None:
        self.storm.between_interrupts(now)

    def task(self, now: int) -> KernelOp[None]:
        if not self._due:
            return
        self._due = False
        errors = yield from self.kernel.smp.call_function("noop", self.calls, wait=True)
        self.calls += 1
        if errors:
            self.failed_calls += 1

    def wants_cpu(self, now: int) -> bool:
        return self._due

    def counters(self) -> dict[str, int]:
        return self.storm.counters() | {
            "ipi_calls": self.calls,
            "ipi_failed_calls": self.failed_calls,
        }


class TimerKernel(Protocol):
    """What the workloads need from the guest kernel (``vtick.guest.kernel.GuestKernel``)."""

    def start_timer(
        self, timer: Hashable, expires: int, callback: Callable[[int, int], int | None]
    ) -> None: ...

    def cancel_timer(self, timer: Hashable) -> bool: ...

    def start_tick(self) -> None: ...

    @property
    def smp(self) -> Smp: ...


WORKLOADS = WORKLOAD_NAMES

Workload = TimerStormWorkload | TickWorkload | IpiStormWorkload | MixedWorkload
