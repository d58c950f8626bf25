"""VMI apic_read/apic_write, KVM_HC_SEND_IPI and PV EOI, driven with integer time."""

from __future__ import annotations

import pytest
from guestlike import GuestLikeMachine

from vtick.host.devices.pvapic import PvApic
from vtick.host.machine import InjectIrq, Machine
from vtick.proto import apicdef
from vtick.proto import messages as m
from vtick.proto.abi import Fault, Feature, Hypercall, KvmErrno, Msr
from vtick.proto.pvclock import TscModel

T0 = 1_000_000_000
ALL = Feature.VMI | Feature.PV_SEND_IPI | Feature.PV_EOI
READ, WRITE = Hypercall.VTICK_VMI_APIC_READ, Hypercall.VTICK_VMI_APIC_WRITE
SEND_IPI = Hypercall.KVM_HC_SEND_IPI
SVR_ON = 0x1FF


class Rig:
    def __init__(self, vcpus: int = 3, features: int = ALL, guest_eoi: bool = True) -> None:
        tsc = TscModel(tsc_khz=2_500_000, tsc_epoch=0, ktime_epoch=0)
        cls = GuestLikeMachine if guest_eoi else Machine
        self.machine = cls(vcpus, tsc, T0)
        if not guest_eoi:
            for lapic in self.machine.lapics:
                lapic.mmio_write(apicdef.APIC_SPIV, 4, SVR_ON, T0)
        for state in self.machine.vcpus:
            state.features = int(features)
        self.pv = PvApic(self.machine)
        self.seq = 0

    def exit(self, msg: m.Message, vcpu: int = 0, now: int = T0):
        self.seq += 1
        return self.machine.handle_exit(vcpu, self.seq, msg, now, False)

    def call(self, nr: int, args: list[int], vcpu: int = 0) -> int:
        return self.exit(m.ExitHypercall(nr=nr, args=args), vcpu).value


# ---------------------------------------------------------------------- VMI apic ops


def test_vmi_apic_read_goes_through_the_register_file():
    rig = Rig()
    assert rig.call(READ, [apicdef.APIC_LVR]) == 0x00050014  # KVM's LVR with 6 LVTs
    assert rig.call(WRITE, [apicdef.APIC_TASKPRI, 0x1234]) == 0
    assert rig.call(READ, [apicdef.APIC_TASKPRI]) == 0x34  # TPR keeps bits 7:0
    assert rig.pv.stats[0].apic_reads == 2
    assert rig.pv.stats[0].apic_writes == 1


def test_vmi_apic_eoi_by_hypercall_ends_the_interrupt():
    rig = Rig(guest_eoi=False)
    rig.machine.vcpus[0].raise_irq(0xEC, T0)
    assert [a.vector for a in rig.machine.take_actions() if isinstance(a, InjectIrq)] == [0xEC]
    assert rig.machine.lapics[0].isr == 1 << 0xEC
    assert rig.call(WRITE, [apicdef.APIC_EOI, 0]) == 0
    assert rig.machine.lapics[0].isr == 0


def test_vmi_bad_offset_is_einval_and_feature_gates():
    rig = Rig()
    assert rig.call(READ, [0x3F8]) == -KvmErrno.KVM_EINVAL
    assert rig.call(READ, []) == -KvmErrno.KVM_EINVAL
    assert rig.call(WRITE, [apicdef.APIC_TASKPRI]) == -KvmErrno.KVM_EINVAL
    off = Rig(features=Feature.PV_EOI)
    assert off.call(READ, [apicdef.APIC_LVR]) == -KvmErrno.KVM_ENOSYS
    assert off.call(WRITE, [apicdef.APIC_TASKPRI, 0]) == -KvmErrno.KVM_ENOSYS


# ---------------------------------------------------------------------- PV send-IPI


def injected(rig: Rig) -> list[tuple[int, int]]:
    return [(a.vcpu, a.vector) for a in rig.machine.take_actions() if isinstance(a, InjectIrq)]


def test_pv_ipi_min_beyond_max_apic_id_delivers_to_nobody():
    """kvm-unit-tests x86/apic.c test_pv_ipi: a0=0xFFFFFFFF, a1=0, min=0xFFFFFFFF, icr=0."""
    rig = Rig()
    assert rig.call(SEND_IPI, [0xFFFF_FFFF, 0, 0xFFFF_FFFF, 0]) == 0
    assert injected(rig) == []


def test_pv_ipi_bitmap_reaches_each_named_apic_id_once():
    rig = Rig()
    assert rig.call(SEND_IPI, [0b110, 0, 0, apicdef.DeliveryMode.FIXED | 0xF1]) == 2
    assert sorted(injected(rig)) == [(1, 0xF1), (2, 0xF1)]
    assert rig.pv.stats[0].send_ipi_delivered == 2


def test_pv_ipi_high_word_covers_the_next_64_ids():
    rig = Rig()
    lapic = rig.machine.lapics[2]
    lapic.mmio_write(apicdef.APIC_ID, 4, 70 << 24, T0)  # xAPIC ID is writable
    assert lapic.apic_id == 70
    assert rig.call(SEND_IPI, [0, 1 << 6, 0, 0xF2]) == 1
    assert injected(rig) == [(2, 0xF2)]
    assert rig.call(SEND_IPI, [0, 1 << 6, 1, 0xF2]) == 0  # min=1: bit 6 of a1 is ID 71


def test_pv_ipi_nmi_delivery_mode():
    rig = Rig()
    assert rig.call(SEND_IPI, [0b10, 0, 0, apicdef.DeliveryMode.NMI]) == 1
    assert injected(rig) == [(1, 2)]


@pytest.mark.parametrize("bad", [apicdef.APIC_DEST_LOGICAL, apicdef.APIC_DEST_SELF, 3 << 18])
def test_pv_ipi_refuses_logical_or_shorthand_icr(bad):
    rig = Rig()
    assert rig.call(SEND_IPI, [0b10, 0, 0, bad | 0xF1]) == -KvmErrno.KVM_EINVAL
    assert injected(rig) == []


def test_pv_ipi_needs_the_feature_and_four_arguments():
    assert Rig(features=Feature.VMI).call(SEND_IPI, [1, 0, 0, 0xF1]) == -KvmErrno.KVM_ENOSYS
    assert Rig().call(SEND_IPI, [1, 0, 0]) == -KvmErrno.KVM_EINVAL


# ---------------------------------------------------------------------- PV EOI


def enable_pv_eoi(rig: Rig, vcpu: int = 0) -> None:
    result = rig.exit(m.ExitMsrWrite(msr=Msr.MSR_KVM_PV_EOI_EN, value=0x1000 | 1), vcpu)
    assert result.fault == Fault.NONE


def test_pv_eoi_msr_gating_and_reserved_bit():
    rig = Rig(features=Feature.VMI)
    res = rig.exit(m.ExitMsrWrite(msr=Msr.MSR_KVM_PV_EOI_EN, value=1))
    assert res.fault == Fault.GP
    rig = Rig()
    assert rig.exit(m.ExitMsrWrite(msr=Msr.MSR_KVM_PV_EOI_EN, value=0b11)).fault == Fault.GP
    enable_pv_eoi(rig)
    assert rig.exit(m.ExitMsrRead(msr=Msr.MSR_KVM_PV_EOI_EN)).value == 0x1001
    assert rig.machine.vcpus[0].pv_eoi_enabled


def test_pv_eoi_flag_set_when_safe_and_eoi_done_on_the_next_exit():
    rig = Rig(guest_eoi=False)
    enable_pv_eoi(rig)
    state, lapic = rig.machine.vcpus[0], rig.machine.lapics[0]
    state.raise_irq(0xEC, T0)
    (inj,) = rig.machine.take_actions()
    assert isinstance(inj, InjectIrq)
    assert inj.pv_eoi
    # a second timer tick while the first is in service waits in IRR
    state.raise_irq(0xEC, T0 + 10)
    assert rig.machine.take_actions() == []
    assert lapic.irr == 1 << 0xEC
    # the vCPU cleared the flag and reports it on its next exit (here a HLT)
    rig.exit(m.ExitHlt(pv_eoi=True))
    assert state.pv_eois == 1
    (again,) = [a for a in rig.machine.take_actions() if isinstance(a, InjectIrq)]
    assert again.vector == 0xEC
    assert not again.pv_eoi or state.pv_eoi_vector == 0xEC


def test_pv_eoi_not_offered_while_another_interrupt_is_pending():
    rig = Rig(guest_eoi=False)
    enable_pv_eoi(rig)
    state = rig.machine.vcpus[0]
    state.lapic.accept_irq(0x31, now=T0)  # lower class: stays in IRR behind 0xEC
    state.raise_irq(0xEC, T0)
    actions = [a for a in rig.machine.take_actions() if isinstance(a, InjectIrq)]
    assert [a.vector for a in actions] == [0xEC]
    assert not actions[0].pv_eoi
    assert state.pv_eoi_vector is None


def test_pv_eoi_report_without_a_flag_is_counted_and_ignored():
    rig = Rig(guest_eoi=False)
    enable_pv_eoi(rig)
    rig.exit(m.ExitHlt(pv_eoi=True))
    assert rig.machine.faults["pv_eoi without a flag set"] == 1
    assert rig.machine.vcpus[0].pv_eois == 0


def test_pv_eoi_disabled_vcpu_never_gets_the_flag():
    rig = Rig(guest_eoi=False)
    rig.machine.vcpus[0].raise_irq(0xEC, T0)
    (inj,) = rig.machine.take_actions()
    assert isinstance(inj, InjectIrq)
    assert not inj.pv_eoi
