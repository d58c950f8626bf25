"""Host cases, suites ``lapic``, ``apicbase`` and ``x2apic``: the local APIC's registers.

The expected values are KVM's (``lapic-kvm-linux.md`` sections 1-2, the rules
``docs/protocol.md`` §7.8 adopts): reset values from ``kvm_lapic_reset``, write masks
and read/write permissions from ``proto/apicdef.py``'s register table, the x2APIC #GP
table that kvm-unit-tests' ``test_x2apic_msrs`` walks, and APIC_BASE transitions from
``kvm_set_apic_base``.  Register cases run on vCPU 1 when the host has two vCPUs (no BSP
quirks), else on vCPU 0.
"""

from __future__ import annotations

from collections.abc import Callable

from vtick.host.conformance import case as c
from vtick.host.conformance.lib import (
    APIC_BASE_MSR,
    TEST_VECTOR,
    Gen,
    apic_read,
    apic_write,
    enable_apic,
    enable_x2apic,
    eoi,
    exit_,
    injected,
    is_gp,
    rdmsr,
    session,
    wrmsr,
    x2_read,
    x2_write,
)
from vtick.proto import apicdef as r
from vtick.proto import messages as m

__all__ = ["CASES", "X2APIC_MSRS", "x2apic_access"]

CASES = c.Registry()
MUST, SHOULD, MAY = c.Level.MUST, c.Level.SHOULD, c.Level.MAY
LVR = r.lvr_value(cmci=False, directed_eoi=False)
U32 = 0xFFFF_FFFF


def _vcpu(ctx: c.Ctx) -> int:
    return 1 if ctx.vcpus >= 2 else 0


def _reset_value(name: str, vcpu: int) -> int:
    """``kvm_lapic_reset`` (reference section 1); vCPU 0 is the BSP."""
    bsp = vcpu == 0
    values = {
        "ID": vcpu << 24,
        "LVR": LVR,
        "TPR": 0,
        "APR": 0,
        "PPR": 0,
        "LDR": 0,
        "DFR": r.APIC_DFR_FLAT,
        "SVR": r.APIC_SPIV_RESET,
        "ESR": 0,
        "ICR": 0,
        "ICR2": 0,
        "LVT0": int(r.DeliveryMode.EXTINT) if bsp else r.APIC_LVT_RESET,
        "TMICT": 0,
        "TMCCT": 0,
        "TDCR": 0,
    }
    for lvt in ("LVTT", "LVTTHMR", "LVTPC", "LVT1", "LVTERR"):
        values[lvt] = r.APIC_LVT_RESET
    for i in range(r.APIC_VECTOR_WORDS):
        values[f"ISR{i}"] = values[f"TMR{i}"] = values[f"IRR{i}"] = 0
    return values[name]


def _reset_case(reg: r.Reg) -> Callable[[c.Ctx], Gen]:
    def script(ctx: c.Ctx) -> Gen:
        vcpu = _vcpu(ctx)
        yield from session(ctx, vcpu)
        value = yield from apic_read(ctx, vcpu, reg.offset)
        ctx.equal(
            f"{reg.name} ({reg.offset:#05x}) after reset, vCPU {vcpu}",
            _reset_value(reg.name, vcpu),
            value,
        )

    return script


for _reg in r.REGISTERS.values():
    if _reg.xapic_read and not _reg.cmci:
        CASES.add(
            f"lapic.reset.{_reg.name.lower()}",
            f"{_reg.name} reads its reset value",
            MUST,
            "protocol.md §7.8; SDM 10.4.7.1; KVM kvm_lapic_reset",
            _reset_case(_reg),
        )

#: registers whose xAPIC write is checked against the table's mask (value written,
#: expected read-back); ICR is left out (a write sends an IPI) and so is EOI
_MASKED = (
    "ID",
    "TPR",
    "LDR",
    "DFR",
    "SVR",
    "ICR2",
    "LVTT",
    "LVTTHMR",
    "LVTPC",
    "LVT0",
    "LVT1",
    "LVTERR",
    "TDCR",
    "ESR",
)


def _mask_case(reg: r.Reg) -> Callable[[c.Ctx], Gen]:
    def script(ctx: c.Ctx) -> Gen:
        vcpu = _vcpu(ctx)
        yield from session(ctx, vcpu)
        yield from enable_apic(ctx, vcpu)  # LVT writes are forced masked otherwise
        extra = r.lvtt_mode_mask(True) if reg.offset == r.APIC_LVTT else 0
        for value in (U32, 0):
            if reg.offset == r.APIC_SPIV and value == 0:
                continue  # would software-disable the APIC: see lapic.svr.disable
            yield from apic_write(ctx, vcpu, reg.offset, value)
            got = yield from apic_read(ctx, vcpu, reg.offset)
            expected = (value & (reg.write_mask | extra)) | reg.write_set
            ctx.equal(f"{reg.name}: write {value:#x}, read back", expected, got)

    return script


for _name in _MASKED:
    _reg = next(x for x in r.REGISTERS.values() if x.name == _name)
    CASES.add(
        f"lapic.write-mask.{_name.lower()}",
        f"{_name} keeps only its writable bits",
        MUST,
        "protocol.md §7.8; KVM kvm_lapic_reg_write",
        _mask_case(_reg),
    )

_READ_ONLY = ("LVR", "APR", "PPR", "ISR0", "TMR0", "IRR0", "TMCCT")


def _read_only_case(reg: r.Reg) -> Callable[[c.Ctx], Gen]:
    def script(ctx: c.Ctx) -> Gen:
        vcpu = _vcpu(ctx)
        yield from session(ctx, vcpu)
        yield from enable_apic(ctx, vcpu)
        before = yield from apic_read(ctx, vcpu, reg.offset)
        done = yield from apic_write(ctx, vcpu, reg.offset, U32)
        ctx.equal(f"{reg.name}: an MMIO write does not fault", 0, done.fault)
        after = yield from apic_read(ctx, vcpu, reg.offset)
        ctx.equal(f"{reg.name}: the write is dropped", before, after)

    return script


for _name in _READ_ONLY:
    _reg = next(x for x in r.REGISTERS.values() if x.name == _name)
    CASES.add(
        f"lapic.read-only.{_name.lower()}",
        f"an xAPIC write to {_name} is dropped",
        MUST,
        "protocol.md §7.8; KVM apic_mmio_write",
        _read_only_case(_reg),
    )


@CASES.case(
    "lapic.write-only.eoi", "an xAPIC read of EOI (write-only) reads 0", SHOULD, "protocol.md §7.8"
)
def read_eoi(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    for offset, name in ((r.APIC_EOI, "EOI"), (r.APIC_RRR, "RRR"), (0x040, "reserved 0x40")):
        done = yield from exit_(ctx, vcpu, m.ExitMmioRead(gpa=r.APIC_DEFAULT_BASE + offset, size=4))
        ctx.equal(f"{name}: reads 0, no fault", (0, 0), (done.value, done.fault))


@CASES.case(
    "lapic.mmio.narrow-read",
    "a 1-byte read returns that byte of the register",
    SHOULD,
    "protocol.md §7.8; KVM apic_mmio_read",
)
def narrow_read(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    value = yield from apic_read(ctx, vcpu, r.APIC_ID + 3, size=1)
    ctx.equal("byte 3 of ID (the xAPIC ID)", vcpu, value)
    value = yield from apic_read(ctx, vcpu, r.APIC_LVR + 2, size=2)
    ctx.equal("bytes 2..3 of LVR (max LVT entry)", LVR >> 16, value)


@CASES.case(
    "lapic.mmio.narrow-write",
    "a write other than 4 aligned bytes is dropped",
    SHOULD,
    "protocol.md §7.8; KVM apic_mmio_write",
)
def narrow_write(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_TASKPRI, 0x30, size=2)
    yield from apic_write(ctx, vcpu, r.APIC_TASKPRI + 1, 0x30, size=1)
    tpr = yield from apic_read(ctx, vcpu, r.APIC_TASKPRI)
    ctx.equal("TPR unchanged", 0, tpr)


@CASES.case("lapic.esr", "ESR accepts writes and reads 0", MUST, "protocol.md §7.8")
def esr(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_ESR, 0)
    value = yield from apic_read(ctx, vcpu, r.APIC_ESR)
    ctx.equal("ESR after a write", 0, value)


def _self_ipi(ctx: c.Ctx, vcpu: int, vector: int) -> Gen:
    """xAPIC ICR write with the self shorthand; returns the ExitDone."""
    return (yield from apic_write(ctx, vcpu, r.APIC_ICR, r.APIC_DEST_SELF | vector))


@CASES.case(
    "lapic.ppr",
    "PPR follows TPR and the highest vector in service",
    MUST,
    "protocol.md §7.8; SDM 10.8.3.1",
)
def ppr(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_TASKPRI, 0x25)
    value = yield from apic_read(ctx, vcpu, r.APIC_PROCPRI)
    ctx.equal("PPR = TPR with nothing in service", 0x25, value)
    done = yield from _self_ipi(ctx, vcpu, 0x45)
    ctx.check(
        "the self-IPI 0x45 is injected",
        bool(injected(done.during, 0x45)),
        "inject 0x45 before the reply",
        [c.describe(a.msg) for a in done.during if a.msg],
    )
    value = yield from apic_read(ctx, vcpu, r.APIC_PROCPRI)
    ctx.equal("PPR = class of the vector in service", 0x40, value)
    isr = yield from apic_read(ctx, vcpu, r.APIC_ISR + 0x20)
    ctx.equal("ISR word 2 has bit 5 (vector 0x45)", 1 << 5, isr)
    yield from eoi(ctx, vcpu)
    value = yield from apic_read(ctx, vcpu, r.APIC_PROCPRI)
    ctx.equal("PPR = TPR again after EOI", 0x25, value)


@CASES.case(
    "lapic.tpr.lower",
    "lowering TPR injects what it held back, before the write's reply",
    MUST,
    "protocol.md §4.2; SDM 10.8.3.1",
)
def tpr_lower(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_TASKPRI, 0x50)
    yield c.Mark(vcpu)
    yield from _self_ipi(ctx, vcpu, 0x45)
    held = yield c.Collect(vcpu, 50, (m.Inject,))
    ctx.check(
        "TPR 0x50 holds vector 0x45 back",
        not injected(held, 0x45),
        "no inject",
        [c.describe(a.msg) for a in held if a.msg],
    )
    irr = yield from apic_read(ctx, vcpu, r.APIC_IRR + 0x20)
    ctx.equal("it waits in IRR (word 2, bit 5)", 1 << 5, irr)
    done = yield from apic_write(ctx, vcpu, r.APIC_TASKPRI, 0)
    ctx.check(
        "lowering TPR injects 0x45 before the write's exit-reply",
        bool(injected(done.during, 0x45)),
        "inject 0x45, then exit-reply",
        "exit-reply first" if not injected(done.during) else done.during,
    )


@CASES.case(
    "lapic.eoi.highest",
    "EOI clears the highest vector in service",
    MUST,
    "protocol.md §7.8; SDM 10.8.5",
)
def eoi_highest(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from _self_ipi(ctx, vcpu, 0x45)
    yield from _self_ipi(ctx, vcpu, 0x55)  # a higher class nests
    isr = yield from apic_read(ctx, vcpu, r.APIC_ISR + 0x20)
    ctx.equal("0x45 and 0x55 in service", (1 << 5) | (1 << 21), isr)
    yield from eoi(ctx, vcpu)
    isr = yield from apic_read(ctx, vcpu, r.APIC_ISR + 0x20)
    ctx.equal("EOI cleared 0x55, the highest", 1 << 5, isr)
    yield from eoi(ctx, vcpu)
    isr = yield from apic_read(ctx, vcpu, r.APIC_ISR + 0x20)
    ctx.equal("the second EOI cleared 0x45", 0, isr)


@CASES.case(
    "lapic.svr.disable",
    "software disable masks every LVT and drops fixed interrupts",
    MUST,
    "protocol.md §7.8; SDM 10.4.7.2",
)
def svr_disable(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_LVTT, 0xEC)
    yield from apic_write(ctx, vcpu, r.APIC_SPIV, 0xFF)
    lvtt = yield from apic_read(ctx, vcpu, r.APIC_LVTT)
    ctx.equal("LVTT masked by the disable", 0x100EC, lvtt)
    yield from apic_write(ctx, vcpu, r.APIC_LVTERR, 0xFE)
    lvterr = yield from apic_read(ctx, vcpu, r.APIC_LVTERR)
    ctx.equal("an LVT written while disabled stays masked", 0x100FE, lvterr)
    done = yield from _self_ipi(ctx, vcpu, TEST_VECTOR)
    later = yield c.Collect(vcpu, 50, (m.Inject,))
    ctx.check(
        "a fixed self-IPI is dropped",
        not injected([*done.during, *later]),
        "no inject",
        [c.describe(a.msg) for a in later if a.msg],
    )


@CASES.case(
    "lapic.id.write",
    "the xAPIC ID is writable (bits 31:24)",
    SHOULD,
    "protocol.md §7.8; KVM kvm_apic_set_xapic_id",
)
def id_write(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_ID, 0x0512_3456)
    value = yield from apic_read(ctx, vcpu, r.APIC_ID)
    ctx.equal("ID after writing 0x05123456", 0x0500_0000, value)


# ---------------------------------------------------------------------- APIC_BASE


@CASES.case(
    "apicbase.reset",
    "APIC_BASE reads 0xFEE00000 | EN, plus BSP on vCPU 0",
    MUST,
    "protocol.md §7.8; SDM 10.4.4",
)
def apicbase_reset(ctx: c.Ctx) -> Gen:
    for vcpu in range(min(ctx.vcpus, 2)):
        yield from session(ctx, vcpu)
        done = yield from rdmsr(ctx, vcpu, APIC_BASE_MSR)
        expected = r.APIC_DEFAULT_BASE | r.APICBASE_EN | (r.APICBASE_BSP if vcpu == 0 else 0)
        ctx.equal(f"vCPU {vcpu} APIC_BASE", expected, done.value)


def _apicbase_gp(steps: list[int], what: str) -> Callable[[c.Ctx], Gen]:
    """Write ``steps`` to APIC_BASE in order: all but the last succeed, the last #GPs."""

    def script(ctx: c.Ctx) -> Gen:
        vcpu = _vcpu(ctx)
        yield from session(ctx, vcpu)
        for value in steps[:-1]:
            done = yield from wrmsr(ctx, vcpu, APIC_BASE_MSR, value)
            ctx.equal(f"APIC_BASE := {value:#x} succeeds", 0, done.fault)
        before = yield from rdmsr(ctx, vcpu, APIC_BASE_MSR)
        done = yield from wrmsr(ctx, vcpu, APIC_BASE_MSR, steps[-1])
        ctx.check(
            f"{what}: APIC_BASE := {steps[-1]:#x} raises #GP",
            is_gp(done),
            "fault 13",
            f"fault {done.fault}",
        )
        after = yield from rdmsr(ctx, vcpu, APIC_BASE_MSR)
        ctx.equal("APIC_BASE unchanged by the faulting write", before.value, after.value)

    return script


_BASE = r.APIC_DEFAULT_BASE
_EN, _EXTD = r.APICBASE_EN, r.APICBASE_EXTD
for _suffix, _steps, _what in [
    ("reserved-bit9", [_BASE | _EN | (1 << 9)], "reserved bit 9"),
    ("reserved-low", [_BASE | _EN | 0x1], "reserved bit 0"),
    ("reserved-high", [(1 << 52) | _BASE | _EN], "a bit beyond MAXPHYADDR"),
    ("extd-without-en", [_BASE | _EXTD], "EXTD without EN"),
    ("x2apic-to-xapic", [_BASE | _EN | _EXTD, _BASE | _EN], "x2APIC to xAPIC"),
    ("disabled-to-x2apic", [_BASE, _BASE | _EN | _EXTD], "disabled to x2APIC"),
]:
    CASES.add(
        f"apicbase.gp.{_suffix}",
        f"APIC_BASE: {_what} raises #GP",
        MUST,
        "protocol.md §7.8; SDM 10.12.5; KVM kvm_set_apic_base",
        _apicbase_gp(_steps, _what),
    )


@CASES.case(
    "apicbase.disable",
    "with EN clear the xAPIC page reads all ones; EN again restores the ID",
    SHOULD,
    "protocol.md §7.8; KVM LAPIC_MMIO_HOLE quirk",
)
def apicbase_disable(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from wrmsr(ctx, vcpu, APIC_BASE_MSR, _BASE)
    value = yield from apic_read(ctx, vcpu, r.APIC_LVR)
    ctx.equal("LVR reads all ones while disabled", U32, value)
    yield from wrmsr(ctx, vcpu, APIC_BASE_MSR, _BASE | _EN)
    value = yield from apic_read(ctx, vcpu, r.APIC_ID)
    ctx.equal("ID after enabling again", vcpu << 24, value)


@CASES.case(
    "apicbase.x2apic",
    "enabling x2APIC: ID = vCPU index, LDR derived, MMIO reads all ones",
    MUST,
    "protocol.md §7.8; SDM 10.12.10.2",
)
def apicbase_x2apic(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_x2apic(ctx, vcpu)
    ident = yield from x2_read(ctx, vcpu, r.APIC_ID)
    ctx.equal("x2APIC ID (MSR 0x802)", vcpu, ident)
    ldr = yield from x2_read(ctx, vcpu, r.APIC_LDR)
    ctx.equal("x2APIC LDR (MSR 0x80d) = cluster << 16 | 1 << (id & 15)", r.x2apic_ldr(vcpu), ldr)
    value = yield from apic_read(ctx, vcpu, r.APIC_LVR)
    ctx.equal("the xAPIC page reads all ones in x2APIC mode", U32, value)


# ---------------------------------------------------------------------- x2APIC MSRs


def x2apic_access(msr: int) -> tuple[bool, bool]:
    """(readable, writable) of an x2APIC MSR without CMCI, KVM's table (section 2)."""
    reg = r.REGISTERS.get(r.msr_to_offset(msr))
    if reg is None:
        return False, False
    return reg.readable(True, False), reg.writable(True, False)


#: a write with no lasting side effect, for the registers that accept writes
_BENIGN = {
    r.APIC_TASKPRI: 0,
    r.APIC_EOI: 0,
    r.APIC_SPIV: 0x1FF,
    r.APIC_ESR: 0,
    r.APIC_ICR: r.APIC_DEST_SELF | TEST_VECTOR,
    r.APIC_TMICT: 0,
    r.APIC_TDCR: 0,
    r.APIC_SELF_IPI: TEST_VECTOR,
}

#: the MSRs with one case each; the rest of 0x840..0x8ff are one case
X2APIC_MSRS = range(r.X2APIC_MSR_BASE, r.X2APIC_MSR_BASE + 0x40)


def _x2apic_msr_case(msr: int) -> Callable[[c.Ctx], Gen]:
    readable, writable = x2apic_access(msr)
    offset = r.msr_to_offset(msr)

    def script(ctx: c.Ctx) -> Gen:
        vcpu = _vcpu(ctx)
        yield from session(ctx, vcpu)
        yield from enable_x2apic(ctx, vcpu)
        done = yield from rdmsr(ctx, vcpu, msr)
        ctx.check(
            f"rdmsr {msr:#x}",
            is_gp(done) != readable,
            "a value" if readable else "#GP",
            f"fault {done.fault}" if done.fault else f"value {done.value:#x}",
        )
        value = _BENIGN.get(offset, r.APIC_LVT_RESET if offset in r.APIC_LVTS else 0)
        done = yield from wrmsr(ctx, vcpu, msr, value)
        ctx.check(
            f"wrmsr {msr:#x} := {value:#x}",
            is_gp(done) != writable,
            "accepted" if writable else "#GP",
            f"fault {done.fault}",
        )

    return script


for _msr in X2APIC_MSRS:
    _readable, _writable = x2apic_access(_msr)
    _reg = r.REGISTERS.get(r.msr_to_offset(_msr))
    _name = _reg.name if _reg is not None else "reserved"
    CASES.add(
        f"x2apic.msr.gp.{_msr:#x}",
        f"MSR {_msr:#x} ({_name}): read {'ok' if _readable else '#GP'}, "
        f"write {'ok' if _writable else '#GP'}",
        MUST,
        "protocol.md §7.8; SDM 10.12.1.2; kvm-unit-tests test_x2apic_msrs",
        _x2apic_msr_case(_msr),
    )


@CASES.case(
    "x2apic.msr.gp.beyond",
    "MSRs 0x840..0x8ff raise #GP on read and write",
    MUST,
    "protocol.md §7.8; KVM kvm_x2apic_msr_read",
)
def x2apic_beyond(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_x2apic(ctx, vcpu)
    bad = []
    for msr in range(0x840, 0x900, 0x8):
        done = yield from rdmsr(ctx, vcpu, msr)
        if not is_gp(done):
            bad.append(f"rdmsr {msr:#x}")
        done = yield from wrmsr(ctx, vcpu, msr, 0)
        if not is_gp(done):
            bad.append(f"wrmsr {msr:#x}")
    ctx.check("every access (every 8th MSR) raises #GP", not bad, "#GP", bad)


def _x2_gp(offset: int, value: int, what: str) -> Callable[[c.Ctx], Gen]:
    def script(ctx: c.Ctx) -> Gen:
        vcpu = _vcpu(ctx)
        yield from session(ctx, vcpu)
        yield from enable_x2apic(ctx, vcpu)
        done = yield from x2_write(ctx, vcpu, offset, value)
        ctx.check(
            f"{what}: wrmsr {r.x2apic_msr(offset):#x} := {value:#x}",
            is_gp(done),
            "#GP",
            f"fault {done.fault}",
        )

    return script


for _suffix, _offset, _value, _what in [
    ("high-bits", r.APIC_TASKPRI, 1 << 32, "bits 63:32 set on a 32-bit register"),
    ("esr-nonzero", r.APIC_ESR, 1, "a non-zero ESR write"),
    ("self-ipi-reserved", r.APIC_SELF_IPI, 0x100 | TEST_VECTOR, "SELF_IPI bits 31:8"),
    ("icr-reserved", r.APIC_ICR, (1 << 13) | TEST_VECTOR, "ICR reserved bit 13"),
]:
    CASES.add(
        f"x2apic.msr.gp.{_suffix}",
        f"x2APIC: {_what} raises #GP",
        MUST,
        "protocol.md §7.8; SDM 10.12.1.2",
        _x2_gp(_offset, _value, _what),
    )


@CASES.case(
    "x2apic.msr.gp.xapic-mode",
    "an x2APIC MSR outside x2APIC mode raises #GP",
    MUST,
    "protocol.md §7.8; SDM 10.12.1.2",
)
def x2apic_in_xapic_mode(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    done = yield from rdmsr(ctx, vcpu, r.x2apic_msr(r.APIC_LVR))
    ctx.check("rdmsr 0x803 in xAPIC mode", is_gp(done), "#GP", f"fault {done.fault}")
    done = yield from wrmsr(ctx, vcpu, r.x2apic_msr(r.APIC_TASKPRI), 0)
    ctx.check("wrmsr 0x808 in xAPIC mode", is_gp(done), "#GP", f"fault {done.fault}")


@CASES.case(
    "lapic.icr.busy",
    "ICR never reads delivery status pending",
    MUST,
    "protocol.md §7.8; KVM kvm_apic_send_ipi",
)
def icr_busy(ctx: c.Ctx) -> Gen:
    vcpu = _vcpu(ctx)
    yield from session(ctx, vcpu)
    yield from enable_apic(ctx, vcpu)
    yield from apic_write(ctx, vcpu, r.APIC_ICR, r.APIC_DEST_SELF | r.APIC_ICR_BUSY | TEST_VECTOR)
    value = yield from apic_read(ctx, vcpu, r.APIC_ICR)
    ctx.equal("xAPIC ICR after a write (BUSY clear)", r.APIC_DEST_SELF | TEST_VECTOR, value)
