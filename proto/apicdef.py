"""The local APIC register map: one table, plus every architectural constant the model uses.

Everything here comes from ``lapic-kvm-linux.md`` sections 1-4 (``apicdef.h``,
``lib/x86/apic-defs.h`` and KVM's ``lapic.c``).  The host's LAPIC model and the guest's
APIC drivers both import from here, as Linux and KVM share ``apicdef.h``; no register
offset or bit value is spelled anywhere else.

:data:`REGISTERS` has one :class:`Reg` per 16-byte register slot that exists in either
mode (the 8-word ISR/TMR/IRR arrays appear as eight rows each).  Its access columns are
KVM's, not the SDM's:

* ``xapic_read`` / ``x2apic_read``: ``kvm_lapic_readable_reg_mask`` (section 1).  ARBPRI,
  DFR and ICR2 are readable only in xAPIC mode; EOI, RRR and SELF_IPI never.
* ``xapic_write`` / ``x2apic_write``: the cases of ``kvm_lapic_reg_write`` that succeed
  in that mode (section 1 and 2).  ID, LDR, DFR and ICR2 fail in x2APIC mode, SELF_IPI
  fails in xAPIC mode.
* ``write_mask`` / ``write_set``: the stored value is ``(value & write_mask) | write_set``
  (DFR is stored as ``value | 0x0FFFFFFF``).  The LVT timer mask excludes the timer-mode
  field, which depends on CPUID (see :func:`lvtt_mode_mask`).
* ``cmci``: the row exists only when the vCPU has MCG_CMCI_P (7 LVT entries).

The x2APIC MSR of a row is ``0x800 + (offset >> 4)`` (section 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType

__all__ = [
    "Reg",
    "REGISTERS",
    "DeliveryMode",
    "x2apic_msr",
    "msr_to_offset",
    "lvtt_mode_mask",
    "vector_word",
    "x2apic_ldr",
    "lvr_value",
]

U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF

# ---------------------------------------------------------------- MSRs and APIC_BASE

MSR_IA32_APICBASE = 0x1B
APICBASE_BSP = 1 << 8
APICBASE_EXTD = 1 << 10  # x2APIC enable
APICBASE_EN = 1 << 11  # xAPIC global enable
#: reserved low bits of APIC_BASE (bits 7:0 and 9) -- kvm_set_apic_base's ``0x2ff``
APICBASE_RESERVED_LOW = 0x2FF
APICBASE_ADDR_MASK = ~0xFFF  # bits MAXPHYADDR-1:12 (caller clips to MAXPHYADDR)
APIC_DEFAULT_BASE = 0xFEE0_0000
APIC_MMIO_LENGTH = 0x1000

MSR_IA32_TSC_DEADLINE = 0x6E0
X2APIC_MSR_BASE = 0x800
X2APIC_MSR_LAST = 0x8FF

# ---------------------------------------------------------------- register offsets

APIC_ID = 0x020
APIC_LVR = 0x030
APIC_TASKPRI = 0x080
APIC_ARBPRI = 0x090
APIC_PROCPRI = 0x0A0
APIC_EOI = 0x0B0
APIC_RRR = 0x0C0
APIC_LDR = 0x0D0
APIC_DFR = 0x0E0
APIC_SPIV = 0x0F0
APIC_ISR = 0x100
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_ESR = 0x280
APIC_LVTCMCI = 0x2F0
APIC_ICR = 0x300
APIC_ICR2 = 0x310
APIC_LVTT = 0x320
APIC_LVTTHMR = 0x330
APIC_LVTPC = 0x340
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_LVTERR = 0x370
APIC_TMICT = 0x380
APIC_TMCCT = 0x390
APIC_TDCR = 0x3E0
APIC_SELF_IPI = 0x3F0
#: highest readable offset (kvm_lapic_reg_read: ``offset > 0x3f0`` fails)
APIC_LAST_REG = 0x3F0
#: number of 32-bit words in each of ISR, TMR, IRR
APIC_VECTOR_WORDS = 8

#: LVT offsets in KVM's LVT index order (LVT_TIMER .. LVT_ERROR, then LVT_CMCI)
APIC_LVTS = (APIC_LVTT, APIC_LVTTHMR, APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR)
APIC_LVTS_CMCI = (*APIC_LVTS, APIC_LVTCMCI)

# ---------------------------------------------------------------- LVR, SVR, DFR, LDR

APIC_VERSION = 0x14  # integrated APIC, as KVM's kvm_apic_set_version
APIC_LVR_MAXLVT_SHIFT = 16
APIC_LVR_DIRECTED_EOI = 1 << 24
APIC_SPIV_VECTOR = 0xFF
APIC_SPIV_APIC_ENABLED = 1 << 8
APIC_SPIV_FOCUS_DISABLED = 1 << 9
APIC_SPIV_DIRECTED_EOI = 1 << 12
APIC_SPIV_MASK = 0x3FF  # kvm_lapic_reg_write: ``val & 0x3ff`` (+ bit 12 with directed EOI)
APIC_SPIV_RESET = 0xFF
APIC_DFR_FLAT = 0xFFFF_FFFF
APIC_DFR_CLUSTER = 0x0FFF_FFFF
APIC_DFR_MODEL_MASK = 0xF000_0000
APIC_DFR_RESERVED_ONES = 0x0FFF_FFFF
APIC_LDR_MASK = 0xFF00_0000
APIC_ID_MASK = 0xFF00_0000
APIC_ID_SHIFT = 24
APIC_TPR_MASK = 0xFF
APIC_PRIO_CLASS = 0xF0  # priority class bits of a vector / TPR / PPR
APIC_VECTOR_MASK = 0xFF
APIC_TDCR_MASK = 0xB  # bits 0, 1 and 3 (bit 2 reserved)

# ---------------------------------------------------------------- LVT bits

APIC_LVT_MASKED = 1 << 16
APIC_SEND_PENDING = 1 << 12  # delivery status (ICR bit 12 / LVT bit 12)
APIC_MODE_MASK = 0x700  # delivery mode, bits 10:8
APIC_INPUT_POLARITY = 1 << 13
APIC_LVT_REMOTE_IRR = 1 << 14
APIC_LVT_LEVEL_TRIGGER = 1 << 15
APIC_LVT_RESET = APIC_LVT_MASKED
#: LVT_MASK / LINT_MASK of lapic.c (section 1)
LVT_MASK = APIC_LVT_MASKED | APIC_SEND_PENDING | APIC_VECTOR_MASK
LVT_MODE_MASK = LVT_MASK | APIC_MODE_MASK
LINT_MASK = LVT_MODE_MASK | APIC_INPUT_POLARITY | APIC_LVT_REMOTE_IRR | APIC_LVT_LEVEL_TRIGGER

APIC_LVT_TIMER_ONESHOT = 0 << 17
APIC_LVT_TIMER_PERIODIC = 1 << 17
APIC_LVT_TIMER_TSCDEADLINE = 2 << 17
APIC_LVT_TIMER_MASK = 3 << 17

# ---------------------------------------------------------------- ICR fields (section 4)

APIC_DM_MASK = 0x700


class DeliveryMode(IntEnum):
    """ICR / LVT delivery mode, bits 10:8 (kept in place: FIXED = 0x000 ... EXTINT = 0x700)."""

    FIXED = 0x000
    LOWEST = 0x100
    SMI = 0x200
    REMRD = 0x300  # remote read; KVM uses it for the PV kick
    NMI = 0x400
    INIT = 0x500
    STARTUP = 0x600
    EXTINT = 0x700


APIC_DEST_LOGICAL = 1 << 11
APIC_DEST_PHYSICAL = 0
APIC_ICR_BUSY = APIC_SEND_PENDING
APIC_INT_ASSERT = 1 << 14
APIC_INT_LEVELTRIG = 1 << 15
APIC_SHORT_MASK = 3 << 18
APIC_DEST_NOSHORT = 0 << 18
APIC_DEST_SELF = 1 << 18
APIC_DEST_ALLINC = 2 << 18
APIC_DEST_ALLBUT = 3 << 18
APIC_BROADCAST = 0xFF
X2APIC_BROADCAST = 0xFFFF_FFFF
#: x2APIC ICR bits that #GP when set: 31:20, 17:16, 13 (kvm_x2apic_icr_write, section 2)
X2APIC_ICR_RESERVED = (0xFFF << 20) | (3 << 16) | (1 << 13)
#: xAPIC destination field in ICR2
APIC_ICR2_DEST_SHIFT = 24
APIC_ICR2_MASK = 0xFF00_0000

# ---------------------------------------------------------------- timer, KVM tunables (section 3)

#: KVM ``min_timer_period_us`` default, in ns
MIN_TIMER_PERIOD_NS = 200_000
#: APIC_BUS_CYCLE_NS_DEFAULT
APIC_BUS_CYCLE_NS = 1
LAPIC_TIMER_ADVANCE_NS_INIT = 1000
LAPIC_TIMER_ADVANCE_NS_MAX = 5000
#: adjust only if the measured error is within 100..10000 guest TSC cycles
LAPIC_TIMER_ADVANCE_ADJUST_MIN = 100
LAPIC_TIMER_ADVANCE_ADJUST_MAX = 10_000
LAPIC_TIMER_ADVANCE_ADJUST_STEP = 8

NR_VECTORS = 256


@dataclass(frozen=True, slots=True)
class Reg:
    """One 16-byte register slot of the APIC page, with KVM's access rules."""

    name: str
    offset: int
    xapic_read: bool
    x2apic_read: bool
    xapic_write: bool
    x2apic_write: bool
    #: bits a successful write stores (0 for registers whose writes store nothing)
    write_mask: int = U32
    #: bits a write forces to one (DFR's reserved ones)
    write_set: int = 0
    #: exists only with 7 LVT entries (MCG_CMCI_P)
    cmci: bool = False

    @property
    def msr(self) -> int:
        """The x2APIC MSR of this register: ``0x800 + (offset >> 4)``."""
        return x2apic_msr(self.offset)

    @property
    def x2apic_present(self) -> bool:
        """Any x2APIC access is legal (otherwise every RDMSR/WRMSR #GPs)."""
        return self.x2apic_read or self.x2apic_write

    def readable(self, x2apic: bool, has_cmci: bool) -> bool:
        if self.cmci and not has_cmci:
            return False
        return self.x2apic_read if x2apic else self.xapic_read

    def writable(self, x2apic: bool, has_cmci: bool) -> bool:
        if self.cmci and not has_cmci:
            return False
        return self.x2apic_write if x2apic else self.xapic_write


def _rows() -> list[Reg]:
    rw, ro = (True, True, True, True), (True, True, False, False)
    rows = [
        Reg("ID", APIC_ID, True, True, True, False, APIC_ID_MASK),
        Reg("LVR", APIC_LVR, *ro, 0),
        Reg("TPR", APIC_TASKPRI, *rw, APIC_TPR_MASK),
        # KVM: ARBPRI reads 0 and is not writable; absent in x2APIC mode
        Reg("APR", APIC_ARBPRI, True, False, False, False, 0),
        Reg("PPR", APIC_PROCPRI, *ro, 0),
        # the written value is ignored (section 5)
        Reg("EOI", APIC_EOI, False, False, True, True, 0),
        # not implemented by KVM: neither readable nor writable in either mode
        Reg("RRR", APIC_RRR, False, False, False, False, 0),
        Reg("LDR", APIC_LDR, True, True, True, False, APIC_LDR_MASK),
        Reg(
            "DFR",
            APIC_DFR,
            True,
            False,
            True,
            False,
            APIC_DFR_MODEL_MASK,
            APIC_DFR_RESERVED_ONES,
        ),
        Reg("SVR", APIC_SPIV, *rw, APIC_SPIV_MASK),
    ]
    for base, name in ((APIC_ISR, "ISR"), (APIC_TMR, "TMR"), (APIC_IRR, "IRR")):
        rows += [Reg(f"{name}{i}", base + 0x10 * i, *ro, 0) for i in range(APIC_VECTOR_WORDS)]
    rows += [
        # KVM accepts ESR writes and ignores them (never latches errors); in x2APIC a
        # non-zero write #GPs (section 2)
        Reg("ESR", APIC_ESR, *rw, 0),
        Reg("LVTCMCI", APIC_LVTCMCI, *rw, LVT_MODE_MASK, cmci=True),
        # BUSY is never stored (section 4)
        Reg("ICR", APIC_ICR, *rw, U32 & ~APIC_ICR_BUSY),
        Reg("ICR2", APIC_ICR2, True, False, True, False, APIC_ICR2_MASK),
        # the timer-mode field is added at run time (lvtt_mode_mask)
        Reg("LVTT", APIC_LVTT, *rw, LVT_MASK),
        Reg("LVTTHMR", APIC_LVTTHMR, *rw, LVT_MODE_MASK),
        Reg("LVTPC", APIC_LVTPC, *rw, LVT_MODE_MASK),
        Reg("LVT0", APIC_LVT0, *rw, LINT_MASK),
        Reg("LVT1", APIC_LVT1, *rw, LINT_MASK),
        Reg("LVTERR", APIC_LVTERR, *rw, LVT_MASK),
        Reg("TMICT", APIC_TMICT, *rw, U32),
        Reg("TMCCT", APIC_TMCCT, *ro, 0),
        Reg("TDCR", APIC_TDCR, *rw, APIC_TDCR_MASK),
        # x2APIC only; bits 31:8 reserved (#GP)
        Reg("SELF_IPI", APIC_SELF_IPI, False, False, False, True, APIC_VECTOR_MASK),
    ]
    return rows


#: offset -> :class:`Reg`; offsets not in the table are reserved (no access succeeds)
REGISTERS: MappingProxyType[int, Reg] = MappingProxyType({r.offset: r for r in _rows()})


def x2apic_msr(offset: int) -> int:
    """x2APIC MSR index of the register at ``offset``."""
    return X2APIC_MSR_BASE + (offset >> 4)


def msr_to_offset(msr: int) -> int:
    """Register offset of x2APIC MSR ``msr`` (0x800..0x8FF)."""
    return (msr - X2APIC_MSR_BASE) << 4


def lvtt_mode_mask(tsc_deadline: bool) -> int:
    """Timer-mode bits a LVTT write keeps: ``3 << 17`` with CPUID TSC_DEADLINE, else ``1 << 17``.

    Without the CPUID bit, writing TSC-deadline mode (``2 << 17``) yields one-shot and
    ``3 << 17`` yields periodic (section 3).
    """
    return APIC_LVT_TIMER_MASK if tsc_deadline else APIC_LVT_TIMER_PERIODIC


def vector_word(vector: int) -> tuple[int, int]:
    """(offset delta, bit) of ``vector`` in ISR/TMR/IRR: word ``v >> 5``, bit ``v & 31``."""
    return 0x10 * (vector >> 5), vector & 31


def x2apic_ldr(x2apic_id: int) -> int:
    """Derived x2APIC LDR: cluster ``id >> 4`` in 31:16, bit ``id & 0xF`` in 15:0 (section 2)."""
    return ((x2apic_id >> 4) << 16) | (1 << (x2apic_id & 0xF))


def lvr_value(cmci: bool, directed_eoi: bool) -> int:
    """KVM's version register: ``0x14 | ((nr_lvt_entries - 1) << 16)`` [| bit 24] (section 1)."""
    nr_lvt = len(APIC_LVTS_CMCI) if cmci else len(APIC_LVTS)
    value = APIC_VERSION | ((nr_lvt - 1) << APIC_LVR_MAXLVT_SHIFT)
    if directed_eoi:
        value |= APIC_LVR_DIRECTED_EOI
    return value
