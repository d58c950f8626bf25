"""The LAPIC's only window on its host: a typing.Protocol the host implements per vCPU."""

from __future__ import annotations

from typing import Protocol

__all__ = ["LapicPort"]


class LapicPort(Protocol):
    """What a :class:`~vtick.host.lapic.lapic.Lapic` asks of the host (one port per vCPU).

    All times are host CLOCK_MONOTONIC integer nanoseconds; TSC values are guest TSC
    cycles.  Calls happen synchronously inside the LAPIC method that caused them.
    """

    #: guest TSC frequency (kHz); 0 means unknown (TSC-deadline then never arms, as KVM)
    tsc_khz: int

    def arm_timer(self, expiry_ns: int) -> None:
        """Arm this vCPU's LAPIC host timer for ``expiry_ns``, replacing any armed one.

        When it is reached the host calls ``lapic.on_timer(now)``.
        """
        ...

    def cancel_timer(self) -> None:
        """Disarm this vCPU's LAPIC host timer (no-op if none is armed)."""
        ...

    def guest_tsc(self, now: int) -> int:
        """The guest TSC at host time ``now``."""
        ...

    def tsc_to_host_ns(self, tsc: int) -> int:
        """The earliest host time at which the guest TSC is ``>= tsc``."""
        ...

    def send_ipi(self, source: int, icr_low: int, dest: int) -> None:
        """Route an IPI (``vtick.host.lapic.delivery.deliver`` does the matching).

        Args:
            source: the sending vCPU's index (``Lapic.vcpu_id``).
            icr_low: ICR bits 31:0, BUSY already clear.
            dest: the 8-bit xAPIC destination (ICR2 bits 31:24) in xAPIC mode, or the
                32-bit x2APIC destination (ICR bits 63:32) in x2APIC mode.
        """
        ...

    def irq_state_changed(self) -> None:
        """IRR/ISR/PPR (or a pending NMI/INIT/SIPI) changed: re-evaluate injection."""
        ...
