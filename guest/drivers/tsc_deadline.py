"""TSC-deadline mode of the LAPIC timer (``lapic-deadline`` in Linux's apic.c).

``set_next_event(delta)`` writes IA32_TSC_DEADLINE = rdtsc + delta * TSC_DIVISOR: an
*absolute* deadline in TSC cycles, computed from a relative delta (so the delta itself
is still stale if the vCPU is preempted before the rdtsc, but not between rdtsc and the
write).  Registered with ``clockevents_config_and_register(tsc_khz * 1000 / 8, 0xF,
~0UL)``; LVTT = vector | TSC-deadline mode; shutdown writes the MSR with 0.
"""

from __future__ import annotations

from collections.abc import Callable

from vtick.guest.apic import ApicOps
from vtick.guest.clockevents import CEFeature, ClockEventDevice, ClockEvents
from vtick.guest.cpu import KernelOp, wrmsr
from vtick.proto import apicdef as a
from vtick.proto.abi import Vector

__all__ = ["TscDeadline", "TSC_DIVISOR"]

TSC_DIVISOR = 8
_U64 = (1 << 64) - 1


class TscDeadline(ClockEventDevice):
    def __init__(self, ops: ApicOps, rdtsc: Callable[[], int], tsc_khz: int) -> None:
        super().__init__("lapic-deadline", CEFeature.ONESHOT, rating=100)
        self.ops = ops
        self.rdtsc = rdtsc
        self.tsc_khz = tsc_khz
        self.vector = Vector.LOCAL_TIMER

    def register(self, core: ClockEvents) -> None:
        core.config_and_register(self, self.tsc_khz * 1000 // TSC_DIVISOR, 0xF, _U64)

    def set_state_oneshot(self) -> KernelOp[None]:
        yield from self.ops.write(a.APIC_LVTT, self.vector | a.APIC_LVT_TIMER_TSCDEADLINE)

    def set_state_shutdown(self) -> KernelOp[None]:
        lvtt = yield from self.ops.read(a.APIC_LVTT)
        yield from self.ops.write(a.APIC_LVTT, lvtt | a.APIC_LVT_MASKED | self.vector)
        yield from wrmsr(a.MSR_IA32_TSC_DEADLINE, 0)

    def set_next_event(self, ticks: int) -> KernelOp[int]:
        """``lapic_next_deadline``."""
        yield from wrmsr(a.MSR_IA32_TSC_DEADLINE, self.rdtsc() + ticks * TSC_DIVISOR)
        return 0
