"""Paravirtual APIC paths: VMI's apic_read/apic_write, KVM's PV send-IPI and PV EOI.

Three ways a guest avoids the cost of an emulated APIC access (reference section 7):

* **VMI apic_read / apic_write** (``VTICK_VMI_APIC_READ``/``WRITE``): the APIC model is
  kept, but a register access is a hypercall instead of an MMIO trap plus instruction
  emulation; the access goes through the same register-level path as KVM's
  ``kvm_lapic_reg_read``/``write``.  A bad offset answers ``-KVM_EINVAL`` (a hypercall
  cannot raise #GP the way an MSR access does).
* **PV send-IPI** (``KVM_HC_SEND_IPI`` = 10): one exit carries a 128-bit destination
  bitmap.  a0/a1 = bitmap low/high (bit n of a0 is APIC ID ``min + n``, bit n of a1 is
  ``min + 64 + n``: the 64-bit guest's cluster size), a2 = ``min``, a3 = ICR.  An ICR with
  a destination-mode or shorthand bit set is ``-KVM_EINVAL``; the vector, delivery mode,
  level and trigger come from the ICR.  Returns the number of vCPUs the IPI was delivered
  to (0 when ``min`` is beyond every APIC ID, as kvm-unit-tests' test_pv_ipi checks).
* **PV EOI** (``MSR_KVM_PV_EOI_EN``): bit 0 enables, bit 1 is reserved (#GP), bits 63:2
  are the guest-physical address of the flag word.  Whether an injection carries the
  flag, and the EOI the host performs when the vCPU reports it cleared the flag, are
  decided by the Machine (``Machine.update_injection`` / ``handle_exit``), which owns
  injection; this device only manages enabling.

Each path is gated on its feature bit from the handshake: without it the hypercalls
answer ``-KVM_ENOSYS`` and the MSR raises #GP, as KVM does without the CPUID bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtick.host.faults import GuestFault
from vtick.host.machine import Machine, VcpuState
from vtick.proto import apicdef
from vtick.proto.abi import Feature, Hypercall, KvmErrno, Msr

__all__ = ["PvApic", "PvApicStats", "SEND_IPI_CLUSTER"]

#: IDs covered by one bitmap word of KVM_HC_SEND_IPI in a 64-bit guest
SEND_IPI_CLUSTER = 64
#: ICR bits KVM_HC_SEND_IPI refuses: logical destination mode and any shorthand
_SEND_IPI_BAD_ICR = apicdef.APIC_DEST_LOGICAL | apicdef.APIC_SHORT_MASK
_PV_EOI_RESERVED = 1 << 1
_U64 = (1 << 64) - 1


@dataclass(slots=True)
class PvApicStats:
    apic_reads: int = 0
    apic_writes: int = 0
    send_ipi_calls: int = 0
    send_ipi_delivered: int = 0


class PvApic:
    """Registers the VMI APIC hypercalls, KVM_HC_SEND_IPI and the PV EOI MSR."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.stats = [PvApicStats() for _ in machine.vcpus]
        # Migration (issue 13): nothing of its own to save.  The registers its VMI
        # hypercalls reach are the LAPIC's, and the PV EOI state (MSR, enabled, the
        # vector whose flag is set) lives in VcpuState, which saves it; ``stats`` are
        # counters.  Registered all the same so a migration can tell it is present.
        machine.devices["pvapic"] = self
        machine.register_hypercall(Hypercall.VTICK_VMI_APIC_READ, self.apic_read)
        machine.register_hypercall(Hypercall.VTICK_VMI_APIC_WRITE, self.apic_write)
        machine.register_hypercall(Hypercall.KVM_HC_SEND_IPI, self.send_ipi)
        machine.register_msr(
            Msr.MSR_KVM_PV_EOI_EN, Msr.MSR_KVM_PV_EOI_EN, self._eoi_msr_read,
            self._eoi_msr_write, "PV EOI",
        )  # fmt: skip

    # ------------------------------------------------------------------ VMI apic ops

    def apic_read(self, vcpu: VcpuState, args: list[int], now: int) -> int:
        if not vcpu.features & Feature.VMI:
            return -KvmErrno.KVM_ENOSYS
        if not args:
            return -KvmErrno.KVM_EINVAL
        try:
            value = vcpu.lapic.reg_read(args[0], now)
        except GuestFault:
            return -KvmErrno.KVM_EINVAL
        self.stats[vcpu.vcpu].apic_reads += 1
        return value

    def apic_write(self, vcpu: VcpuState, args: list[int], now: int) -> int:
        if not vcpu.features & Feature.VMI:
            return -KvmErrno.KVM_ENOSYS
        if len(args) < 2:
            return -KvmErrno.KVM_EINVAL
        try:
            vcpu.lapic.reg_write(args[0], args[1], now)
        except GuestFault:
            return -KvmErrno.KVM_EINVAL
        self.stats[vcpu.vcpu].apic_writes += 1
        return 0

    # ------------------------------------------------------------------ PV send-IPI

    def send_ipi(self, vcpu: VcpuState, args: list[int], now: int) -> int:
        if not vcpu.features & Feature.PV_SEND_IPI:
            return -KvmErrno.KVM_ENOSYS
        if len(args) < 4:
            return -KvmErrno.KVM_EINVAL
        low, high, first, icr = args[0], args[1], args[2], args[3]
        if icr & _SEND_IPI_BAD_ICR:
            return -KvmErrno.KVM_EINVAL
        self.stats[vcpu.vcpu].send_ipi_calls += 1
        vector = icr & apicdef.APIC_VECTOR_MASK
        mode = icr & apicdef.APIC_DM_MASK
        level = bool(icr & apicdef.APIC_INT_ASSERT)
        trigger_level = bool(icr & apicdef.APIC_INT_LEVELTRIG)
        by_id = {state.lapic.apic_id: state for state in self.machine.vcpus}
        delivered = 0
        bitmap = (low & _U64) | ((high & _U64) << SEND_IPI_CLUSTER)
        if self.machine.mutations.sometimes("drop-ipi"):
            bitmap = 0  # mutation: the IPI reaches no LAPIC (vtick.host.mutations)
        while bitmap:
            bit = (bitmap & -bitmap).bit_length() - 1
            bitmap &= bitmap - 1
            target = by_id.get(first + bit)
            if target is None:
                continue
            if not target.lapic.hw_enabled:
                self.machine.note_ipi(vcpu.vcpu, target.vcpu, vector, False)
                continue
            # Counted like KVM's kvm_apic_set_irq: a vector already pending in IRR is
            # still "delivered" (it coalesces; the LAPIC counts that separately).
            accepted = target.lapic.accept_irq(
                vector, delivery_mode=mode, level=level, trigger_level=trigger_level, now=now
            )
            self.machine.note_ipi(vcpu.vcpu, target.vcpu, vector, accepted)
            delivered += 1
        self.stats[vcpu.vcpu].send_ipi_delivered += delivered
        return delivered

    # ------------------------------------------------------------------ PV EOI enable

    def _eoi_msr_read(self, vcpu: VcpuState, msr: int, now: int) -> int:
        if not vcpu.features & Feature.PV_EOI:
            raise GuestFault(reason="PV EOI not negotiated")
        return vcpu.pv_eoi_msr

    def _eoi_msr_write(self, vcpu: VcpuState, msr: int, value: int, now: int) -> None:
        if not vcpu.features & Feature.PV_EOI:
            raise GuestFault(reason="PV EOI not negotiated")
        if value & _PV_EOI_RESERVED:
            raise GuestFault(reason="PV EOI MSR reserved bit 1")
        vcpu.pv_eoi_msr = value
        self.machine.set_pv_eoi(vcpu, enabled=bool(value & 1), now=now)
