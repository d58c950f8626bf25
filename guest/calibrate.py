"""Boot-time LAPIC timer calibration against the emulated PIT (``calibrate_APIC_clock``).

Linux does not know the APIC bus frequency; it runs the LAPIC timer periodic and masked
with TMICT = 0xFFFFFFFF/16 and divide-by-16, waits 100 ms (``LAPIC_CAL_LOOPS`` = HZ/10
jiffies) of a reference timer, reads TMCCT at the first and the last tick, and sets
``lapic_timer_period = (t1 - t2) * 16 / LAPIC_CAL_LOOPS``: APIC bus clocks per jiffy
(reference section 8).

Here the reference is PIT channel 2 free-running in mode 3 (square wave) with a 10 ms
period, its output polled through port 0x61 bit 5: ten rising edges are 100 ms.  Every
port read is an exit, which is the cost the issue asks to report, and the error comes
from the polling: an edge is seen only at the next poll, so each end of the interval is
late by up to one exit round trip.  A 10 ms period (rather than one 1 ms jiffy) keeps
the half-period well above the round trip so no edge is missed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vtick.guest.apic import ApicOps
from vtick.guest.cpu import KernelOp, inb, outb, udelay
from vtick.guest.drivers.lapic_timer import APIC_DIVISOR, TDCR_DIVIDE_BY_16
from vtick.proto import apicdef as a
from vtick.proto.abi import PIT_HZ, PitPort, Vector
from vtick.proto.clockmath import NSEC_PER_SEC

__all__ = [
    "Calibration",
    "calibrate_lapic_timer",
    "calibrate_lapic_timer_tsc",
    "pit_start_square_wave",
    "pit_wait_rising_edge",
]

_PORT_B_GATE2 = 0x01
_PORT_B_SPEAKER = 0x02
_PORT_B_OUT2 = 0x20
#: control word: channel 2, lobyte/hibyte, mode 3 (square wave), binary
_PIT_CH2_MODE3 = 0b10_11_011_0
#: the reference: a 10 ms square wave, ten periods = 100 ms
REFERENCE_HZ = 100
REFERENCE_EDGES = 10


@dataclass(frozen=True, slots=True)
class Calibration:
    lapic_timer_period: int  # APIC bus clocks per jiffy
    loops: int
    polls: int  # port 0x61 reads spent waiting
    hz: int
    #: the PIT interval disagreed with the TSC by more than 1 % and was rescaled
    rescaled: bool = False

    def bus_hz(self) -> int:
        return self.lapic_timer_period * self.hz

    def error(self, true_bus_hz: int) -> float:
        """Relative error of the calibrated bus frequency."""
        return (self.bus_hz() - true_bus_hz) / true_bus_hz


def _wait_out2(level: bool) -> KernelOp[int]:
    polls = 0
    while True:
        polls += 1
        if bool((yield from inb(PitPort.PORT_B)) & _PORT_B_OUT2) == level:
            return polls


def pit_start_square_wave(period_hz: int) -> KernelOp[None]:
    """PIT channel 2 in mode 3 at ``period_hz``, gate high, speaker off."""
    count = (PIT_HZ + period_hz // 2) // period_hz
    port_b = yield from inb(PitPort.PORT_B)
    port_b = (port_b & ~_PORT_B_SPEAKER) | _PORT_B_GATE2
    yield from outb(PitPort.MODE, _PIT_CH2_MODE3)
    yield from outb(PitPort.CHANNEL2, count & 0xFF)
    yield from outb(PitPort.CHANNEL2, count >> 8)
    yield from outb(PitPort.PORT_B, port_b)


def pit_wait_rising_edge() -> KernelOp[int]:
    """Poll OUT2 until it goes from low to high; returns the number of polls."""
    polls = yield from _wait_out2(False)
    polls += yield from _wait_out2(True)
    return polls


def calibrate_lapic_timer_tsc(
    ops: ApicOps, hz: int, rdtsc: Callable[[], int], tsc_khz: int
) -> KernelOp[Calibration]:
    """``calibrate_APIC_clock`` with the TSC as the reference (its frequency is known).

    What Linux does when ``tsc_khz`` is known, and what vtick's application processors
    do: the PIT is one machine-wide device, and two vCPUs reprogramming channel 2 at once
    would corrupt each other's reference (Linux calibrates on the boot CPU only and the
    others reuse ``lapic_timer_period``; vtick's vCPUs share no memory).  Costs two TMCCT
    reads plus the setup writes, and no port exits.
    """
    lvtt = a.APIC_LVT_MASKED | a.APIC_LVT_TIMER_PERIODIC | Vector.LOCAL_TIMER
    yield from ops.write(a.APIC_LVTT, lvtt)
    yield from ops.write(a.APIC_TDCR, TDCR_DIVIDE_BY_16)
    yield from ops.write(a.APIC_TMICT, 0xFFFF_FFFF // APIC_DIVISOR)
    # Each TMCCT read is an exit of unknown length: bracket it with TSC reads and take
    # the midpoint as the moment it was sampled, which halves the error a slow exit or
    # a preemption during it adds.
    before = rdtsc()
    t1 = yield from ops.read(a.APIC_TMCCT)
    tsc1 = (before + rdtsc()) // 2
    yield from udelay(REFERENCE_EDGES * NSEC_PER_SEC // REFERENCE_HZ)  # 100 ms
    before = rdtsc()
    t2 = yield from ops.read(a.APIC_TMCCT)
    tsc2 = (before + rdtsc()) // 2
    yield from ops.write(a.APIC_TMICT, 0)
    yield from ops.write(a.APIC_LVTT, a.APIC_LVT_MASKED | Vector.LOCAL_TIMER)
    delta = (t1 - t2) & 0xFFFF_FFFF
    # bus clocks per second = delta * 16 * tsc_hz / (tsc2 - tsc1); per jiffy: / HZ
    period = delta * APIC_DIVISOR * tsc_khz * 1000 // (max(1, tsc2 - tsc1) * hz)
    return Calibration(period, max(1, hz // 10), 0, hz)


def calibrate_lapic_timer(
    ops: ApicOps,
    hz: int,
    rdtsc: Callable[[], int] | None = None,
    tsc_khz: int = 0,
) -> KernelOp[Calibration]:
    """``calibrate_APIC_clock`` with the PIT as the reference (the boot CPU's way).

    With ``rdtsc``/``tsc_khz`` the interval is verified against the TSC the way Linux
    verifies it against the ACPI PM timer: if the two disagree by more than 1 % the
    LAPIC count is rescaled to the TSC's interval.  Polling port 0x61 misses an edge of
    the square wave whenever the vCPU is descheduled for more than half a period between
    two polls, which makes the PIT interval one whole period (10 %) too long.
    """
    lvtt = a.APIC_LVT_MASKED | a.APIC_LVT_TIMER_PERIODIC | Vector.LOCAL_TIMER
    yield from ops.write(a.APIC_LVTT, lvtt)
    yield from ops.write(a.APIC_TDCR, TDCR_DIVIDE_BY_16)
    yield from ops.write(a.APIC_TMICT, 0xFFFF_FFFF // APIC_DIVISOR)
    yield from pit_start_square_wave(REFERENCE_HZ)
    polls = yield from pit_wait_rising_edge()  # align to an edge first
    t1 = yield from ops.read(a.APIC_TMCCT)
    tsc1 = rdtsc() if rdtsc is not None else 0
    for _ in range(REFERENCE_EDGES):
        polls += yield from pit_wait_rising_edge()
    t2 = yield from ops.read(a.APIC_TMCCT)
    tsc2 = rdtsc() if rdtsc is not None else 0
    # stop the calibration timer
    yield from ops.write(a.APIC_TMICT, 0)
    yield from ops.write(a.APIC_LVTT, a.APIC_LVT_MASKED | Vector.LOCAL_TIMER)
    delta = (t1 - t2) & 0xFFFF_FFFF  # TMCCT counts down
    # delta * 16 bus clocks in REFERENCE_EDGES / REFERENCE_HZ s (100 ms = LAPIC_CAL_LOOPS
    # jiffies): clocks per jiffy = bus Hz / HZ
    loops = max(1, hz // 10)
    rescaled = False
    reference_ns = REFERENCE_EDGES * NSEC_PER_SEC // REFERENCE_HZ
    if rdtsc is not None and tsc_khz and tsc2 > tsc1:
        measured_ns = (tsc2 - tsc1) * 1_000_000 // tsc_khz
        if abs(measured_ns - reference_ns) * 100 > reference_ns:
            # like Linux's PM-timer check: trust the verifying clock's interval
            delta = delta * reference_ns // measured_ns
            rescaled = True
    period = delta * APIC_DIVISOR * REFERENCE_HZ // (REFERENCE_EDGES * hz)
    return Calibration(period, loops, polls, hz, rescaled)
