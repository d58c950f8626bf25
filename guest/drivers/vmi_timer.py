"""VMI's alarm as a clock-event device: SetAlarm with an absolute deadline in TSC cycles.

VMI kept the APIC programming model but moved timers to ``SetAlarm``/``CancelAlarm`` in
cycles (the 2007 debate, reference lkml/002): the guest computes rdtsc + delta, so like
TSC-deadline the value written is absolute, one hypercall per programmed event.
"""

from __future__ import annotations

from collections.abc import Callable

from vtick.guest.clockevents import CEFeature, ClockEventDevice, ClockEvents
from vtick.guest.cpu import KernelOp, hypercall
from vtick.proto.abi import Hypercall

__all__ = ["VmiTimer"]

_MAX_TICKS = (1 << 63) - 1


class VmiTimer(ClockEventDevice):
    def __init__(self, rdtsc: Callable[[], int], tsc_khz: int) -> None:
        super().__init__("vmi-timer", CEFeature.ONESHOT, rating=300)
        self.rdtsc = rdtsc
        self.tsc_khz = tsc_khz

    def register(self, core: ClockEvents) -> None:
        core.config_and_register(self, self.tsc_khz * 1000, 1, _MAX_TICKS)

    def set_next_event(self, ticks: int) -> KernelOp[int]:
        rc = yield from hypercall(Hypercall.VTICK_VMI_SET_ALARM, self.rdtsc() + ticks, 0)
        return rc

    def set_state_shutdown(self) -> KernelOp[None]:
        yield from hypercall(Hypercall.VTICK_VMI_CANCEL_ALARM)
