"""The local APIC of one vCPU: a pure state machine that behaves like KVM's ``lapic.c``.

Theory of operation
-------------------

A :class:`Lapic` holds what KVM's ``struct kvm_lapic`` holds: the register page (as a
dict of 32-bit registers, with ISR/TMR/IRR kept as 256-bit integers), the APIC_BASE MSR,
and an embedded timer (mode, period, target expiration, TSC deadline).  It never reads a
clock and never does I/O.  Its inputs are:

* guest accesses -- :meth:`Lapic.mmio_read` / :meth:`Lapic.mmio_write` (xAPIC page,
  offsets relative to the current APIC base), :meth:`Lapic.msr_read` /
  :meth:`Lapic.msr_write` (APIC_BASE 0x1B, x2APIC 0x800-0x8FF, TSC_DEADLINE 0x6E0) and
  :meth:`Lapic.reg_read` / :meth:`Lapic.reg_write` (register-level, for VMI-style
  ``apic_read``/``apic_write`` hypercalls, like ``kvm_lapic_reg_read/write``);
* interrupt sources -- :meth:`Lapic.accept_irq` (``__apic_accept_irq``; IPIs arrive here
  through :func:`vtick.host.lapic.delivery.deliver`);
* the host timer -- :meth:`Lapic.on_timer` when the expiry last passed to
  ``port.arm_timer`` is reached;
* the injection path -- :meth:`Lapic.highest_deliverable`, :meth:`Lapic.ack`,
  :meth:`Lapic.take_nmi` (the host asks what to inject and takes it).

Every entry point that depends on time takes ``now``: host CLOCK_MONOTONIC in integer ns.
Everything the LAPIC needs from the host goes through a :class:`LapicPort`: arming and
cancelling the one host timer of this vCPU, reading and converting the guest TSC,
routing an IPI, and "IRR/ISR/PPR changed, re-evaluate injection".

Accesses are dispatched through two tables built from
:data:`vtick.proto.apicdef.REGISTERS`: the table decides whether an offset is
readable/writable in the current mode (xAPIC vs x2APIC, with KVM's rules), and
``_readers`` / ``_writers`` map offsets to handlers.  A handler returning ``False`` is
KVM's "return 1": silently dropped on the xAPIC MMIO path, #GP
(:class:`~vtick.host.faults.GuestFault`) on the x2APIC MSR and register-level paths.

Timer
~~~~~

The timer is never "ticked".  One-shot and periodic modes keep ``target`` (absolute host
ns of the next expiry) and ``period`` (``TMICT * apic_bus_cycle_ns * divisor`` ns); TMCCT
is computed from ``target - now`` on every read (``apic_get_tmcct``).  TSC-deadline mode
keeps the deadline in guest TSC cycles and asks the port for the host time at which the
guest TSC reaches it.  Expiry delivers the LVTT vector at once through the accept logic
(KVM's ``pending`` counter plus injection at the next entry collapse to this: a tick
that finds its vector still in IRR is coalesced and counted, section 3/5).

Timer advance (``timer_advance=True``, TSC-deadline only) is KVM's
``lapic_timer_advance``: the host timer is armed ``timer_advance_ns`` before the
deadline (initially 1000 ns, at most 5000), and when it fires the error
``guest_tsc(now) - deadline`` adapts the advance by 1/8 (only errors of 100..10000
cycles count).  KVM then busy-waits until the deadline before VM entry; a pure model
cannot wait, so it sets :attr:`Lapic.inject_not_before` (host ns) and the host must not
inject the LVTT vector earlier.  :meth:`Lapic.ack` of that vector clears it.

Where vtick differs from KVM, the code says so (``DEVIATION``) next to the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vtick.host.faults import GuestFault
from vtick.host.lapic.port import LapicPort
from vtick.host.mutations import Mutations
from vtick.proto import apicdef as r
from vtick.proto.abi import Fault
from vtick.proto.clockmath import tdcr_divisor

__all__ = ["Lapic", "LapicStats"]

#: how soon the ``double-fire`` mutation fires a spent one-shot again (vtick.host.mutations)
DOUBLE_FIRE_NS = 20_000


@dataclass
class LapicStats:
    """Event counters of one LAPIC (monotonic; the host reports them)."""

    #: fixed/lowest-priority interrupts accepted into IRR
    accepted: int = 0
    #: interrupts whose vector was already pending in IRR (invariant 5)
    coalesced: int = 0
    #: fixed/lowest-priority interrupts dropped (APIC not hw+sw enabled, or level de-assert)
    dropped: int = 0
    #: EOIs that cleared an ISR bit
    eois: int = 0
    #: EOIs with an empty ISR (KVM returns early)
    eoi_noop: int = 0
    #: EOIs of a level-triggered vector (TMR set): an IOAPIC would get the EOI broadcast
    eoi_level: int = 0
    #: timer expiries (each delivers at most one interrupt)
    timer_fires: int = 0
    #: expiries whose LVTT was masked (or APIC hw-disabled): the tick is dropped
    timer_ticks_masked: int = 0
    #: periods a late periodic expiry skipped (coalesced into its one interrupt)
    timer_missed_periods: int = 0
    #: periodic periods raised to ``min_timer_period_ns``
    timer_period_clamped: int = 0
    #: on_timer calls with nothing (or something later) armed
    timer_spurious: int = 0
    #: timer_advance_ns adaptations (lapic_timer_advance)
    timer_advance_adjustments: int = 0
    #: IPIs sent (ICR writes and SELF_IPI)
    ipis_sent: int = 0
    #: NMIs accepted / NMIs lost to the pending limit
    nmi: int = 0
    nmi_dropped: int = 0
    init: int = 0
    sipi: int = 0
    smi: int = 0
    #: remote-read delivery mode: KVM's PV kick (sets pv_unhalted)
    kicks: int = 0
    #: xAPIC MMIO accesses dropped (bad size/alignment, read-only or unknown register)
    mmio_dropped: int = 0


#: reader(offset, now) -> 32-bit value
_Reader = Callable[[int, int], int]
#: writer(offset, value, now) -> accepted (False = KVM's "return 1")
_Writer = Callable[[int, int, int], bool]


def _all_ones(size: int) -> int:
    return (1 << (8 * max(size, 0))) - 1


def _gp(reason: str) -> GuestFault:
    return GuestFault(Fault.GP, reason)


class Lapic:
    """One vCPU's local APIC (KVM semantics; reference ``lapic-kvm-linux.md`` sections 1-6).

    Inputs: guest MMIO/MSR/register accesses, :meth:`accept_irq`, :meth:`on_timer`, and
    the host's injection calls (:meth:`highest_deliverable`, :meth:`ack`, :meth:`take_nmi`).
    Outputs: return values, :class:`~vtick.host.faults.GuestFault` for #GP, and calls on
    ``port``.

    Args:
        vcpu_id: vCPU index; also the x2APIC ID and the initial xAPIC ID.
        port: the host side (:class:`LapicPort`).
        x2apic: CPUID.1:ECX.x2APIC (else EXTD is a reserved APIC_BASE bit).
        tsc_deadline: CPUID.1:ECX.TSC_DEADLINE (LVTT timer-mode mask, section 3).
        bsp: bootstrap processor (APIC_BASE bit 8, LINT0 = ExtINT); default ``vcpu_id == 0``.
        apic_bus_cycle_ns: ns per APIC bus cycle (KVM default 1 => 1 GHz).
        min_timer_period_ns: periodic-mode clamp (KVM ``min_timer_period_us`` = 200).
        timer_advance: KVM's ``lapic_timer_advance`` for TSC-deadline mode (off by default).
        cmci: MCG_CMCI_P: 7 LVT entries, LVR = 0x60014 and LVTCMCI present.
        directed_eoi: LVR bit 24 and SVR bit 12 (KVM: x2APIC CPUID and no in-kernel IOAPIC).
        maxphyaddr: guest physical address width; APIC_BASE bits at or above it #GP.
    """

    def __init__(
        self,
        vcpu_id: int,
        port: LapicPort,
        *,
        x2apic: bool = True,
        tsc_deadline: bool = True,
        bsp: bool | None = None,
        apic_bus_cycle_ns: int = r.APIC_BUS_CYCLE_NS,
        min_timer_period_ns: int = r.MIN_TIMER_PERIOD_NS,
        timer_advance: bool = False,
        mutations: Mutations | None = None,
        cmci: bool = False,
        directed_eoi: bool = False,
        maxphyaddr: int = 40,
    ) -> None:
        if apic_bus_cycle_ns <= 0:
            raise ValueError("apic_bus_cycle_ns must be positive")
        self.vcpu_id = vcpu_id
        self.port = port
        #: planted bugs (vtick.host.mutations); empty outside checker tests
        self.mutations = mutations or Mutations()
        self.stats = LapicStats()
        self._x2apic_cap = x2apic
        self._bsp = vcpu_id == 0 if bsp is None else bsp
        self._bus_ns = apic_bus_cycle_ns
        self._min_period = min_timer_period_ns
        self._timer_mode_mask = r.lvtt_mode_mask(tsc_deadline)
        self._cmci = cmci
        self._directed_eoi = directed_eoi
        self._maxphyaddr = maxphyaddr
        self._lvts = r.APIC_LVTS_CMCI if cmci else r.APIC_LVTS
        self._lvt_masks = {
            off: r.REGISTERS[off].write_mask | (self._timer_mode_mask if off == r.APIC_LVTT else 0)
            for off in self._lvts
        }

        # register page and vector arrays
        self._regs: dict[int, int] = {}
        self._irr = 0
        self._isr = 0
        self._tmr = 0
        self._apic_base = 0

        # timer (struct kvm_timer)
        self._timer_mode = r.APIC_LVT_TIMER_ONESHOT
        self._divisor = tdcr_divisor(0)
        self._period = 0
        self._target: int | None = None
        self._tscdeadline = 0
        self._armed: int | None = None
        self._advance = timer_advance
        #: current timer advance in ns (lapic_timer_advance; meaningful with timer_advance)
        self.timer_advance_ns = r.LAPIC_TIMER_ADVANCE_NS_INIT if timer_advance else 0
        #: host ns before which the timer interrupt just delivered must not be injected
        #: (KVM busy-waits until the deadline before VM entry; the host waits instead)
        self.inject_not_before: int | None = None

        # NMI / INIT / SIPI / SMI / PV kick
        self.nmi_pending = 0
        self.nmi_in_service = False
        self.init_pending = False
        self.sipi_pending = False
        self.sipi_vector: int | None = None
        self.smi_pending = False
        self.pv_unhalted = False

        rd, wr = self._readers_table(), self._writers_table()
        self._readers: dict[int, _Reader] = rd
        self._writers: dict[int, _Writer] = wr
        self.reset()

    # ------------------------------------------------------------------ reset

    def reset(self, *, init_event: bool = False) -> None:
        """``kvm_lapic_reset``: power-on reset, or INIT (which keeps APIC_BASE and the ID).

        APIC_BASE = 0xFEE00000 | EN [| BSP]; ID = vcpu_id << 24; LVTs masked (BSP's LINT0 =
        ExtINT under KVM_X86_QUIRK_LINT0_REENABLED); DFR flat; SVR 0xFF; TPR, LDR, ESR, ICR,
        TDCR, TMICT, IRR/ISR/TMR zero (reference section 1).
        """
        self._cancel()
        if not init_event:
            self._apic_base = r.APIC_DEFAULT_BASE | r.APICBASE_EN
            if self._bsp:
                self._apic_base |= r.APICBASE_BSP
            self._regs[r.APIC_ID] = self.vcpu_id << r.APIC_ID_SHIFT
        self._regs[r.APIC_LVR] = r.lvr_value(self._cmci, self._directed_eoi)
        for off in self._lvts:
            self._regs[off] = r.APIC_LVT_RESET
        self._update_lvtt()
        if self._bsp:
            self._regs[r.APIC_LVT0] = int(r.DeliveryMode.EXTINT)
        self._regs[r.APIC_DFR] = r.APIC_DFR_FLAT
        self._regs[r.APIC_SPIV] = r.APIC_SPIV_RESET
        self._regs[r.APIC_TASKPRI] = 0
        if not self.x2apic_mode:
            self._regs[r.APIC_LDR] = 0
        self._regs[r.APIC_ESR] = 0
        self._regs[r.APIC_ICR] = 0
        self._regs[r.APIC_ICR2] = 0
        self._regs[r.APIC_TDCR] = 0
        self._regs[r.APIC_TMICT] = 0
        self._irr = self._isr = self._tmr = 0
        self._divisor = tdcr_divisor(0)
        self._period = 0
        self._target = None
        self._tscdeadline = 0
        self.inject_not_before = None
        self.nmi_pending = 0
        self.nmi_in_service = False
        self.init_pending = self.sipi_pending = self.smi_pending = False
        self.sipi_vector = None
        self.pv_unhalted = False

    # ------------------------------------------------------------------ state views

    @property
    def apic_base(self) -> int:
        """The IA32_APIC_BASE MSR value."""
        return self._apic_base

    @property
    def base_address(self) -> int:
        """Guest-physical address of the xAPIC MMIO page."""
        return self._apic_base & r.APICBASE_ADDR_MASK & ((1 << self._maxphyaddr) - 1)

    @property
    def hw_enabled(self) -> bool:
        """APIC_BASE.EN."""
        return bool(self._apic_base & r.APICBASE_EN)

    @property
    def x2apic_mode(self) -> bool:
        """APIC_BASE.EXTD (only valid together with EN)."""
        return bool(self._apic_base & r.APICBASE_EXTD)

    @property
    def sw_enabled(self) -> bool:
        """SVR bit 8."""
        return bool(self._regs[r.APIC_SPIV] & r.APIC_SPIV_APIC_ENABLED)

    @property
    def enabled(self) -> bool:
        """hw and sw enabled (KVM ``apic_enabled``): fixed interrupts are accepted."""
        return self.hw_enabled and self.sw_enabled

    @property
    def xapic_id(self) -> int:
        """ID register bits 31:24 (KVM ``kvm_xapic_id``)."""
        return (self._regs[r.APIC_ID] >> r.APIC_ID_SHIFT) & 0xFF

    @property
    def x2apic_id(self) -> int:
        """The x2APIC ID: the vCPU id, never writable (KVM ``kvm_x2apic_id``)."""
        return self.vcpu_id

    @property
    def apic_id(self) -> int:
        """The APIC ID the guest sees in the current mode."""
        return self.x2apic_id if self.x2apic_mode else self.xapic_id

    @property
    def ldr(self) -> int:
        return self._regs[r.APIC_LDR]

    @property
    def dfr(self) -> int:
        return self._regs[r.APIC_DFR]

    @property
    def svr(self) -> int:
        return self._regs[r.APIC_SPIV]

    @property
    def tpr(self) -> int:
        return self._regs[r.APIC_TASKPRI]

    @property
    def cr8(self) -> int:
        """CR8 as the guest reads it: ``(TPR & 0xF0) >> 4`` (section 5)."""
        return (self.tpr & r.APIC_PRIO_CLASS) >> 4

    def set_cr8(self, value: int) -> None:
        """MOV to CR8: ``TPR = (CR8 & 0xF) << 4``; works even while the APIC is disabled."""
        self._regs[r.APIC_TASKPRI] = (value & 0xF) << 4
        self.port.irq_state_changed()

    @property
    def ppr(self) -> int:
        """``__apic_update_ppr`` (section 5): TPR if its class >= the highest ISR class."""
        isrv = self._isr.bit_length() - 1 if self._isr else 0
        tpr = self.tpr
        if (tpr & r.APIC_PRIO_CLASS) >= (isrv & r.APIC_PRIO_CLASS):
            return tpr & r.APIC_TPR_MASK
        return isrv & r.APIC_PRIO_CLASS

    @property
    def irr(self) -> int:
        """IRR as a 256-bit integer (bit v = vector v)."""
        return self._irr

    @property
    def isr(self) -> int:
        return self._isr

    @property
    def tmr(self) -> int:
        return self._tmr

    def lvt(self, offset: int) -> int:
        """Raw value of the LVT register at ``offset``."""
        if offset not in self._lvts:
            raise ValueError(f"no LVT at {offset:#x}")
        return self._regs[offset]

    @property
    def timer_mode(self) -> int:
        """Current LVTT timer mode bits (``APIC_LVT_TIMER_*``)."""
        return self._timer_mode

    @property
    def timer_period_ns(self) -> int:
        """Current period in ns (0 = stopped or TSC-deadline mode), after the clamp."""
        return self._period

    @property
    def timer_target_ns(self) -> int | None:
        """Absolute host ns of the next one-shot/periodic expiry, ``None`` if none."""
        return self._target

    @property
    def tsc_deadline(self) -> int:
        """The stored TSC deadline (0 = disarmed), regardless of mode."""
        return self._tscdeadline

    @property
    def armed_expiry(self) -> int | None:
        """The host ns last passed to ``port.arm_timer`` and not yet expired or cancelled."""
        return self._armed

    # ------------------------------------------------------------------ xAPIC MMIO

    def claims(self, gpa: int) -> bool:
        """Is ``gpa`` in the 4 KiB APIC page at the current base?

        True even while the APIC is hw-disabled or in x2APIC mode: KVM's default
        KVM_X86_QUIRK_LAPIC_MMIO_HOLE keeps the page decoded, reading all-ones and
        dropping writes (section 1).
        """
        base = self.base_address
        return base <= gpa < base + r.APIC_MMIO_LENGTH

    def mmio_read(self, offset: int, size: int, now: int) -> int:
        """``apic_mmio_read`` + ``kvm_lapic_reg_read`` for ``size`` bytes at ``offset``.

        All-ones while hw-disabled or in x2APIC mode.  A read with ``(offset & 0xF) +
        size > 4``, of a size other than 1/2/4, beyond 0x3F0, or of an unreadable
        register fails: KVM leaves the emulator's buffer untouched; here it reads 0.
        """
        self._check_page_offset(offset)
        if not self.hw_enabled or self.x2apic_mode:
            return _all_ones(size)
        align = offset & 0xF
        if align + size > 4 or size not in (1, 2, 4) or offset > r.APIC_LAST_REG:
            self.stats.mmio_dropped += 1
            return 0
        value = self._read(offset & ~0xF, now)
        if value is None:
            self.stats.mmio_dropped += 1
            return 0
        return (value >> (8 * align)) & _all_ones(size)

    def mmio_write(self, offset: int, size: int, value: int, now: int) -> None:
        """``apic_mmio_write``: only 4-byte writes at 16-byte aligned offsets count.

        Dropped while hw-disabled or in x2APIC mode (MMIO hole quirk), and dropped when
        the register is read-only or unknown (KVM ignores ``kvm_lapic_reg_write``'s
        failure on this path and never sets an ESR bit, section 1).
        """
        self._check_page_offset(offset)
        if not self.hw_enabled or self.x2apic_mode:
            return
        if size != 4 or offset & 0xF or not self._write(offset, value & r.U32, now):
            self.stats.mmio_dropped += 1

    @staticmethod
    def _check_page_offset(offset: int) -> None:
        if not 0 <= offset < r.APIC_MMIO_LENGTH:
            raise ValueError(f"APIC MMIO offset {offset:#x} outside the page")

    # ------------------------------------------------------------------ MSRs

    def msr_read(self, msr: int, now: int) -> int:
        """RDMSR of APIC_BASE, TSC_DEADLINE or an x2APIC register.

        Raises:
            GuestFault: #GP for an x2APIC MSR outside x2APIC mode, an unreadable register,
                or an MSR this model does not own.
        """
        if msr == r.MSR_IA32_APICBASE:
            return self._apic_base
        if msr == r.MSR_IA32_TSC_DEADLINE:
            # kvm_get_lapic_tscdeadline_msr: 0 unless hw-enabled and in TSC-deadline mode
            if not self.hw_enabled or not self._is_tscdeadline():
                return 0
            return self._tscdeadline
        if r.X2APIC_MSR_BASE <= msr <= r.X2APIC_MSR_LAST:
            if not self.x2apic_mode:
                raise _gp(f"rdmsr {msr:#x} outside x2APIC mode")
            offset = r.msr_to_offset(msr)
            if offset == r.APIC_ICR:  # the one 64-bit x2APIC register
                return self._icr64()
            value = self._read(offset, now)
            if value is None:
                if self.mutations.on("x2apic-no-gp"):
                    return 0  # mutation: no #GP
                raise _gp(f"rdmsr {msr:#x}: not readable in x2APIC mode")
            return value
        raise _gp(f"rdmsr {msr:#x}: not a LAPIC MSR")

    def msr_write(self, msr: int, value: int, now: int) -> None:
        """WRMSR of APIC_BASE, TSC_DEADLINE or an x2APIC register.

        Raises:
            GuestFault: #GP per sections 1-2: bad APIC_BASE value or transition, x2APIC
                MSR outside x2APIC mode, bits 63:32 set (except ICR), read-only or absent
                register, non-zero ESR, reserved SELF_IPI or ICR bits.
        """
        if not 0 <= value <= r.U64:
            raise _gp(f"wrmsr {msr:#x}: value out of range")
        if msr == r.MSR_IA32_APICBASE:
            self.set_apic_base(value, now)
            return
        if msr == r.MSR_IA32_TSC_DEADLINE:
            self._write_tscdeadline(value, now)
            return
        if r.X2APIC_MSR_BASE <= msr <= r.X2APIC_MSR_LAST:
            if not self.x2apic_mode:
                raise _gp(f"wrmsr {msr:#x} outside x2APIC mode")
            offset = r.msr_to_offset(msr)
            if offset == r.APIC_ICR:
                self._x2apic_icr_write(value)
                return
            if value >> 32:
                raise _gp(f"wrmsr {msr:#x}: bits 63:32 are reserved")
            if not self._write(offset, value, now):
                if self.mutations.on("x2apic-no-gp"):
                    return  # mutation: no #GP
                raise _gp(f"wrmsr {msr:#x}: not writable in x2APIC mode")
            return
        raise _gp(f"wrmsr {msr:#x}: not a LAPIC MSR")

    def set_apic_base(self, value: int, now: int, *, host_initiated: bool = False) -> None:
        """``kvm_set_apic_base`` + ``kvm_lapic_set_base`` (section 1, checklist 3 and 16).

        Raises:
            GuestFault: #GP for reserved bits (>= MAXPHYADDR, 7:0, 9, EXTD without x2APIC
                CPUID), EXTD without EN, and (guest writes only) x2APIC -> xAPIC or
                disabled -> x2APIC.
        """
        reserved = (r.U64 & ~((1 << self._maxphyaddr) - 1)) | r.APICBASE_RESERVED_LOW
        if not self._x2apic_cap:
            reserved |= r.APICBASE_EXTD
        if value & reserved:
            raise _gp(f"APIC_BASE {value:#x}: reserved bits")
        old_mode = self._apic_mode(self._apic_base)
        new_mode = self._apic_mode(value)
        if new_mode is None:
            raise _gp("APIC_BASE: EXTD without EN")
        if not host_initiated:
            if old_mode == "x2apic" and new_mode == "xapic":
                raise _gp("APIC_BASE: x2APIC -> xAPIC")
            if old_mode == "disabled" and new_mode == "x2apic":
                raise _gp("APIC_BASE: disabled -> x2APIC")
        old, self._apic_base = self._apic_base, value
        changed = old ^ value
        if changed & r.APICBASE_EN and value & r.APICBASE_EN:
            # toggling EN on re-sets the xAPIC ID (kvm_apic_set_xapic_id)
            self._regs[r.APIC_ID] = self.vcpu_id << r.APIC_ID_SHIFT
        if changed & r.APICBASE_EXTD and value & r.APICBASE_EXTD:
            # kvm_apic_set_x2apic_id: ID = x2APIC id, LDR derived (section 2)
            self._regs[r.APIC_ID] = self.vcpu_id
            self._regs[r.APIC_LDR] = r.x2apic_ldr(self.vcpu_id)
        if changed & (r.APICBASE_EN | r.APICBASE_EXTD):
            self.port.irq_state_changed()

    @staticmethod
    def _apic_mode(base: int) -> str | None:
        bits = base & (r.APICBASE_EN | r.APICBASE_EXTD)
        return {
            0: "disabled",
            r.APICBASE_EN: "xapic",
            r.APICBASE_EN | r.APICBASE_EXTD: "x2apic",
        }.get(bits)

    def _icr64(self) -> int:
        return (self._regs[r.APIC_ICR2] << 32) | self._regs[r.APIC_ICR]

    def _x2apic_icr_write(self, value: int) -> None:
        """``kvm_x2apic_icr_write``: one 64-bit write, destination in bits 63:32."""
        if value & r.X2APIC_ICR_RESERVED:
            raise _gp(f"x2APIC ICR {value:#x}: reserved bits")
        low = value & r.U32 & ~r.APIC_ICR_BUSY  # no delay: BUSY always reads clear
        high = (value >> 32) & r.U32
        self._send_ipi(low, high)
        self._regs[r.APIC_ICR] = low
        self._regs[r.APIC_ICR2] = high

    # ------------------------------------------------------------------ register level

    def reg_read(self, offset: int, now: int) -> int:
        """``kvm_lapic_reg_read`` of the 32-bit register at ``offset`` (VMI ``apic_read``).

        Mode-aware like the MMIO/MSR paths but without size or alignment rules and
        without the hw-enable check (as KVM's register helpers).  In x2APIC mode ICR
        reads as the 64-bit value.

        Raises:
            GuestFault: #GP for an unknown or unreadable register.
        """
        if self.x2apic_mode and offset == r.APIC_ICR:
            return self._icr64()
        value = self._read(offset, now)
        if value is None:
            raise _gp(f"apic_read {offset:#x}: not readable")
        return value

    def reg_write(self, offset: int, value: int, now: int) -> None:
        """``kvm_lapic_reg_write`` of ``value`` to the register at ``offset`` (VMI ``apic_write``).

        In x2APIC mode an ICR write takes the 64-bit value (destination in 63:32).

        Raises:
            GuestFault: #GP for an unknown or read-only register, a value wider than 32
                bits, or a write the current mode refuses.
        """
        if self.x2apic_mode and offset == r.APIC_ICR:
            if not 0 <= value <= r.U64:
                raise _gp("apic_write ICR: value out of range")
            self._x2apic_icr_write(value)
            return
        if not 0 <= value <= r.U32:
            raise _gp(f"apic_write {offset:#x}: value wider than 32 bits")
        if not self._write(offset, value, now):
            raise _gp(f"apic_write {offset:#x}: not writable")

    # ------------------------------------------------------------------ dispatch tables

    def _read(self, offset: int, now: int) -> int | None:
        """Aligned 32-bit read in the current mode; ``None`` = KVM's failure."""
        reg = r.REGISTERS.get(offset)
        if reg is None or not reg.readable(self.x2apic_mode, self._cmci):
            return None
        return self._readers.get(offset, self._read_plain)(offset, now)

    def _write(self, offset: int, value: int, now: int) -> bool:
        """Aligned 32-bit write in the current mode; ``False`` = KVM's failure."""
        reg = r.REGISTERS.get(offset)
        if reg is None or not reg.writable(self.x2apic_mode, self._cmci):
            return False
        return self._writers[offset](offset, value, now)

    def _readers_table(self) -> dict[int, _Reader]:
        table: dict[int, _Reader] = {
            r.APIC_ARBPRI: lambda off, now: 0,  # KVM: reads 0
            r.APIC_PROCPRI: lambda off, now: self.ppr,  # recomputed on read
            r.APIC_TMCCT: lambda off, now: self._tmcct(now),
        }
        for i in range(r.APIC_VECTOR_WORDS):
            table[r.APIC_ISR + 0x10 * i] = self._read_vector_word
            table[r.APIC_TMR + 0x10 * i] = self._read_vector_word
            table[r.APIC_IRR + 0x10 * i] = self._read_vector_word
        return table

    def _writers_table(self) -> dict[int, _Writer]:
        table: dict[int, _Writer] = {
            r.APIC_ID: self._w_masked,
            r.APIC_TASKPRI: self._w_tpr,
            r.APIC_EOI: self._w_eoi,
            r.APIC_LDR: self._w_masked,
            r.APIC_DFR: self._w_masked,
            r.APIC_SPIV: self._w_svr,
            r.APIC_ESR: self._w_esr,
            r.APIC_ICR: self._w_icr,
            r.APIC_ICR2: self._w_masked,
            r.APIC_LVTT: self._w_lvtt,
            r.APIC_TMICT: self._w_tmict,
            r.APIC_TDCR: self._w_tdcr,
            r.APIC_SELF_IPI: self._w_self_ipi,
        }
        for off in r.APIC_LVTS_CMCI:
            if off != r.APIC_LVTT:
                table[off] = self._w_lvt
        return table

    def _read_plain(self, offset: int, now: int) -> int:
        return self._regs[offset]

    def _read_vector_word(self, offset: int, now: int) -> int:
        if offset >= r.APIC_IRR:
            bits, base = self._irr, r.APIC_IRR
        elif offset >= r.APIC_TMR:
            bits, base = self._tmr, r.APIC_TMR
        else:
            bits, base = self._isr, r.APIC_ISR
        return (bits >> (32 * ((offset - base) >> 4))) & r.U32

    def _w_masked(self, offset: int, value: int, now: int) -> bool:
        """ID (xAPIC), LDR (xAPIC), DFR (xAPIC), ICR2 (xAPIC): store with the table's mask."""
        reg = r.REGISTERS[offset]
        self._regs[offset] = (value & reg.write_mask) | reg.write_set
        return True

    def _w_tpr(self, offset: int, value: int, now: int) -> bool:
        # KVM masks with 0xFF and never #GPs on reserved TPR bits, even in x2APIC mode
        self._regs[r.APIC_TASKPRI] = value & r.APIC_TPR_MASK
        self.port.irq_state_changed()  # PPR may have dropped
        return True

    def _w_eoi(self, offset: int, value: int, now: int) -> bool:
        # the value is ignored; KVM does not #GP a non-zero x2APIC EOI write (the SDM does)
        self.eoi()
        return True

    def _w_svr(self, offset: int, value: int, now: int) -> bool:
        mask = r.APIC_SPIV_MASK | (r.APIC_SPIV_DIRECTED_EOI if self._directed_eoi else 0)
        was_enabled = self.sw_enabled
        self._regs[r.APIC_SPIV] = value & mask
        if not value & r.APIC_SPIV_APIC_ENABLED:
            # software disable masks every LVT and drops a pending timer tick; the timer
            # itself keeps running (section 1)
            for off in self._lvts:
                self._regs[off] |= r.APIC_LVT_MASKED
            self._update_lvtt()
        elif not was_enabled:
            self.port.irq_state_changed()
        return True

    def _w_esr(self, offset: int, value: int, now: int) -> bool:
        # accepted and ignored (KVM never latches ESR); x2APIC: non-zero => #GP (section 2)
        return not (self.x2apic_mode and value != 0)

    def _w_icr(self, offset: int, value: int, now: int) -> bool:
        """xAPIC ICR low write: send now with the current ICR2; BUSY never stored (section 4)."""
        value &= ~r.APIC_ICR_BUSY
        self._send_ipi(value, self._regs[r.APIC_ICR2] >> r.APIC_ICR2_DEST_SHIFT)
        self._regs[r.APIC_ICR] = value
        return True

    def _w_self_ipi(self, offset: int, value: int, now: int) -> bool:
        if not self.x2apic_mode or value & ~r.APIC_VECTOR_MASK:
            return False
        self._send_ipi(r.APIC_DEST_SELF | value, 0)
        return True

    def _w_lvt(self, offset: int, value: int, now: int) -> bool:
        if offset not in self._lvts:
            return False  # CMCI without MCG_CMCI_P
        if not self.sw_enabled:
            value |= r.APIC_LVT_MASKED
        self._regs[offset] = value & self._lvt_masks[offset]
        return True

    def _w_lvtt(self, offset: int, value: int, now: int) -> bool:
        if not self.sw_enabled:
            value |= r.APIC_LVT_MASKED
        self._regs[r.APIC_LVTT] = value & self._lvt_masks[r.APIC_LVTT]
        self._update_lvtt()
        return True

    def _w_tmict(self, offset: int, value: int, now: int) -> bool:
        if self._is_tscdeadline():
            return True  # ignored entirely in TSC-deadline mode (section 3)
        self._cancel()
        self._regs[r.APIC_TMICT] = value
        self._start_apic_timer(now)
        return True

    def _w_tdcr(self, offset: int, value: int, now: int) -> bool:
        old_divisor = self._divisor
        self._regs[r.APIC_TDCR] = value & r.APIC_TDCR_MASK
        self._divisor = tdcr_divisor(self._regs[r.APIC_TDCR])
        if self.mutations.on("ignore-tdcr"):
            self._divisor = tdcr_divisor(0)  # mutation: the reset divisor whatever TDCR says
        # DEVIATION: KVM rescales whenever period != 0, even when a one-shot has already
        # expired (target_expiration = 0), which re-arms it at "now" and fires a second,
        # spurious one-shot interrupt.  We rescale only a timer that is still counting.
        if self._divisor != old_divisor and self._period and self._target is not None:
            self._cancel()
            self._update_target_expiration(now, old_divisor)
            self._restart_apic_timer(now)
        return True

    # ------------------------------------------------------------------ IPIs

    def _send_ipi(self, icr_low: int, dest: int) -> None:
        """``kvm_apic_send_ipi``: the host routes it (``delivery.deliver``)."""
        self.stats.ipis_sent += 1
        self.port.send_ipi(self.vcpu_id, icr_low, dest)

    # ------------------------------------------------------------------ interrupts

    def accept_irq(
        self,
        vector: int,
        *,
        delivery_mode: int = r.DeliveryMode.FIXED,
        level: bool = True,
        trigger_level: bool = False,
        now: int,
    ) -> bool:
        """``__apic_accept_irq`` (section 4): latch an interrupt for this vCPU.

        Fixed/lowest-priority: dropped unless the APIC is hw+sw enabled or when a level
        interrupt is de-asserted; TMR follows the trigger mode; a vector already pending
        in IRR is coalesced.  NMI: pending count (at most 2, or 1 while an NMI handler
        runs -- KVM's ``process_nmi``).  INIT (unless a level de-assert), SIPI, SMI and
        remote-read (PV kick) are latched.  ExtINT is not accepted here.

        Returns:
            True if the interrupt was latched (a new IRR bit, NMI, INIT, SIPI, ...).
            DEVIATION: current KVM returns 1 for a coalesced fixed interrupt; older KVM
            (``apic_test_and_set_irr``) returned 0, which is what we report so the
            sender can count coalescing (invariant 5).
        """
        if not 0 <= vector < r.NR_VECTORS:
            raise ValueError(f"vector {vector} out of range")
        dm = delivery_mode & r.APIC_DM_MASK
        if dm in (r.DeliveryMode.FIXED, r.DeliveryMode.LOWEST):
            if (trigger_level and not level) or not self.enabled:
                self.stats.dropped += 1
                return False
            bit = 1 << vector
            if trigger_level:
                self._tmr |= bit
            else:
                self._tmr &= ~bit
            if self._irr & bit:
                self.stats.coalesced += 1
                return False
            self._irr |= bit
            self.stats.accepted += 1
            self.port.irq_state_changed()
            return True
        if dm == r.DeliveryMode.NMI:
            self.stats.nmi += 1
            limit = 1 if self.nmi_in_service else 2
            if self.nmi_pending >= limit:
                self.stats.nmi_dropped += 1
            else:
                self.nmi_pending += 1
            self.port.irq_state_changed()
            return True
        if dm == r.DeliveryMode.INIT:
            if trigger_level and not level:
                return False  # INIT level de-assert is ignored
            self.stats.init += 1
            self.init_pending = True
            self.port.irq_state_changed()
            return True
        if dm == r.DeliveryMode.STARTUP:
            self.stats.sipi += 1
            self.sipi_vector = vector
            self.sipi_pending = True
            self.port.irq_state_changed()
            return True
        if dm == r.DeliveryMode.SMI:
            self.stats.smi += 1
            self.smi_pending = True
            self.port.irq_state_changed()
            return True
        if dm == r.DeliveryMode.REMRD:
            self.stats.kicks += 1
            self.pv_unhalted = True
            self.port.irq_state_changed()
            return True
        return False  # ExtINT: handled by the PIC path, never here

    def highest_deliverable(self) -> int | None:
        """The vector the host should inject next, or ``None``.

        The highest IRR vector ``v`` if the APIC is hw+sw enabled and
        ``(v & 0xF0) > PPR`` (``apic_has_interrupt_for_ppr``, section 5).  With timer
        advance the host must also hold the LVTT vector until ``inject_not_before``.
        """
        if not self._irr or not self.enabled:
            return None
        vector = self._irr.bit_length() - 1
        if (vector & r.APIC_PRIO_CLASS) <= self.ppr:
            return None
        return vector

    def ack(self) -> int | None:
        """The guest takes the highest deliverable interrupt: IRR -> ISR, PPR recomputed."""
        vector = self.highest_deliverable()
        if vector is None:
            return None
        bit = 1 << vector
        self._irr &= ~bit
        self._isr |= bit
        if vector == self._regs[r.APIC_LVTT] & r.APIC_VECTOR_MASK:
            self.inject_not_before = None
        return vector

    def eoi(self) -> int | None:
        """``apic_set_eoi``: clear the highest ISR bit; an empty ISR makes it a no-op.

        Returns:
            The vector whose ISR bit was cleared, or ``None``.
        """
        if not self._isr:
            self.stats.eoi_noop += 1
            return None
        if self.mutations.sometimes("lost-eoi"):
            return None  # mutation: the EOI is ignored, the vector stays in service
        vector = self._isr.bit_length() - 1
        self._isr &= ~(1 << vector)
        self.stats.eois += 1
        if self._tmr >> vector & 1:
            # level-triggered: KVM forwards the EOI to the in-kernel IOAPIC; vtick has none
            self.stats.eoi_level += 1
        self.port.irq_state_changed()
        return vector

    def take_nmi(self) -> bool:
        """The host injects a pending NMI (if one is pending and no NMI handler is running)."""
        if not self.nmi_pending or self.nmi_in_service:
            return False
        self.nmi_pending -= 1
        self.nmi_in_service = True
        return True

    def nmi_iret(self) -> None:
        """The guest's NMI handler returned (IRET): NMIs are unblocked."""
        self.nmi_in_service = False
        if self.nmi_pending:
            self.port.irq_state_changed()

    def take_init(self) -> bool:
        """Consume a latched INIT."""
        pending, self.init_pending = self.init_pending, False
        return pending

    def take_sipi(self) -> int | None:
        """Consume a latched SIPI; returns its vector."""
        if not self.sipi_pending:
            return None
        self.sipi_pending = False
        return self.sipi_vector

    def deliver_lvt(self, offset: int, now: int) -> bool:
        """``kvm_apic_local_deliver``: raise the local interrupt described by an LVT.

        Delivered (vector, delivery mode and trigger of the LVT) only if the APIC is
        hw-enabled and the LVT is unmasked.
        """
        reg = self.lvt(offset)
        if not self.hw_enabled or reg & r.APIC_LVT_MASKED:
            if offset == r.APIC_LVTT:
                self.stats.timer_ticks_masked += 1
            return False
        return self.accept_irq(
            reg & r.APIC_VECTOR_MASK,
            delivery_mode=reg & r.APIC_MODE_MASK,
            level=True,
            trigger_level=bool(reg & r.APIC_LVT_LEVEL_TRIGGER),
            now=now,
        )

    # ------------------------------------------------------------------ timer

    def _is_tscdeadline(self) -> bool:
        return self._timer_mode == r.APIC_LVT_TIMER_TSCDEADLINE

    def _is_periodic(self) -> bool:
        return self._timer_mode == r.APIC_LVT_TIMER_PERIODIC

    def _tmict_to_ns(self) -> int:
        return self._regs[r.APIC_TMICT] * self._bus_ns * self._divisor

    def _tmcct(self, now: int) -> int:
        """``apic_get_tmcct`` (section 3): never ticked, derived from the target."""
        if self._is_tscdeadline() or not self._regs[r.APIC_TMICT] or not self._period:
            return 0
        if self._target is None:
            return 0  # one-shot expired (KVM zeroes target_expiration)
        remaining = max(0, self._target - now)
        # KVM edge: at remaining == period exactly the modulo yields 0
        return (remaining % self._period) // (self._bus_ns * self._divisor)

    def _arm(self, expiry: int) -> None:
        self._armed = expiry
        self.port.arm_timer(expiry)

    def _cancel(self) -> None:
        if self._armed is not None:
            self._armed = None
            self.port.cancel_timer()

    def _limit_periodic_timer_frequency(self) -> None:
        """Periodic mode only: raise period to ``min_timer_period_ns`` (KVM 200 us)."""
        if self._is_periodic() and self._period and self._period < self._min_period:
            if self.mutations.on("periodic-no-clamp"):
                return  # mutation: the period stays below KVM's minimum
            self._period = self._min_period
            self.stats.timer_period_clamped += 1

    def _update_lvtt(self) -> None:
        """``apic_update_lvtt``: a timer-mode change (section 3, test_apic_change_mode).

        Into or out of TSC-deadline mode: cancel, TMICT = period = deadline = 0.  Between
        one-shot and periodic the countdown is untouched; the new mode decides at expiry.
        """
        mode = self._regs[r.APIC_LVTT] & self._timer_mode_mask
        if mode == self._timer_mode:
            return
        if self._is_tscdeadline() != (mode == r.APIC_LVT_TIMER_TSCDEADLINE):
            self._cancel()
            self._regs[r.APIC_TMICT] = 0
            self._period = 0
            self._target = None
            self._tscdeadline = 0
        self._timer_mode = mode
        self._limit_periodic_timer_frequency()

    def _set_target_expiration(self, now: int) -> bool:
        self._period = self._tmict_to_ns()
        if not self._period:
            self._tscdeadline = 0
            self._target = None  # TMICT = 0: stopped, TMCCT reads 0
            return False
        self._limit_periodic_timer_frequency()
        self._target = now + self._period
        return True

    def _update_target_expiration(self, now: int, old_divisor: int) -> None:
        """TDCR changed while counting: rescale the remaining time by new/old divisor."""
        assert self._target is not None
        self._period = self._tmict_to_ns()
        self._limit_periodic_timer_frequency()
        remaining = max(0, self._target - now)
        self._target = now + remaining * self._divisor // old_divisor

    def _start_apic_timer(self, now: int) -> None:
        if not self._is_tscdeadline() and not self._set_target_expiration(now):
            return
        self._restart_apic_timer(now)

    def _restart_apic_timer(self, now: int) -> None:
        if self._is_tscdeadline():
            self._start_sw_tscdeadline(now)
        else:
            self._start_sw_period(now)

    def _start_sw_period(self, now: int) -> None:
        if not self._period or self._target is None:
            return
        if now > self._target:
            self._timer_expired(now)
            if not self._is_periodic():
                return
            self._advance_periodic_target(now)
        self._arm(self._target)

    def _start_sw_tscdeadline(self, now: int) -> None:
        deadline = self._tscdeadline
        if not deadline or not self.port.tsc_khz:
            return
        advance = self.timer_advance_ns if self._advance else 0
        if deadline > self.port.guest_tsc(now):
            # DEVIATION: KVM converts (deadline - tsc) * 1e6 / tsc_khz with truncation,
            # which can arm the hrtimer up to 1 ns before the guest TSC reaches the
            # deadline; we ask the port for the first host ns at which it has.
            expire = self.port.tsc_to_host_ns(deadline)
            if expire - now > advance:
                self._arm(expire - advance)
                return
        # past (or within the advance window): fire during this very write (section 3)
        self._timer_expired(now)

    def _advance_periodic_target(self, now: int) -> None:
        """Drift-free re-arm from the previous target; missed periods are coalesced.

        DEVIATION (folded, same observable result): KVM sets a target that fell into the
        past to "now", which re-fires at once and is swallowed by its pending counter;
        the next interrupt then comes one period after now.  We go there directly.
        """
        assert self._target is not None
        target = self._target + self._period
        if target <= now:
            self.stats.timer_missed_periods += (now - target) // self._period + 1
            target = now + self._period
        self._target = target

    def _timer_expired(self, now: int) -> None:
        """``apic_timer_expired`` + ``kvm_apic_inject_pending_timer_irqs``."""
        self.stats.timer_fires += 1
        if self._is_tscdeadline():
            deadline = self._tscdeadline
            reached = self.hw_enabled and not self._regs[r.APIC_LVTT] & r.APIC_LVT_MASKED
            self.deliver_lvt(r.APIC_LVTT, now)  # a coalesced tick still counts as reached
            if self._advance and deadline and reached:
                # KVM busy-waits in __kvm_wait_lapic_expire until the guest TSC reaches the
                # deadline before VM entry; the host honours inject_not_before instead
                not_before = self.port.tsc_to_host_ns(deadline)
                if not_before > now:
                    self.inject_not_before = not_before
                # ... and adapts only when the tick was injected and the advance is non-zero
                if self.timer_advance_ns:
                    self.record_timer_latency(self.port.guest_tsc(now) - deadline)
            self._tscdeadline = 0  # RDMSR reads 0 after firing
            return
        if not self._is_periodic():
            self._target = None  # one-shot done: TMCCT reads 0
        self.deliver_lvt(r.APIC_LVTT, now)

    def on_timer(self, now: int) -> None:
        """The host timer armed through ``port.arm_timer`` expired (``apic_timer_fn``).

        Delivers the LVTT vector (or drops it if masked).  Periodic mode re-arms from the
        previous target.  A call with nothing armed, or before the armed expiry, is
        counted in ``stats.timer_spurious`` and ignored.
        """
        if self._armed is None or now < self._armed:
            self.stats.timer_spurious += 1
            return
        self._armed = None
        self._timer_expired(now)
        if self._is_periodic() and self._period and self._target is not None:
            self._advance_periodic_target(now)
            self._arm(self._target)
        elif self.mutations.sometimes("double-fire"):
            self._arm(now + DOUBLE_FIRE_NS)  # mutation: the spent one-shot fires again

    def record_timer_latency(self, delta_tsc: int) -> None:
        """``adjust_lapic_timer_advance``: adapt ``timer_advance_ns`` to a measured error.

        Args:
            delta_tsc: guest TSC at injection minus the TSC deadline (negative = early).
                Errors outside 100..10000 cycles are ignored; the advance moves by 1/8 of
                the error in ns and falls back to 1000 ns if it leaves 0..5000 ns.
        """
        magnitude = abs(delta_tsc)
        khz = self.port.tsc_khz
        if not khz or not (
            r.LAPIC_TIMER_ADVANCE_ADJUST_MIN <= magnitude <= r.LAPIC_TIMER_ADVANCE_ADJUST_MAX
        ):
            return
        step = magnitude * 1_000_000 // khz // r.LAPIC_TIMER_ADVANCE_ADJUST_STEP
        advance = self.timer_advance_ns + (step if delta_tsc > 0 else -step)
        if not 0 <= advance <= r.LAPIC_TIMER_ADVANCE_NS_MAX:
            # KVM: a u32 that underflows or exceeds the max is reset to the initial value
            advance = r.LAPIC_TIMER_ADVANCE_NS_INIT
        self.timer_advance_ns = advance
        self.stats.timer_advance_adjustments += 1

    def _write_tscdeadline(self, value: int, now: int) -> None:
        """``kvm_set_lapic_tscdeadline_msr``: ignored unless hw-enabled in TSC-deadline mode."""
        if not self.hw_enabled or not self._is_tscdeadline():
            return
        self._cancel()
        self._tscdeadline = value  # 0 disarms
        self._start_apic_timer(now)

    # ------------------------------------------------------------------ migration (issue 13)

    #: the register page a migration carries, by the CDDL's field name (lapic-state).
    #: LVR is not among them: it is read-only and follows the destination's CPUID model
    #: (KVM derives it in kvm_apic_set_version, not from the saved page).
    _SAVED_REGS = {
        "id": r.APIC_ID,
        "tpr": r.APIC_TASKPRI,
        "ldr": r.APIC_LDR,
        "dfr": r.APIC_DFR,
        "svr": r.APIC_SPIV,
        "esr": r.APIC_ESR,
        "icr": r.APIC_ICR,
        "icr2": r.APIC_ICR2,
        "lvtt": r.APIC_LVTT,
        "lvtthmr": r.APIC_LVTTHMR,
        "lvtpc": r.APIC_LVTPC,
        "lvt0": r.APIC_LVT0,
        "lvt1": r.APIC_LVT1,
        "lvterr": r.APIC_LVTERR,
        "tmict": r.APIC_TMICT,
        "tdcr": r.APIC_TDCR,
    }
    #: LVTT timer-mode bits 18:17 <-> the small number the blob carries (SDM 11.5.1)
    _MODES = (r.APIC_LVT_TIMER_ONESHOT, r.APIC_LVT_TIMER_PERIODIC, r.APIC_LVT_TIMER_TSCDEADLINE)

    @staticmethod
    def _words(bits: int) -> list[int]:
        """A 256-bit vector array as the 8 32-bit words of the APIC page (word 0 first)."""
        return [(bits >> (32 * i)) & r.U32 for i in range(r.APIC_VECTOR_WORDS)]

    @staticmethod
    def _from_words(words: list[int]) -> int:
        return sum((w & r.U32) << (32 * i) for i, w in enumerate(words))

    def save(self, now: int) -> dict[str, Any]:
        """This LAPIC's architectural state at host time ``now`` (CDDL ``lapic-state``).

        As KVM_GET_LAPIC: the register page, IRR/ISR/TMR and APIC_BASE (EXTD = x2APIC
        mode), and the timer as a *count*: one-shot and periodic save the time left to
        the next expiry (KVM saves TMCCT; we keep it in ns, TMCCT = remaining // (bus
        cycle * divisor), so no sub-count precision is lost), TSC-deadline saves the
        deadline in guest TSC cycles.  No host time leaves: ``inject_not_before`` travels
        as the guest TSC it stands for.  Counters (``stats``) are not state and stay.
        """
        regs = {name: self._regs[off] for name, off in self._SAVED_REGS.items()}
        if self._cmci:
            regs["lvtcmci"] = self._regs[r.APIC_LVTCMCI]
        timer: dict[str, Any] = {
            "mode": self._MODES.index(self._timer_mode),
            "period_ns": self._period,
            "armed": self._armed is not None,
            "tsc_deadline": self._tscdeadline,
            "advance_ns": self.timer_advance_ns,
        }
        if self._target is not None:
            timer["remaining_ns"] = self._target - now  # < 0: due, not yet fired
        if self.inject_not_before is not None:
            timer["not_before_tsc"] = self.port.guest_tsc(self.inject_not_before)
        state: dict[str, Any] = {
            "apic_base": self._apic_base,
            **regs,
            "irr": self._words(self._irr),
            "isr": self._words(self._isr),
            "tmr": self._words(self._tmr),
            "timer": timer,
            "nmi_pending": self.nmi_pending,
            "nmi_in_service": self.nmi_in_service,
            "init_pending": self.init_pending,
            "sipi_pending": self.sipi_pending,
            "smi_pending": self.smi_pending,
            "pv_unhalted": self.pv_unhalted,
        }
        if self.sipi_vector is not None:
            state["sipi_vector"] = self.sipi_vector
        return state

    def restore(self, state: dict[str, Any], now: int) -> None:
        """Load a :meth:`save` result at host time ``now`` and re-arm the timer.

        As KVM_SET_LAPIC (``kvm_apic_set_state``): registers are loaded as they are (no
        write side effects: no IPI is re-sent, no LVT is re-masked), then the timer
        restarts (``__start_apic_timer(apic, APIC_TMCCT)``): a one-shot or periodic count
        resumes from its saved remaining time at ``now``, so it is late by however long
        the VM was stopped; a TSC deadline is converted through this host's guest TSC,
        and one the guest TSC has already passed fires here, at once.

        Raises:
            ValueError: the state does not fit this LAPIC (CMCI LVT present on one side
                only, a mode this CPUID model cannot select).
        """
        if ("lvtcmci" in state) != self._cmci:
            raise ValueError("LVTCMCI present on one side only (MCG_CMCI_P differs)")
        timer = state["timer"]
        mode = self._MODES[timer["mode"]]
        if mode & ~self._timer_mode_mask:
            raise ValueError("TSC-deadline timer mode without the TSC_DEADLINE CPUID bit")
        self._cancel()
        self._apic_base = state["apic_base"]
        for name, off in self._SAVED_REGS.items():
            self._regs[off] = state[name]
        if self._cmci:
            self._regs[r.APIC_LVTCMCI] = state["lvtcmci"]
        self._irr = self._from_words(state["irr"])
        self._isr = self._from_words(state["isr"])
        self._tmr = self._from_words(state["tmr"])
        self.nmi_pending = state["nmi_pending"]
        self.nmi_in_service = state["nmi_in_service"]
        self.init_pending = state["init_pending"]
        self.sipi_pending = state["sipi_pending"]
        self.sipi_vector = state.get("sipi_vector")
        self.smi_pending = state["smi_pending"]
        self.pv_unhalted = state["pv_unhalted"]
        self._timer_mode = mode
        self._divisor = tdcr_divisor(self._regs[r.APIC_TDCR])
        self._period = timer["period_ns"]  # already clamped on the source (path-dependent)
        self._tscdeadline = timer["tsc_deadline"]
        self.timer_advance_ns = timer["advance_ns"]
        nb = timer.get("not_before_tsc")
        self.inject_not_before = None if nb is None else self.port.tsc_to_host_ns(nb)
        remaining = timer.get("remaining_ns")
        self._target = None if remaining is None else now + remaining
        if timer["armed"]:
            if self._is_tscdeadline():
                self._start_sw_tscdeadline(now)
            elif self._target is not None:
                # armed even if already due: the host timer fires at the next expiry pass
                self._arm(self._target)
        self.port.irq_state_changed()
