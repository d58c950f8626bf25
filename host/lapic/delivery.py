"""IPI destination matching and delivery with KVM's rules (reference section 4).

Pure functions over a sequence of :class:`~vtick.host.lapic.lapic.Lapic` (index = vCPU).
This is KVM's slow path, ``kvm_irq_delivery_to_apic`` with ``kvm_apic_match_dest``; the
fast path (the APIC map) gives the same answers except where noted.

* Only targets whose APIC is hardware-enabled take part (``kvm_apic_present``).
* Shorthands: self => the sender; all-including => everyone; all-excluding => all but
  the sender.  The destination field is ignored.
* Physical: the broadcast ID is 0xFF for a target in xAPIC mode and 0xFFFFFFFF for one in
  x2APIC mode.  Otherwise the x2APIC ID is compared if the target is in x2APIC mode or
  ``dest > 0xFF`` (KVM's hotplug rule), else the xAPIC ID; every vCPU sharing an aliased
  xAPIC ID receives it (the slow path; KVM_X2APIC_API's alias quirk is not modelled).
* Logical: the mode's broadcast matches everyone; x2APIC: ``LDR[31:16] == dest[31:16]``
  and ``LDR[15:0] & dest[15:0]``; xAPIC flat (DFR 0xFFFFFFFF): ``LDR[31:24] & dest``;
  xAPIC cluster (DFR 0x0FFFFFFF): equal cluster nibble and overlapping member bits; any
  other DFR never matches.
* Lowest priority: among the matching targets whose APIC is software-enabled, the
  ``(vector mod N)``-th (KVM's default vector hashing).  Physical destination 0xFF with
  lowest priority is downgraded to fixed (slow path: only the 8-bit 0xFF, as KVM).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vtick.proto import apicdef as r

if TYPE_CHECKING:
    from vtick.host.lapic.lapic import Lapic

__all__ = ["match_destinations", "deliver", "route", "match_dest"]


def _mda(dest: int, ipi: bool, target: Lapic) -> int:
    """``kvm_apic_mda``: a non-IPI 0xFF broadcast to an x2APIC target means 0xFFFFFFFF."""
    if not ipi and dest == r.APIC_BROADCAST and target.x2apic_mode:
        return r.X2APIC_BROADCAST
    return dest


def _is_broadcast(target: Lapic, mda: int) -> bool:
    return mda == (r.X2APIC_BROADCAST if target.x2apic_mode else r.APIC_BROADCAST)


def _match_physical(target: Lapic, mda: int) -> bool:
    if _is_broadcast(target, mda):
        return True
    if target.x2apic_mode or mda > 0xFF:
        return mda == target.x2apic_id
    return mda == target.xapic_id


def _match_logical(target: Lapic, mda: int) -> bool:
    if _is_broadcast(target, mda):
        return True
    ldr = target.ldr
    if target.x2apic_mode:
        return (ldr >> 16) == (mda >> 16) and (ldr & mda & 0xFFFF) != 0
    logical_id = (ldr >> 24) & 0xFF
    dfr = target.dfr
    if dfr == r.APIC_DFR_FLAT:
        return (logical_id & mda) != 0
    if dfr == r.APIC_DFR_CLUSTER:
        return (logical_id >> 4) == (mda >> 4) and (logical_id & mda & 0xF) != 0
    return False


def match_dest(target: Lapic, is_source: bool, icr_low: int, dest: int, ipi: bool = True) -> bool:
    """``kvm_apic_match_dest`` for one target (hw-enable is the caller's business)."""
    shorthand = icr_low & r.APIC_SHORT_MASK
    if shorthand == r.APIC_DEST_NOSHORT:
        mda = _mda(dest, ipi, target)
        if icr_low & r.APIC_DEST_LOGICAL:
            return _match_logical(target, mda)
        return _match_physical(target, mda)
    if shorthand == r.APIC_DEST_SELF:
        return is_source
    if shorthand == r.APIC_DEST_ALLINC:
        return True
    return not is_source  # APIC_DEST_ALLBUT


def route(
    source_vcpu: int | None, icr_low: int, dest: int, lapics: Sequence[Lapic]
) -> tuple[list[int], int]:
    """Targets and the effective delivery mode of an interrupt message.

    Args:
        source_vcpu: sending vCPU index, or ``None`` for a non-IPI source (MSI/IOAPIC).

    Returns:
        (vCPU indices in ascending order, delivery mode after the broadcast downgrade).
    """
    mode = icr_low & r.APIC_DM_MASK
    lowest = mode == r.DeliveryMode.LOWEST
    if not icr_low & r.APIC_DEST_LOGICAL and dest == r.APIC_BROADCAST and lowest:
        # "apic: phys broadcast and lowest prio" -- KVM delivers it as fixed
        mode, lowest = int(r.DeliveryMode.FIXED), False
    ipi = source_vcpu is not None
    targets = [
        i
        for i, lapic in enumerate(lapics)
        if lapic.hw_enabled and match_dest(lapic, i == source_vcpu, icr_low, dest, ipi)
    ]
    if lowest:
        candidates = [i for i in targets if lapics[i].sw_enabled]
        if not candidates:
            return [], mode
        # kvm_vector_to_index: the (vector mod N)-th candidate
        targets = [candidates[(icr_low & r.APIC_VECTOR_MASK) % len(candidates)]]
    return targets, mode


def match_destinations(
    source_vcpu: int | None, icr_low: int, dest: int, lapics: Sequence[Lapic]
) -> list[int]:
    """vCPU indices an interrupt message with ``icr_low``/``dest`` is delivered to.

    Args:
        source_vcpu: sending vCPU index (``None`` for a non-IPI source).
        icr_low: ICR bits 31:0 (vector, delivery mode, dest mode, level, trigger, shorthand).
        dest: 8-bit xAPIC destination or 32-bit x2APIC destination.
        lapics: every vCPU's LAPIC, indexed by vCPU.
    """
    return route(source_vcpu, icr_low, dest, lapics)[0]


def deliver(
    source_vcpu: int | None, icr_low: int, dest: int, lapics: Sequence[Lapic], now: int
) -> list[int]:
    """Deliver an IPI: ``accept_irq`` on each matching target with the ICR's mode/level/trigger.

    Returns:
        The vCPU indices that accepted it (a coalesced or dropped fixed interrupt is not
        in the list).
    """
    targets, mode = route(source_vcpu, icr_low, dest, lapics)
    vector = icr_low & r.APIC_VECTOR_MASK
    level = bool(icr_low & r.APIC_INT_ASSERT)
    trigger_level = bool(icr_low & r.APIC_INT_LEVELTRIG)
    return [
        i
        for i in targets
        if lapics[i].accept_irq(
            vector, delivery_mode=mode, level=level, trigger_level=trigger_level, now=now
        )
    ]
