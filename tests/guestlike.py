"""Test helper: a Machine whose guests enable their APICs and EOI every interrupt.

Device tests look at which interrupts a device raised and when.  With the LAPIC in the
path an interrupt stays in service until the guest's EOI, so these tests use a machine
whose vCPUs behave like a guest that software-enables its APIC at boot (SVR = 0x1FF, as
Linux's setup_local_APIC does) and EOIs each interrupt as soon as the test takes it.
"""

from __future__ import annotations

from vtick.host.machine import NMI_VECTOR, Action, InjectIrq, Machine
from vtick.proto import apicdef as lapic_regs
from vtick.proto.pvclock import TscModel

SVR_ENABLED = 0x1FF


class GuestLikeMachine(Machine):
    def __init__(self, vcpus: int, tsc: TscModel, now: int, **kwargs: bool) -> None:
        super().__init__(vcpus, tsc, now, **kwargs)
        for lapic in self.lapics:
            lapic.mmio_write(lapic_regs.APIC_SPIV, 4, SVR_ENABLED, now)

    def take_actions(self) -> list[Action]:
        out: list[Action] = []
        while batch := super().take_actions():
            out.extend(batch)
            for action in batch:
                if isinstance(action, InjectIrq) and action.vector != NMI_VECTOR:
                    self.vcpus[action.vcpu].lapic.eoi()
            for state in self.vcpus:
                self.update_injection(state, self._now)
        return out
