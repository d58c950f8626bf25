"""Unit tests of the LAPIC model (reference ``lapic-kvm-linux.md`` sections 1-5), integer time.

One :class:`Lapic` per test with a fake port that records every call; the delivery
tests build several.  Timer tests drive ``on_timer`` exactly when the armed expiry is
reached (``run_until``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtick.host.faults import GuestFault
from vtick.host.lapic import Lapic, deliver, match_destinations, route
from vtick.proto import apicdef as r

T0 = 10_000_000  # host ns at which tests start
U64 = (1 << 64) - 1
FIXED = int(r.DeliveryMode.FIXED)


@dataclass
class FakePort:
    """Records what the LAPIC asks of its host.  Guest TSC = now * tsc_khz / 1e6."""

    tsc_khz: int = 1_000_000
    armed: int | None = None
    calls: list[tuple[object, ...]] = field(default_factory=list)
    ipis: list[tuple[int, int, int]] = field(default_factory=list)
    changed: int = 0

    def arm_timer(self, expiry_ns: int) -> None:
        self.armed = expiry_ns
        self.calls.append(("arm", expiry_ns))

    def cancel_timer(self) -> None:
        self.armed = None
        self.calls.append(("cancel",))

    def guest_tsc(self, now: int) -> int:
        return now * self.tsc_khz // 1_000_000

    def tsc_to_host_ns(self, tsc: int) -> int:
        return -(-tsc * 1_000_000 // self.tsc_khz)

    def send_ipi(self, source: int, icr_low: int, dest: int) -> None:
        self.ipis.append((source, icr_low, dest))

    def irq_state_changed(self) -> None:
        self.changed += 1


def make(vcpu_id: int = 0, **kw: object) -> tuple[Lapic, FakePort]:
    port = FakePort()
    tsc_khz = kw.pop("tsc_khz", None)
    if isinstance(tsc_khz, int):
        port.tsc_khz = tsc_khz
    lapic = Lapic(vcpu_id, port, **kw)
    return lapic, port


def enabled(vcpu_id: int = 0, *, x2apic_mode: bool = False, **kw: object) -> tuple[Lapic, FakePort]:
    """A LAPIC with SVR = 0x1FF, in xAPIC or x2APIC mode."""
    lapic, port = make(vcpu_id, **kw)
    if x2apic_mode:
        lapic.msr_write(r.MSR_IA32_APICBASE, lapic.apic_base | r.APICBASE_EXTD, T0)
    lapic.reg_write(r.APIC_SPIV, 0x1FF, T0)
    return lapic, port


def run_until(lapic: Lapic, port: FakePort, until: int) -> int:
    """Fire the host timer each time its expiry is reached, up to ``until``; count fires."""
    fires = 0
    while port.armed is not None and port.armed <= until:
        now, port.armed = port.armed, None
        lapic.on_timer(now)
        fires += 1
    return fires


def rd(lapic: Lapic, offset: int, now: int = T0) -> int:
    return lapic.mmio_read(offset, 4, now)


def wr(lapic: Lapic, offset: int, value: int, now: int = T0) -> None:
    lapic.mmio_write(offset, 4, value, now)


def snapshot(lapic: Lapic, now: int = T0) -> dict[int, int]:
    """Every register readable in xAPIC mode."""
    return {
        off: lapic.reg_read(off, now)
        for off, reg in r.REGISTERS.items()
        if reg.readable(lapic.x2apic_mode, False)
    }


# ====================================================================== register table


def test_register_table_x2apic_msrs() -> None:
    assert r.REGISTERS[r.APIC_ICR].msr == 0x830
    assert r.REGISTERS[r.APIC_SELF_IPI].msr == 0x83F
    assert r.REGISTERS[r.APIC_TMICT].msr == 0x838
    assert [r.REGISTERS[r.APIC_ISR + 0x10 * i].msr for i in range(8)] == list(range(0x810, 0x818))
    absent = {off for off, reg in r.REGISTERS.items() if not reg.x2apic_present}
    assert absent == {r.APIC_ARBPRI, r.APIC_RRR, r.APIC_DFR, r.APIC_ICR2}


def test_x2apic_ldr() -> None:
    assert r.x2apic_ldr(0) == 0x1
    assert r.x2apic_ldr(0x23) == (2 << 16) | (1 << 3)
    assert r.x2apic_ldr(0x1F) == (1 << 16) | 0x8000


# ====================================================================== reset state


@pytest.mark.parametrize("vcpu_id", [0, 1, 5])
def test_reset_state(vcpu_id: int) -> None:
    lapic, _ = make(vcpu_id)
    bsp = vcpu_id == 0
    assert lapic.apic_base == 0xFEE00000 | r.APICBASE_EN | (r.APICBASE_BSP if bsp else 0)
    assert lapic.hw_enabled
    assert not lapic.x2apic_mode
    assert not lapic.sw_enabled
    assert rd(lapic, r.APIC_ID) == vcpu_id << 24
    assert rd(lapic, r.APIC_LVR) == 0x00050014
    for off in (r.APIC_LVTT, r.APIC_LVTTHMR, r.APIC_LVTPC, r.APIC_LVT1, r.APIC_LVTERR):
        assert rd(lapic, off) == 0x10000
    assert rd(lapic, r.APIC_LVT0) == (0x700 if bsp else 0x10000)  # LINT0_REENABLED quirk
    assert rd(lapic, r.APIC_DFR) == 0xFFFFFFFF
    assert rd(lapic, r.APIC_SPIV) == 0xFF
    for off in (r.APIC_TASKPRI, r.APIC_ARBPRI, r.APIC_PROCPRI, r.APIC_LDR, r.APIC_ESR):
        assert rd(lapic, off) == 0
    for off in (r.APIC_ICR, r.APIC_ICR2, r.APIC_TDCR, r.APIC_TMICT, r.APIC_TMCCT):
        assert rd(lapic, off) == 0
    for i in range(8):
        for base in (r.APIC_ISR, r.APIC_TMR, r.APIC_IRR):
            assert rd(lapic, base + 0x10 * i) == 0


def test_reset_bsp_override_and_cmci() -> None:
    lapic, _ = make(3, bsp=True, cmci=True)
    assert lapic.apic_base & r.APICBASE_BSP
    assert rd(lapic, r.APIC_LVR) == 0x00060014
    assert rd(lapic, r.APIC_LVTCMCI) == 0x10000
    plain, _ = make(0, bsp=False)
    assert not plain.apic_base & r.APICBASE_BSP
    assert rd(plain, r.APIC_LVT0) == 0x10000
    assert rd(plain, r.APIC_LVTCMCI) == 0  # absent without CMCI: read fails


def test_init_reset_keeps_base_and_id() -> None:
    lapic, _ = enabled(1)
    wr(lapic, r.APIC_ID, 7 << 24)
    wr(lapic, r.APIC_TASKPRI, 0x30)
    lapic.msr_write(r.MSR_IA32_APICBASE, 0xFED00000 | r.APICBASE_EN, T0)
    lapic.reset(init_event=True)
    assert lapic.apic_base == 0xFED00000 | r.APICBASE_EN
    assert lapic.xapic_id == 7
    assert lapic.tpr == 0
    assert not lapic.sw_enabled


# ====================================================================== write masks


MASKS = [
    (r.APIC_TASKPRI, 0xFFFFFFFF, 0xFF),
    (r.APIC_LDR, 0xFFFFFFFF, 0xFF000000),
    (r.APIC_DFR, 0x00000000, 0x0FFFFFFF),
    (r.APIC_DFR, 0x5FFFFFFF, 0x5FFFFFFF),
    (r.APIC_SPIV, 0xFFFFFFFF, 0x3FF),
    (r.APIC_ICR2, 0xFFFFFFFF, 0xFF000000),
    (r.APIC_TDCR, 0xFFFFFFFF, 0xB),
    (r.APIC_ID, 0xFFFFFFFF, 0xFF000000),
    (r.APIC_LVTT, 0xFFFFFFFF, 0x710FF),
    (r.APIC_LVTTHMR, 0xFFFFFFFF, 0x117FF),
    (r.APIC_LVTPC, 0xFFFFFFFF, 0x117FF),
    (r.APIC_LVT0, 0xFFFFFFFF, 0x1F7FF),
    (r.APIC_LVT1, 0xFFFFFFFF, 0x1F7FF),
    (r.APIC_LVTERR, 0xFFFFFFFF, 0x110FF),
    (r.APIC_ICR, 0xFFF3FFFF & ~0xC0000, 0xFFF3EFFF & ~0xC0000),  # BUSY never stored
    (r.APIC_ESR, 0xFFFFFFFF, 0),  # accepted, ignored
]


@pytest.mark.parametrize(("offset", "value", "stored"), MASKS)
def test_write_masks(offset: int, value: int, stored: int) -> None:
    lapic, _ = enabled(1)
    wr(lapic, offset, value)
    assert rd(lapic, offset) == stored


def test_lvtt_mode_mask_without_tsc_deadline() -> None:
    lapic, _ = enabled(tsc_deadline=False)
    wr(lapic, r.APIC_LVTT, 0xFFFFFFFF)
    assert rd(lapic, r.APIC_LVTT) == 0x310FF  # only bit 17 of the mode field
    wr(lapic, r.APIC_LVTT, r.APIC_LVT_TIMER_TSCDEADLINE | 0x20)
    assert rd(lapic, r.APIC_LVTT) == 0x20  # TSC-deadline mode reads as one-shot


def test_directed_eoi_option() -> None:
    lapic, _ = enabled(directed_eoi=True)
    assert rd(lapic, r.APIC_LVR) == 0x01050014
    wr(lapic, r.APIC_SPIV, 0xFFFFFFFF)
    assert rd(lapic, r.APIC_SPIV) == 0x13FF


def test_sw_disable_masks_lvts_and_forces_mask() -> None:
    lapic, _ = enabled()
    for off in r.APIC_LVTS:
        wr(lapic, off, 0x40)
        assert rd(lapic, off) == 0x40
    wr(lapic, r.APIC_SPIV, 0xFF)
    for off in r.APIC_LVTS:
        assert rd(lapic, off) == 0x10040
    wr(lapic, r.APIC_LVTERR, 0x41)
    assert rd(lapic, r.APIC_LVTERR) == 0x10041  # forced masked while sw-disabled


# ====================================================================== read-only and unknown


def test_read_only_and_unknown_writes_dropped() -> None:
    lapic, port = enabled()
    lapic.accept_irq(0x45, now=T0)
    lapic.ack()
    lapic.accept_irq(0x66, trigger_level=True, now=T0)
    before = snapshot(lapic)
    dropped = lapic.stats.mmio_dropped
    read_only = [r.APIC_LVR, r.APIC_ARBPRI, r.APIC_PROCPRI, r.APIC_RRR, r.APIC_TMCCT]
    read_only += [
        base + 0x10 * i for base in (r.APIC_ISR, r.APIC_TMR, r.APIC_IRR) for i in range(8)
    ]
    unknown = [0x000, 0x010, 0x040, 0x050, 0x060, 0x070, 0x290, 0x2A0, 0x2B0, 0x2C0, 0x2D0]
    unknown += [0x2E0, 0x2F0, 0x3A0, 0x3B0, 0x3C0, 0x3D0, 0x3F0, 0x400, 0x800, 0xFF0]
    for off in read_only + unknown:
        wr(lapic, off, 0xFFFFFFFF)
    assert snapshot(lapic) == before
    assert lapic.stats.mmio_dropped == dropped + len(read_only + unknown)
    assert port.ipis == []  # SELF_IPI is x2APIC-only


def test_write_only_and_unknown_reads_zero() -> None:
    lapic, _ = enabled()
    for off in (r.APIC_EOI, r.APIC_RRR, r.APIC_SELF_IPI, 0x000, 0x2F0, 0x3A0, 0x400, 0xFFC):
        assert rd(lapic, off) == 0


def test_mmio_size_and_alignment() -> None:
    lapic, _ = enabled(0x12)
    wr(lapic, r.APIC_TASKPRI, 0x5A)
    assert lapic.mmio_read(r.APIC_ID + 3, 1, T0) == 0x12
    assert lapic.mmio_read(r.APIC_ID + 2, 2, T0) == 0x1200
    assert lapic.mmio_read(r.APIC_LVR, 2, T0) == 0x0014
    assert lapic.mmio_read(r.APIC_LVR + 2, 1, T0) == 0x05
    assert lapic.mmio_read(r.APIC_ID + 1, 4, T0) == 0  # (offset & 0xF) + len > 4
    assert lapic.mmio_read(r.APIC_ID + 4, 4, T0) == 0
    assert lapic.mmio_read(r.APIC_ID, 8, T0) == 0
    assert lapic.mmio_read(r.APIC_ID, 3, T0) == 0
    # writes: only 4 bytes at a 16-byte aligned offset
    lapic.mmio_write(r.APIC_TASKPRI, 2, 0x11, T0)
    lapic.mmio_write(r.APIC_TASKPRI, 1, 0x11, T0)
    lapic.mmio_write(r.APIC_TASKPRI + 4, 4, 0x11, T0)
    lapic.mmio_write(r.APIC_TASKPRI, 8, 0x11, T0)
    assert rd(lapic, r.APIC_TASKPRI) == 0x5A
    with pytest.raises(ValueError, match="outside the page"):
        lapic.mmio_read(0x1000, 4, T0)


def test_mmio_hole_when_disabled_or_x2apic() -> None:
    lapic, _ = enabled()
    lapic.msr_write(r.MSR_IA32_APICBASE, r.APIC_DEFAULT_BASE, T0)  # hw-disable
    assert lapic.claims(r.APIC_DEFAULT_BASE + r.APIC_LVR)
    for size in (1, 2, 4):
        assert lapic.mmio_read(r.APIC_LVR, size, T0) == (1 << (8 * size)) - 1
    wr(lapic, r.APIC_TASKPRI, 0x20)
    assert lapic.tpr == 0
    lapic.msr_write(r.MSR_IA32_APICBASE, r.APIC_DEFAULT_BASE | r.APICBASE_EN, T0)
    lapic.msr_write(r.MSR_IA32_APICBASE, r.APIC_DEFAULT_BASE | r.APICBASE_EN | r.APICBASE_EXTD, T0)
    assert rd(lapic, r.APIC_ID) == 0xFFFFFFFF
    wr(lapic, r.APIC_TASKPRI, 0x20)
    assert lapic.tpr == 0


def test_claims_follows_base() -> None:
    lapic, _ = make()
    assert lapic.claims(0xFEE00000)
    assert lapic.claims(0xFEE00FFF)
    assert not lapic.claims(0xFEE01000)
    assert not lapic.claims(0xFEDFFFFF)
    lapic.msr_write(r.MSR_IA32_APICBASE, 0xFED40000 | r.APICBASE_EN | r.APICBASE_BSP, T0)
    assert lapic.claims(0xFED40030)
    assert not lapic.claims(0xFEE00030)


# ====================================================================== x2APIC MSRs


def _x2apic_semantics(offset: int, cmci: bool) -> tuple[bool, bool]:
    """kvm-unit-tests lib/x86/apic.h get_x2apic_reg_semantics: (readable, writable)."""
    ro = {r.APIC_ID, r.APIC_LVR, r.APIC_PROCPRI, r.APIC_LDR, r.APIC_TMCCT}
    ro |= {base + 0x10 * i for base in (r.APIC_ISR, r.APIC_TMR, r.APIC_IRR) for i in range(8)}
    rw = {r.APIC_TASKPRI, r.APIC_SPIV, r.APIC_ESR, r.APIC_ICR, r.APIC_LVTT, r.APIC_LVTTHMR}
    rw |= {r.APIC_LVTPC, r.APIC_LVT0, r.APIC_LVT1, r.APIC_LVTERR, r.APIC_TMICT, r.APIC_TDCR}
    if cmci:
        rw.add(r.APIC_LVTCMCI)
    wo = {r.APIC_EOI, r.APIC_SELF_IPI}
    return offset in ro | rw, offset in rw | wo


def _gp(fn: object, *args: object) -> bool:
    try:
        fn(*args)  # type: ignore[operator]
    except GuestFault as exc:
        return exc.vector == 13
    return False


@pytest.mark.parametrize("cmci", [False, True])
def test_x2apic_msrs_like_msr_c(cmci: bool) -> None:
    """x86/msr.c __test_x2apic_msrs, for x2APIC off and on, every offset 0x000..0xFF0."""
    lapic, port = enabled(cmci=cmci)
    for offset in range(0, 0x1000, 0x10):
        msr = r.x2apic_msr(offset)
        assert _gp(lapic.msr_write, msr, 0, T0)
        assert _gp(lapic.msr_read, msr, T0)
        assert _gp(lapic.msr_write, msr, U64, T0)
    lapic.msr_write(r.MSR_IA32_APICBASE, lapic.apic_base | r.APICBASE_EXTD, T0)
    for offset in range(0, 0x1000, 0x10):
        msr = r.x2apic_msr(offset)
        readable, writable = _x2apic_semantics(offset, cmci)
        if not writable:
            assert _gp(lapic.msr_write, msr, 0, T0), hex(msr)
        if not readable:
            assert _gp(lapic.msr_read, msr, T0), hex(msr)
        if offset != r.APIC_ICR:
            assert _gp(lapic.msr_write, msr, U64, T0), hex(msr)
        if offset == r.APIC_SELF_IPI:
            for bad in (0x100, 0xFF00, 0xFF000000):
                assert _gp(lapic.msr_write, msr, bad, T0)
        if readable and writable:
            orig = lapic.msr_read(msr, T0)
            lapic.msr_write(msr, orig, T0)
            assert lapic.msr_read(msr, T0) == orig, hex(msr)
        elif writable:
            lapic.msr_write(msr, 0, T0)
        elif readable:
            assert lapic.msr_read(msr, T0) >> 32 == 0
    # msr.c's ICR round trip sent one IPI (vector 0 to APIC 0); SELF_IPI(0) another
    assert len(port.ipis) == 2


def test_x2apic_specifics() -> None:
    lapic, port = enabled(0x23, x2apic_mode=True)
    assert lapic.msr_read(0x802, T0) == 0x23  # x2APIC ID = vcpu id
    assert lapic.msr_read(0x80D, T0) == (2 << 16) | (1 << 3)  # derived LDR
    assert lapic.apic_id == 0x23
    assert _gp(lapic.msr_write, 0x828, 1, T0)  # ESR non-zero
    lapic.msr_write(0x828, 0, T0)
    for bit in (13, 16, 17, 20, 31):
        assert _gp(lapic.msr_write, 0x830, 1 << bit, T0)
    lapic.msr_write(0x830, (0x55 << 32) | r.APIC_ICR_BUSY | 0x4031, T0)
    assert lapic.msr_read(0x830, T0) == (0x55 << 32) | 0x4031  # BUSY never set
    assert port.ipis[-1] == (0x23, 0x4031, 0x55)
    lapic.msr_write(0x83F, 0x42, T0)
    assert port.ipis[-1] == (0x23, r.APIC_DEST_SELF | 0x42, 0)
    assert _gp(lapic.msr_read, 0x900, T0)  # not a LAPIC MSR
    lapic.msr_write(0x808, 0xFFFFFF30, T0)  # KVM masks TPR, no #GP on reserved bits
    assert lapic.msr_read(0x808, T0) == 0x30


# ====================================================================== APIC_BASE


BASE = r.APIC_DEFAULT_BASE
EN, EXTD = r.APICBASE_EN, r.APICBASE_EXTD
MODES = {"disabled": 0, "xapic": EN, "x2apic": EN | EXTD, "invalid": EXTD}
ALLOWED = {
    ("disabled", "disabled"),
    ("disabled", "xapic"),
    ("xapic", "disabled"),
    ("xapic", "xapic"),
    ("xapic", "x2apic"),
    ("x2apic", "disabled"),
    ("x2apic", "x2apic"),
}


@pytest.mark.parametrize("old", ["disabled", "xapic", "x2apic"])
@pytest.mark.parametrize("new", list(MODES))
def test_apic_base_transitions(old: str, new: str) -> None:
    lapic, _ = make(1)
    if old == "disabled":
        lapic.msr_write(r.MSR_IA32_APICBASE, BASE, T0)
    elif old == "x2apic":
        lapic.msr_write(r.MSR_IA32_APICBASE, BASE | EN | EXTD, T0)
    faults = _gp(lapic.msr_write, r.MSR_IA32_APICBASE, BASE | MODES[new], T0)
    assert faults == ((old, new) not in ALLOWED)
    expected = MODES[new] if not faults else MODES[old]
    assert lapic.apic_base == BASE | expected


def test_apic_base_host_initiated_may_leave_x2apic() -> None:
    lapic, _ = make(1)
    lapic.msr_write(r.MSR_IA32_APICBASE, BASE | EN | EXTD, T0)
    lapic.set_apic_base(BASE | EN, T0, host_initiated=True)
    assert not lapic.x2apic_mode
    assert lapic.hw_enabled


@pytest.mark.parametrize("bit", [0, 1, 7, 9, 40, 41, 63])
def test_apic_base_reserved_bits(bit: int) -> None:
    lapic, _ = make(0, maxphyaddr=40)
    assert _gp(lapic.msr_write, r.MSR_IA32_APICBASE, lapic.apic_base | (1 << bit), T0)


def test_apic_base_extd_without_x2apic_cpuid() -> None:
    lapic, _ = make(0, x2apic=False)
    assert _gp(lapic.msr_write, r.MSR_IA32_APICBASE, BASE | EN | EXTD, T0)
    assert _gp(lapic.msr_write, r.MSR_IA32_APICBASE, BASE | EN | EXTD | r.APICBASE_BSP, T0)


def test_apic_base_enable_resets_xapic_id() -> None:
    lapic, _ = enabled(3)
    wr(lapic, r.APIC_ID, 0x77 << 24)
    assert lapic.xapic_id == 0x77
    lapic.msr_write(r.MSR_IA32_APICBASE, BASE | EN, T0)  # no EN toggle: unchanged
    assert lapic.xapic_id == 0x77
    lapic.msr_write(r.MSR_IA32_APICBASE, BASE, T0)
    lapic.msr_write(r.MSR_IA32_APICBASE, BASE | EN, T0)
    assert lapic.xapic_id == 3


def test_x2apic_to_disabled_to_xapic() -> None:
    lapic, _ = enabled(2, x2apic_mode=True)
    lapic.msr_write(r.MSR_IA32_APICBASE, BASE, T0)
    assert _gp(lapic.msr_read, 0x802, T0)
    lapic.msr_write(r.MSR_IA32_APICBASE, BASE | EN, T0)
    assert rd(lapic, r.APIC_ID) == 2 << 24


# ====================================================================== register level


def test_reg_read_write_faults() -> None:
    lapic, _ = enabled()
    with pytest.raises(GuestFault):
        lapic.reg_read(0x040, T0)
    with pytest.raises(GuestFault):
        lapic.reg_read(r.APIC_EOI, T0)
    with pytest.raises(GuestFault):
        lapic.reg_write(r.APIC_LVR, 0, T0)
    with pytest.raises(GuestFault):
        lapic.reg_write(r.APIC_TASKPRI, 1 << 32, T0)
    with pytest.raises(GuestFault):
        lapic.reg_write(r.APIC_TASKPRI + 4, 0, T0)
    lapic.reg_write(r.APIC_TASKPRI, 0x20, T0)
    assert lapic.reg_read(r.APIC_TASKPRI, T0) == 0x20


def test_reg_level_x2apic_icr_is_64_bit() -> None:
    lapic, port = enabled(x2apic_mode=True)
    lapic.reg_write(r.APIC_ICR, (7 << 32) | 0x4040, T0)
    assert lapic.reg_read(r.APIC_ICR, T0) == (7 << 32) | 0x4040
    assert port.ipis == [(0, 0x4040, 7)]
    with pytest.raises(GuestFault):
        lapic.reg_write(r.APIC_ICR2, 0, T0)


# ====================================================================== ICR


def test_xapic_icr_sends_with_icr2_and_never_busy() -> None:
    lapic, port = enabled(4)
    wr(lapic, r.APIC_ICR2, 0x09 << 24)
    wr(lapic, r.APIC_ICR, r.APIC_ICR_BUSY | r.APIC_INT_ASSERT | 0x31)
    assert port.ipis == [(4, r.APIC_INT_ASSERT | 0x31, 0x09)]
    assert rd(lapic, r.APIC_ICR) & r.APIC_ICR_BUSY == 0
    assert rd(lapic, r.APIC_ICR2) == 0x09 << 24
    assert lapic.stats.ipis_sent == 1
    wr(lapic, r.APIC_ICR, 0x32)  # ICR2 is reused
    assert port.ipis[-1] == (4, 0x32, 0x09)


# ====================================================================== IRR / ISR / TMR / PPR / EOI


def test_accept_ack_eoi_cycle() -> None:
    lapic, port = enabled()
    assert lapic.accept_irq(0x31, now=T0)
    assert lapic.irr == 1 << 0x31
    assert rd(lapic, r.APIC_IRR + 0x10) == 1 << 0x11
    assert port.changed >= 1
    assert lapic.highest_deliverable() == 0x31
    assert lapic.ack() == 0x31
    assert lapic.irr == 0
    assert lapic.isr == 1 << 0x31
    assert rd(lapic, r.APIC_ISR + 0x10) == 1 << 0x11
    assert lapic.ppr == 0x30
    assert lapic.eoi() == 0x31
    assert lapic.isr == 0
    assert lapic.ppr == 0
    assert lapic.stats.eois == 1


def test_coalescing_counted() -> None:
    lapic, _ = enabled()
    assert lapic.accept_irq(0x40, now=T0)
    assert not lapic.accept_irq(0x40, now=T0)
    assert lapic.stats.coalesced == 1
    lapic.ack()
    assert lapic.accept_irq(0x40, now=T0)  # in ISR only: a new IRR bit is fine
    assert lapic.stats.coalesced == 1


def test_eoi_clears_highest_isr_and_empty_is_noop() -> None:
    lapic, _ = enabled()
    assert lapic.eoi() is None
    assert lapic.stats.eoi_noop == 1
    lapic.accept_irq(0x41, now=T0)
    lapic.ack()
    lapic.accept_irq(0x91, now=T0)
    assert lapic.ack() == 0x91  # preempts: class 9 > PPR 0x40
    assert lapic.ppr == 0x90
    wr(lapic, r.APIC_EOI, 0xDEAD)  # value ignored
    assert lapic.isr == 1 << 0x41
    wr(lapic, r.APIC_EOI, 0)
    assert lapic.isr == 0
    wr(lapic, r.APIC_EOI, 0)
    assert lapic.stats.eois == 2
    assert lapic.stats.eoi_noop == 2


def test_tmr_follows_trigger_and_level_deassert_dropped() -> None:
    lapic, _ = enabled()
    lapic.accept_irq(0x50, trigger_level=True, now=T0)
    assert lapic.tmr == 1 << 0x50
    assert rd(lapic, r.APIC_TMR + 0x20) == 1 << 0x10
    lapic.ack()
    lapic.eoi()
    assert lapic.stats.eoi_level == 1
    lapic.accept_irq(0x50, trigger_level=False, now=T0)
    assert lapic.tmr == 0
    assert not lapic.accept_irq(0x60, trigger_level=True, level=False, now=T0)
    assert lapic.stats.dropped == 1


def test_disabled_apic_drops_fixed_but_takes_nmi() -> None:
    lapic, _ = make()  # sw-disabled after reset
    assert not lapic.accept_irq(0x40, now=T0)
    assert not lapic.accept_irq(0x40, delivery_mode=r.DeliveryMode.LOWEST, now=T0)
    assert lapic.stats.dropped == 2
    assert lapic.accept_irq(0, delivery_mode=r.DeliveryMode.NMI, now=T0)
    assert lapic.take_nmi()
    lapic.reg_write(r.APIC_SPIV, 0x1FF, T0)
    lapic.accept_irq(0x40, now=T0)
    lapic.reg_write(r.APIC_SPIV, 0xFF, T0)
    assert lapic.highest_deliverable() is None  # nothing delivered while sw-disabled
    lapic.reg_write(r.APIC_SPIV, 0x1FF, T0)
    assert lapic.highest_deliverable() == 0x40


def test_tpr_blocks_and_cr8() -> None:
    lapic, _ = enabled()
    wr(lapic, r.APIC_TASKPRI, 0x45)
    lapic.accept_irq(0x4F, now=T0)
    assert lapic.highest_deliverable() is None  # class 4 <= PPR 0x45
    assert rd(lapic, r.APIC_PROCPRI) == 0x45
    lapic.set_cr8(3)
    assert lapic.tpr == 0x30
    assert lapic.cr8 == 3
    assert lapic.highest_deliverable() == 0x4F
    # the highest IRR vector alone decides (a lower deliverable one does not leak past it)
    wr(lapic, r.APIC_TASKPRI, 0x50)
    lapic.accept_irq(0x21, now=T0)
    assert lapic.highest_deliverable() is None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("irq"), st.integers(16, 255), st.booleans()),
            st.tuples(st.just("ack"), st.just(0), st.just(False)),
            st.tuples(st.just("eoi"), st.just(0), st.just(False)),
            st.tuples(st.just("tpr"), st.integers(0, 255), st.just(False)),
        ),
        max_size=60,
    )
)
def test_irr_isr_ppr_against_reference(ops: list[tuple[str, int, bool]]) -> None:
    """Invariant 5 against a set-based reference model of section 5."""
    lapic, _ = enabled()
    irr: set[int] = set()
    isr: set[int] = set()
    tmr: set[int] = set()
    tpr = 0
    coalesced = 0

    def ppr() -> int:
        isrv = max(isr, default=0)
        return tpr if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0

    def deliverable() -> int | None:
        if not irr:
            return None
        v = max(irr)
        return v if (v & 0xF0) > ppr() else None

    for op, arg, level in ops:
        if op == "irq":
            if level:
                tmr.add(arg)
            else:
                tmr.discard(arg)
            if arg in irr:
                coalesced += 1
            assert lapic.accept_irq(arg, trigger_level=level, now=T0) == (arg not in irr)
            irr.add(arg)
        elif op == "ack":
            v = deliverable()
            assert lapic.ack() == v
            if v is not None:
                irr.discard(v)
                isr.add(v)
        elif op == "eoi":
            v = max(isr, default=None)
            assert lapic.eoi() == v
            if v is not None:
                isr.discard(v)
        else:
            tpr = arg
            wr(lapic, r.APIC_TASKPRI, arg)
        assert lapic.irr == sum(1 << v for v in irr)
        assert lapic.isr == sum(1 << v for v in isr)
        assert lapic.tmr == sum(1 << v for v in tmr)
        assert lapic.ppr == ppr() == rd(lapic, r.APIC_PROCPRI)
        assert lapic.highest_deliverable() == deliverable()
    assert lapic.stats.coalesced == coalesced


def test_nmi_pending_limits() -> None:
    lapic, _ = enabled()
    nmi = r.DeliveryMode.NMI
    for _ in range(5):
        lapic.accept_irq(0, delivery_mode=nmi, now=T0)
    assert lapic.nmi_pending == 2
    assert lapic.stats.nmi == 5
    assert lapic.stats.nmi_dropped == 3
    assert lapic.take_nmi()
    assert not lapic.take_nmi()  # blocked while the handler runs
    lapic.accept_irq(0, delivery_mode=nmi, now=T0)
    assert lapic.nmi_pending == 1  # limit 1 while in the handler
    lapic.nmi_iret()
    assert lapic.take_nmi()
    lapic.nmi_iret()
    assert not lapic.take_nmi()


def test_init_sipi_smi_kick_extint() -> None:
    lapic, _ = enabled()
    init, sipi = r.DeliveryMode.INIT, r.DeliveryMode.STARTUP
    assert not lapic.accept_irq(0, delivery_mode=init, trigger_level=True, level=False, now=T0)
    assert lapic.accept_irq(0, delivery_mode=init, now=T0)
    assert lapic.take_init()
    assert not lapic.take_init()
    assert lapic.accept_irq(0x9A, delivery_mode=sipi, now=T0)
    assert lapic.take_sipi() == 0x9A
    assert lapic.take_sipi() is None
    assert lapic.accept_irq(0, delivery_mode=r.DeliveryMode.SMI, now=T0)
    assert lapic.smi_pending
    assert lapic.accept_irq(0, delivery_mode=r.DeliveryMode.REMRD, now=T0)
    assert lapic.pv_unhalted
    assert not lapic.accept_irq(0x30, delivery_mode=r.DeliveryMode.EXTINT, now=T0)
    s = lapic.stats
    assert (s.init, s.sipi, s.smi, s.kicks) == (1, 1, 1, 1)


# ====================================================================== timer: one-shot


def oneshot(lapic: Lapic, vector: int = 0xEC, tdcr: int = 0xB) -> None:
    wr(lapic, r.APIC_LVTT, vector)
    wr(lapic, r.APIC_TDCR, tdcr)


def test_oneshot_arm_fire_and_tmcct() -> None:
    lapic, port = enabled()
    oneshot(lapic)
    wr(lapic, r.APIC_TMICT, 1000, T0)
    assert port.armed == T0 + 1000
    assert rd(lapic, r.APIC_TMCCT, T0) == 0  # KVM edge: remaining == period => mod 0
    assert rd(lapic, r.APIC_TMCCT, T0 + 1) == 999
    assert rd(lapic, r.APIC_TMCCT, T0 + 400) == 600
    assert rd(lapic, r.APIC_TMCCT, T0 + 999) == 1
    assert run_until(lapic, port, T0 + 999) == 0
    assert run_until(lapic, port, T0 + 1000) == 1
    assert lapic.irr == 1 << 0xEC
    assert rd(lapic, r.APIC_TMCCT, T0 + 1000) == 0
    assert rd(lapic, r.APIC_TMICT, T0 + 1000) == 1000
    assert port.armed is None
    assert lapic.stats.timer_fires == 1


def test_tmcct_uses_divisor_and_bus_cycle() -> None:
    lapic, port = enabled(apic_bus_cycle_ns=10)
    oneshot(lapic, tdcr=0x1)  # divide by 4
    wr(lapic, r.APIC_TMICT, 100, T0)
    assert port.armed == T0 + 100 * 10 * 4
    assert rd(lapic, r.APIC_TMCCT, T0 + 45) == (4000 - 45) // 40
    assert rd(lapic, r.APIC_TMCCT, T0 + 3999) == 0


def test_tmict_zero_stops() -> None:
    lapic, port = enabled()
    oneshot(lapic)
    wr(lapic, r.APIC_TMICT, 1000, T0)
    wr(lapic, r.APIC_TMICT, 0, T0 + 10)
    assert port.armed is None
    assert port.calls[-1] == ("cancel",)
    assert rd(lapic, r.APIC_TMCCT, T0 + 20) == 0
    assert run_until(lapic, port, T0 + 10_000) == 0


def test_tmict_rewrite_restarts() -> None:
    lapic, port = enabled()
    oneshot(lapic)
    wr(lapic, r.APIC_TMICT, 1000, T0)
    wr(lapic, r.APIC_TMICT, 500, T0 + 900)
    assert port.armed == T0 + 1400
    assert run_until(lapic, port, T0 + 1400) == 1


def test_spurious_on_timer_ignored() -> None:
    lapic, port = enabled()
    lapic.on_timer(T0)
    oneshot(lapic)
    wr(lapic, r.APIC_TMICT, 1000, T0)
    lapic.on_timer(T0 + 10)  # early
    assert lapic.stats.timer_spurious == 2
    assert lapic.irr == 0


# ====================================================================== timer: periodic


def periodic(lapic: Lapic, vector: int = 0xEC, tdcr: int = 0xB) -> None:
    wr(lapic, r.APIC_LVTT, r.APIC_LVT_TIMER_PERIODIC | vector)
    wr(lapic, r.APIC_TDCR, tdcr)


def test_periodic_drift_free() -> None:
    lapic, port = enabled()
    periodic(lapic)
    wr(lapic, r.APIC_TMICT, 300_000, T0)
    P = 300_000
    for n in range(1, 6):
        late = 7_000 * n  # the host runs the callback late, by less than a period
        now = T0 + n * P + late
        assert port.armed == T0 + n * P
        lapic.on_timer(now)
        assert lapic.ack() == 0xEC
        assert rd(lapic, r.APIC_TMCCT, now) == (T0 + (n + 1) * P - now)
        lapic.eoi()
    assert port.armed == T0 + 6 * P  # still on the original grid
    assert lapic.stats.timer_fires == 5
    assert lapic.stats.coalesced == 0


def test_periodic_missed_periods_coalesced() -> None:
    lapic, port = enabled()
    periodic(lapic)
    P = 300_000
    wr(lapic, r.APIC_TMICT, P, T0)
    now = T0 + 4 * P + P // 2  # host was away for 3.5 periods past the first expiry
    lapic.on_timer(now)
    assert lapic.stats.timer_fires == 1
    assert lapic.irr == 1 << 0xEC
    assert lapic.stats.timer_missed_periods == 3
    assert port.armed == now + P  # no catch-up burst


def test_periodic_unacked_ticks_coalesce_in_irr() -> None:
    lapic, port = enabled()
    periodic(lapic)
    wr(lapic, r.APIC_TMICT, 300_000, T0)
    assert run_until(lapic, port, T0 + 3 * 300_000) == 3
    assert lapic.stats.coalesced == 2
    assert lapic.irr == 1 << 0xEC


def test_periodic_min_period_clamp() -> None:
    lapic, port = enabled()
    periodic(lapic)
    wr(lapic, r.APIC_TMICT, 1000, T0)
    assert lapic.timer_period_ns == 200_000
    assert port.armed == T0 + 200_000
    assert lapic.stats.timer_period_clamped == 1
    # TMCCT derives from the clamped period (KVM)
    assert rd(lapic, r.APIC_TMCCT, T0 + 100) == 199_900
    # one-shot is not clamped
    oneshot(lapic)
    wr(lapic, r.APIC_TMICT, 1000, T0)
    assert port.armed == T0 + 1000
    # configurable
    lapic2, port2 = enabled(min_timer_period_ns=50)
    periodic(lapic2)
    wr(lapic2, r.APIC_TMICT, 100, T0)
    assert port2.armed == T0 + 100


def test_periodic_masked_lvtt_drops_tick_timer_keeps_running() -> None:
    lapic, port = enabled()
    periodic(lapic)
    wr(lapic, r.APIC_TMICT, 300_000, T0)
    wr(lapic, r.APIC_LVTT, r.APIC_LVT_TIMER_PERIODIC | r.APIC_LVT_MASKED | 0xEC)
    assert run_until(lapic, port, T0 + 600_000) == 2
    assert lapic.irr == 0
    assert lapic.stats.timer_ticks_masked == 2
    assert port.armed == T0 + 900_000
    wr(lapic, r.APIC_LVTT, r.APIC_LVT_TIMER_PERIODIC | 0xEC)
    assert run_until(lapic, port, T0 + 900_000) == 1
    assert lapic.irr == 1 << 0xEC


def test_sw_disable_keeps_timer_running_masked() -> None:
    lapic, port = enabled()
    periodic(lapic)
    wr(lapic, r.APIC_TMICT, 300_000, T0)
    wr(lapic, r.APIC_SPIV, 0xFF)
    assert port.armed == T0 + 300_000
    assert run_until(lapic, port, T0 + 300_000) == 1
    assert lapic.stats.timer_ticks_masked == 1
    assert lapic.irr == 0


# ====================================================================== timer: TDCR, modes


def test_tdcr_change_rescales_remaining() -> None:
    lapic, port = enabled()
    oneshot(lapic, tdcr=0xB)  # divide by 1
    wr(lapic, r.APIC_TMICT, 1000, T0)
    wr(lapic, r.APIC_TDCR, 0x0, T0 + 400)  # divide by 2: 600 ns left become 1200
    assert port.armed == T0 + 400 + 1200
    assert lapic.timer_period_ns == 2000
    assert rd(lapic, r.APIC_TMCCT, T0 + 400) == 600
    wr(lapic, r.APIC_TDCR, 0x4, T0 + 500)  # bit 2 ignored: same divisor, nothing moves
    assert port.armed == T0 + 1600
    assert run_until(lapic, port, T0 + 1600) == 1


def test_tdcr_change_after_oneshot_expired_does_nothing() -> None:
    """DEVIATION from KVM (which would re-fire the expired one-shot)."""
    lapic, port = enabled()
    oneshot(lapic)
    wr(lapic, r.APIC_TMICT, 1000, T0)
    run_until(lapic, port, T0 + 1000)
    wr(lapic, r.APIC_TDCR, 0x3, T0 + 2000)
    assert port.armed is None
    assert lapic.stats.timer_fires == 1


def test_tdcr_change_periodic_rescales_and_clamps() -> None:
    lapic, port = enabled()
    periodic(lapic, tdcr=0x0)  # divide by 2
    wr(lapic, r.APIC_TMICT, 150_000, T0)  # 300 us
    wr(lapic, r.APIC_TDCR, 0xB, T0 + 100_000)  # divide by 1: period 150 us -> clamped 200 us
    assert lapic.timer_period_ns == 200_000
    assert port.armed == T0 + 100_000 + 100_000
    run_until(lapic, port, T0 + 200_000)
    assert port.armed == T0 + 400_000


def test_mode_switch_oneshot_periodic_keeps_countdown() -> None:
    lapic, port = enabled()
    oneshot(lapic)
    wr(lapic, r.APIC_TMICT, 400_000, T0)
    wr(lapic, r.APIC_LVTT, r.APIC_LVT_TIMER_PERIODIC | 0xEC, T0 + 100_000)
    assert port.armed == T0 + 400_000
    assert rd(lapic, r.APIC_TMICT) == 400_000
    assert rd(lapic, r.APIC_TMCCT, T0 + 100_000) == 300_000
    run_until(lapic, port, T0 + 400_000)
    assert port.armed == T0 + 800_000  # periodic decided at expiry
    wr(lapic, r.APIC_LVTT, 0xEC, T0 + 500_000)
    run_until(lapic, port, T0 + 2_000_000)
    assert port.armed is None
    assert lapic.stats.timer_fires == 2


def test_mode_switch_to_periodic_after_oneshot_expired_stays_zero() -> None:
    lapic, port = enabled()
    oneshot(lapic)
    wr(lapic, r.APIC_TMICT, 1000, T0)
    run_until(lapic, port, T0 + 1000)
    wr(lapic, r.APIC_LVTT, r.APIC_LVT_TIMER_PERIODIC | 0xEC, T0 + 2000)
    assert port.armed is None
    assert rd(lapic, r.APIC_TMCCT, T0 + 3000) == 0


def test_mode_switch_into_periodic_applies_clamp() -> None:
    lapic, port = enabled()
    oneshot(lapic)
    wr(lapic, r.APIC_TMICT, 1000, T0)
    wr(lapic, r.APIC_LVTT, r.APIC_LVT_TIMER_PERIODIC | 0xEC, T0 + 10)
    assert lapic.timer_period_ns == 200_000
    run_until(lapic, port, T0 + 1000)
    assert port.armed == T0 + 1000 + 200_000


@pytest.mark.parametrize("start", ["oneshot", "periodic"])
def test_mode_switch_into_and_out_of_tscdeadline(start: str) -> None:
    lapic, port = enabled()
    (oneshot if start == "oneshot" else periodic)(lapic)
    wr(lapic, r.APIC_TMICT, 500_000, T0)
    wr(lapic, r.APIC_LVTT, r.APIC_LVT_TIMER_TSCDEADLINE | 0xEC, T0 + 10)
    assert port.armed is None
    assert rd(lapic, r.APIC_TMICT) == 0
    assert rd(lapic, r.APIC_TMCCT) == 0
    lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, port.guest_tsc(T0 + 50_000), T0 + 20)
    wr(lapic, r.APIC_LVTT, 0xEC, T0 + 30)
    assert port.armed is None
    assert lapic.tsc_deadline == 0
    assert lapic.msr_read(r.MSR_IA32_TSC_DEADLINE, T0) == 0


# ====================================================================== timer: TSC deadline


def tscdl(lapic: Lapic) -> None:
    wr(lapic, r.APIC_LVTT, r.APIC_LVT_TIMER_TSCDEADLINE | 0xEF)


def test_tscdeadline_arm_fire_reads_zero_after() -> None:
    lapic, port = enabled(tsc_khz=2_500_000)
    tscdl(lapic)
    deadline = port.guest_tsc(T0) + 2_501  # 1000.4 ns away
    lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, deadline, T0)
    assert port.armed == T0 + 1001  # first ns at which TSC >= deadline
    assert lapic.msr_read(r.MSR_IA32_TSC_DEADLINE, T0) == deadline
    assert rd(lapic, r.APIC_TMCCT) == 0
    run_until(lapic, port, T0 + 1001)
    assert lapic.irr == 1 << 0xEF
    assert port.guest_tsc(T0 + 1001) >= deadline
    assert lapic.msr_read(r.MSR_IA32_TSC_DEADLINE, T0 + 1001) == 0


def test_tscdeadline_zero_disarms_and_rewrite_replaces() -> None:
    lapic, port = enabled()
    tscdl(lapic)
    lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, port.guest_tsc(T0) + 5000, T0)
    lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, port.guest_tsc(T0) + 9000, T0)
    assert port.armed == T0 + 9000
    lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, 0, T0 + 1)
    assert port.armed is None
    assert run_until(lapic, port, T0 + 100_000) == 0
    assert lapic.irr == 0


@pytest.mark.parametrize("delta", [0, -1, -1_000_000])
def test_tscdeadline_past_fires_during_write(delta: int) -> None:
    lapic, port = enabled()
    tscdl(lapic)
    lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, port.guest_tsc(T0) + delta, T0)
    assert lapic.irr == 1 << 0xEF
    assert port.armed is None
    assert lapic.msr_read(r.MSR_IA32_TSC_DEADLINE, T0) == 0


def test_tscdeadline_ignored_outside_mode_and_tmict_ignored_inside() -> None:
    lapic, port = enabled()
    lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, port.guest_tsc(T0) + 5000, T0)
    assert port.armed is None
    assert lapic.msr_read(r.MSR_IA32_TSC_DEADLINE, T0) == 0
    tscdl(lapic)
    wr(lapic, r.APIC_TMICT, 1000, T0)
    assert rd(lapic, r.APIC_TMICT) == 0
    assert port.armed is None
    lapic.msr_write(r.MSR_IA32_APICBASE, r.APIC_DEFAULT_BASE, T0)  # hw-disabled
    lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, port.guest_tsc(T0) + 5000, T0)
    assert port.armed is None


def test_tscdeadline_masked_lvtt_still_clears() -> None:
    lapic, port = enabled()
    wr(lapic, r.APIC_LVTT, r.APIC_LVT_TIMER_TSCDEADLINE | r.APIC_LVT_MASKED | 0xEF)
    lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, port.guest_tsc(T0) + 100, T0)
    run_until(lapic, port, T0 + 100)
    assert lapic.irr == 0
    assert lapic.stats.timer_ticks_masked == 1
    assert lapic.tsc_deadline == 0


# ====================================================================== timer advance


def test_timer_advance_arms_early_and_holds_injection() -> None:
    lapic, port = enabled(timer_advance=True)
    tscdl(lapic)
    assert lapic.timer_advance_ns == 1000
    deadline = port.guest_tsc(T0) + 50_000
    lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, deadline, T0)
    assert port.armed == T0 + 50_000 - 1000
    run_until(lapic, port, T0 + 49_000)
    assert lapic.irr == 1 << 0xEF
    assert lapic.inject_not_before == T0 + 50_000  # the host waits instead of busy-waiting
    # fired 1000 cycles early (1 GHz TSC): the advance shrinks by 1000 ns / 8
    assert lapic.timer_advance_ns == 1000 - 125
    assert lapic.stats.timer_advance_adjustments == 1
    assert lapic.ack() == 0xEF
    assert lapic.inject_not_before is None


def test_timer_advance_adapts_to_host_latency() -> None:
    lapic, port = enabled(timer_advance=True)
    tscdl(lapic)
    latency = 3_000  # the host always runs the callback 3 us after the armed expiry
    now = T0
    for _ in range(60):
        deadline = port.guest_tsc(now) + 100_000
        lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, deadline, now)
        assert port.armed is not None
        now = port.armed + latency
        port.armed = None
        lapic.on_timer(now)
        lapic.ack()
        lapic.eoi()
    # converges to within the 100-cycle dead band of the latency, never beyond the max
    assert abs(lapic.timer_advance_ns - latency) <= 100 + latency // 8
    assert 0 < lapic.timer_advance_ns <= 5000


@pytest.mark.parametrize(
    ("start", "delta", "expected"),
    [
        (1000, 99, 1000),  # below the dead band: ignored
        (1000, -99, 1000),
        (1000, 10_001, 1000),  # spike: ignored
        (1000, 800, 1100),  # late: + 800/8
        (1000, -800, 900),  # early: - 800/8
        (4990, 800, 1000),  # beyond the max: back to the initial value
        (50, -800, 1000),  # below zero (u32 underflow in KVM): initial value
    ],
)
def test_record_timer_latency(start: int, delta: int, expected: int) -> None:
    lapic, _ = enabled(timer_advance=True)  # 1 GHz TSC: 1 cycle == 1 ns
    lapic.timer_advance_ns = start
    lapic.record_timer_latency(delta)
    assert lapic.timer_advance_ns == expected


def test_timer_advance_deadline_inside_window_fires_now() -> None:
    lapic, port = enabled(timer_advance=True)
    tscdl(lapic)
    lapic.msr_write(r.MSR_IA32_TSC_DEADLINE, port.guest_tsc(T0) + 600, T0)
    assert port.armed is None
    assert lapic.irr == 1 << 0xEF
    assert lapic.inject_not_before == T0 + 600


def test_timer_advance_not_used_for_oneshot() -> None:
    lapic, port = enabled(timer_advance=True)
    oneshot(lapic)
    wr(lapic, r.APIC_TMICT, 10_000, T0)
    assert port.armed == T0 + 10_000


# ====================================================================== delivery


def group(n: int, *, x2apic_mode: bool = False) -> list[Lapic]:
    return [enabled(i, x2apic_mode=x2apic_mode)[0] for i in range(n)]


def icr(vector: int = 0x40, *, mode: int = FIXED, logical: bool = False, short: int = 0) -> int:
    return vector | mode | (r.APIC_DEST_LOGICAL if logical else 0) | short | r.APIC_INT_ASSERT


def test_shorthands() -> None:
    lapics = group(4)
    assert match_destinations(2, icr(short=r.APIC_DEST_SELF), 0, lapics) == [2]
    assert match_destinations(2, icr(short=r.APIC_DEST_ALLINC), 7, lapics) == [0, 1, 2, 3]
    assert match_destinations(2, icr(short=r.APIC_DEST_ALLBUT), 2, lapics) == [0, 1, 3]


def test_hw_disabled_targets_skipped() -> None:
    lapics = group(3)
    lapics[1].msr_write(r.MSR_IA32_APICBASE, r.APIC_DEFAULT_BASE, T0)
    assert match_destinations(0, icr(short=r.APIC_DEST_ALLINC), 0, lapics) == [0, 2]
    assert match_destinations(0, icr(), 0xFF, lapics) == [0, 2]


def test_physical_broadcast_depends_on_target_mode() -> None:
    lapics = group(2)
    mixed = [lapics[0], lapics[1], enabled(2, x2apic_mode=True)[0]]
    assert match_destinations(0, icr(), 0xFF, mixed) == [0, 1]
    assert match_destinations(0, icr(), 0xFFFFFFFF, mixed) == [2]
    assert match_destinations(0, icr(), 2, mixed) == [2]
    x2 = group(3, x2apic_mode=True)
    assert match_destinations(0, icr(), 0xFFFFFFFF, x2) == [0, 1, 2]
    assert match_destinations(0, icr(), 0xFF, x2) == []  # not a broadcast in x2APIC


def test_physical_xapic_ids_and_hotplug_rule() -> None:
    lapics = group(3)
    wr(lapics[2], r.APIC_ID, 0x10 << 24)
    assert match_destinations(0, icr(), 0x10, lapics) == [2]
    assert match_destinations(0, icr(), 2, lapics) == []  # xAPIC ID changed
    big = [enabled(i)[0] for i in (0, 300)]  # vCPU 300 in xAPIC mode
    assert match_destinations(0, icr(), 300, big) == [1]  # dest > 0xFF: x2APIC id


def test_physical_aliased_ids_all_receive() -> None:
    lapics = group(3)
    for lapic in lapics:
        wr(lapic, r.APIC_ID, 5 << 24)
    assert match_destinations(0, icr(), 5, lapics) == [0, 1, 2]


def test_logical_flat_cluster_and_bad_model() -> None:
    lapics = group(3)
    for lapic, ldr in zip(lapics, (0x01, 0x02, 0x0C), strict=True):
        wr(lapic, r.APIC_LDR, ldr << 24)
    assert match_destinations(0, icr(logical=True), 0x06, lapics) == [1, 2]
    for lapic, ldr in zip(lapics, (0x11, 0x12, 0x21), strict=True):
        wr(lapic, r.APIC_DFR, 0x0FFFFFFF)
        wr(lapic, r.APIC_LDR, ldr << 24)
    assert match_destinations(0, icr(logical=True), 0x13, lapics) == [0, 1]
    assert match_destinations(0, icr(logical=True), 0x21, lapics) == [2]
    assert match_destinations(0, icr(logical=True), 0xFF, lapics) == [0, 1, 2]  # broadcast
    wr(lapics[2], r.APIC_DFR, 0x5FFFFFFF)
    assert match_destinations(0, icr(logical=True), 0x21, lapics) == []


def test_logical_x2apic() -> None:
    lapics = [enabled(i, x2apic_mode=True)[0] for i in range(20)]
    # cluster 0 = ids 0..15, cluster 1 = ids 16..19
    assert match_destinations(0, icr(logical=True), 0x0000_0005, lapics) == [0, 2]
    assert match_destinations(0, icr(logical=True), 0x0001_000A, lapics) == [17, 19]
    assert match_destinations(0, icr(logical=True), 0x0002_FFFF, lapics) == []


def test_lowest_priority_vector_hashing() -> None:
    lapics = group(4)
    lp = int(r.DeliveryMode.LOWEST)
    for vector in (0x40, 0x41, 0x42, 0x43, 0x44):
        targets = match_destinations(0, icr(vector, mode=lp, short=r.APIC_DEST_ALLINC), 0, lapics)
        assert targets == [vector % 4]
    lapics[1].reg_write(r.APIC_SPIV, 0xFF, T0)  # sw-disabled: not a candidate
    # candidates [0, 2, 3]; 0x41 % 3 == 2
    assert match_destinations(0, icr(0x41, mode=lp, short=r.APIC_DEST_ALLINC), 0, lapics) == [3]


def test_lowest_priority_physical_broadcast_downgraded() -> None:
    lapics = group(3)
    lp = int(r.DeliveryMode.LOWEST)
    assert route(0, icr(0x40, mode=lp), 0xFF, lapics) == ([0, 1, 2], FIXED)
    assert deliver(0, icr(0x40, mode=lp), 0xFF, lapics, T0) == [0, 1, 2]


def test_deliver_passes_mode_level_trigger() -> None:
    lapics = group(2)
    trig = r.APIC_INT_LEVELTRIG
    assert deliver(0, icr(0x50) | trig, 1, lapics, T0) == [1]
    assert lapics[1].tmr == 1 << 0x50
    assert deliver(0, icr(0x50) | trig, 1, lapics, T0) == []  # coalesced
    assert lapics[1].stats.coalesced == 1
    nmi = 0x400 | r.APIC_INT_ASSERT
    assert deliver(1, nmi | r.APIC_DEST_ALLBUT, 0, lapics, T0) == [0]
    assert lapics[0].nmi_pending == 1
    deassert = r.APIC_INT_LEVELTRIG | int(r.DeliveryMode.INIT)
    assert deliver(0, deassert, 1, lapics, T0) == []  # INIT level de-assert


def test_non_ipi_broadcast_to_x2apic_target() -> None:
    """kvm_apic_mda: an MSI/IOAPIC 0xFF destination reaches x2APIC targets too."""
    lapics = [enabled(0)[0], enabled(1, x2apic_mode=True)[0]]
    assert match_destinations(None, icr(), 0xFF, lapics) == [0, 1]
    assert match_destinations(0, icr(), 0xFF, lapics) == [0]


def test_icr_write_routes_through_host() -> None:
    """End to end: an xAPIC ICR write reaches deliver() through the port."""
    ports: list[FakePort] = []
    lapics: list[Lapic] = []

    class Routed(FakePort):
        def send_ipi(self, source: int, icr_low: int, dest: int) -> None:
            super().send_ipi(source, icr_low, dest)
            deliver(source, icr_low, dest, lapics, T0)

    for i in range(3):
        port = Routed()
        ports.append(port)
        lapics.append(Lapic(i, port))
        lapics[i].reg_write(r.APIC_SPIV, 0x1FF, T0)
    wr(lapics[0], r.APIC_ICR2, 2 << 24)
    wr(lapics[0], r.APIC_ICR, r.APIC_INT_ASSERT | 0x61)
    assert lapics[2].irr == 1 << 0x61
    assert lapics[1].irr == 0
    wr(lapics[1], r.APIC_ICR, r.APIC_DEST_ALLBUT | 0x62)
    assert [bool(lapic.irr >> 0x62 & 1) for lapic in lapics] == [True, False, True]
