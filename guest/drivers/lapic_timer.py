"""The LAPIC timer as a clock-event device (``lapic_clockevent`` in arch/x86/kernel/apic/apic.c).

One-shot: ``set_next_event(delta)`` writes TMICT = delta (relative APIC ticks at the
calibrated bus rate divided by 16).  Periodic: TMICT = ``lapic_timer_period / 16`` and the
timer reloads itself.  Register access goes through the APIC ops table, so the same
driver is an MMIO exit under xAPIC, an MSR exit under x2APIC and a hypercall under VMI.

Linux programs the divider as divide-by-16 (``APIC_DIVISOR``) and derives the device's
mult from the calibrated ``lapic_timer_period`` (bus clocks per jiffy):
``mult = ((lapic_timer_period / 16) << 32) / TICK_NSEC`` with shift 32; the clamps are
``cev_delta2ns(0x7FFFFFFF)`` and ``cev_delta2ns(0xF)`` (reference section 8).
"""

from __future__ import annotations

from vtick.guest.apic import ApicOps
from vtick.guest.clockevents import CEFeature, ClockEventDevice
from vtick.guest.cpu import KernelOp
from vtick.proto import apicdef as a
from vtick.proto.abi import Vector
from vtick.proto.clockmath import NSEC_PER_SEC, U32_MASK, cev_delta2ns

__all__ = ["LapicTimer", "APIC_DIVISOR", "TDCR_DIVIDE_BY_16", "tick_nsec"]

APIC_DIVISOR = 16
TDCR_DIVIDE_BY_16 = 0x3
_MAX_TICKS = 0x7FFF_FFFF
_MIN_TICKS = 0xF
_TDCR_DIV_BITS = 0xB  # APIC_TDR_DIV_1 | APIC_TDR_DIV_TMBASE: the divide field


def tick_nsec(hz: int) -> int:
    """``TICK_NSEC``: the length of a jiffy in ns, rounded."""
    return (NSEC_PER_SEC + hz // 2) // hz


class LapicTimer(ClockEventDevice):
    """Args:
    ops: the APIC access method.
    lapic_timer_period: calibrated APIC bus clocks per jiffy.
    hz: the kernel's HZ.
    """

    def __init__(self, ops: ApicOps, lapic_timer_period: int, hz: int) -> None:
        super().__init__("lapic", CEFeature.ONESHOT | CEFeature.PERIODIC, rating=100)
        self.ops = ops
        self.period = lapic_timer_period
        self.vector = Vector.LOCAL_TIMER
        self.shift = 32
        self.mult = ((lapic_timer_period // APIC_DIVISOR) << 32) // tick_nsec(hz) & U32_MASK
        self.max_delta_ticks = _MAX_TICKS
        self.min_delta_ticks = _MIN_TICKS
        self.max_delta_ns = cev_delta2ns(_MAX_TICKS, self.mult, self.shift, True)
        self.min_delta_ns = cev_delta2ns(_MIN_TICKS, self.mult, self.shift, False)

    def _setup_lvtt(self, periodic: bool) -> KernelOp[None]:
        """``__setup_APIC_LVTT(lapic_timer_period, oneshot, irqen=1)``."""
        lvtt = self.vector | (a.APIC_LVT_TIMER_PERIODIC if periodic else 0)
        yield from self.ops.write(a.APIC_LVTT, lvtt)
        # Linux: TDCR = (TDCR & ~(DIV_1 | DIV_TMBASE)) | DIV_16, a read-modify-write
        tdcr = yield from self.ops.read(a.APIC_TDCR)
        yield from self.ops.write(a.APIC_TDCR, (tdcr & ~_TDCR_DIV_BITS) | TDCR_DIVIDE_BY_16)
        if periodic:
            yield from self.ops.write(a.APIC_TMICT, self.period // APIC_DIVISOR)

    def set_state_oneshot(self) -> KernelOp[None]:
        yield from self._setup_lvtt(periodic=False)

    def set_state_periodic(self) -> KernelOp[None]:
        yield from self._setup_lvtt(periodic=True)

    def set_state_shutdown(self) -> KernelOp[None]:
        """``lapic_timer_shutdown``: mask LVTT (read-modify-write), then TMICT = 0."""
        lvtt = yield from self.ops.read(a.APIC_LVTT)
        yield from self.ops.write(a.APIC_LVTT, lvtt | a.APIC_LVT_MASKED | self.vector)
        yield from self.ops.write(a.APIC_TMICT, 0)

    def set_next_event(self, ticks: int) -> KernelOp[int]:
        """``lapic_next_event``: one register write."""
        yield from self.ops.write(a.APIC_TMICT, ticks)
        return 0
