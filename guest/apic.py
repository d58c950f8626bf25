"""APIC driver ops: one table of operations per way of talking to the local APIC.

As Linux swaps ``struct apic`` (``apic_flat``, ``apic_x2apic_phys``, ...) and as VMI and
KVM's paravirt code replace some of its members, each class here provides ``read``,
``write``, ``eoi``, the ICR and the ``send_IPI*`` family over one access method:

============  ==========================  ========================  ===========================
variant       register access             EOI                       IPI
============  ==========================  ========================  ===========================
``xapic``     MMIO (an exit each)         MMIO write                wait ICR idle (MMIO read),
                                                                    ICR2 + ICR per destination
``x2apic``    MSR 0x800 + off>>4          WRMSR 0x80B               one 64-bit ICR MSR write
``vmi``       apic_read/apic_write        apic_write(EOI)           as xAPIC, through hypercalls
              hypercalls
``kvm-pv``    x2APIC MSRs                 PV EOI flag (no exit      KVM_HC_SEND_IPI, 128-id
                                          when the host set it)     bitmap windows
============  ==========================  ========================  ===========================

``__send_IPI_shortcut`` waits for the ICR to be idle before writing it; under xAPIC that
wait is a real register read, hence an exit, even though KVM never reports the ICR busy
(reference section 4).  A named preemption point sits between the wait and the write.
The register map is ``vtick.proto.apicdef``, shared with the host's LAPIC model.
"""

from __future__ import annotations

from collections.abc import Iterable

from vtick.guest.cpu import (
    KernelOp,
    hypercall,
    mmio_read,
    mmio_write,
    preemption_point,
    rdmsr,
    wrmsr,
)
from vtick.proto import apicdef as a
from vtick.proto.abi import Hypercall, KvmErrno, Msr
from vtick.proto.catalog import APIC_NAMES, PREEMPT_ICR_IDLE_TO_WRITE

__all__ = [
    "ApicOps",
    "XApicOps",
    "X2ApicOps",
    "VmiApicOps",
    "KvmPvApicOps",
    "APIC_OPS",
    "PREEMPT_ICR_IDLE_TO_WRITE",
    "PV_IPI_WINDOW",
]

#: KVM_HC_SEND_IPI covers 128 APIC IDs from its minimum (two 64-bit bitmap words)
PV_IPI_WINDOW = 128
_SVR_ENABLE = a.APIC_SPIV_APIC_ENABLED | a.APIC_SPIV_VECTOR


class ApicOps:
    """Base: the APIC of CPU ``cpu``, whose APIC ID is its index (KVM's reset state)."""

    name = "abstract"

    def __init__(self, cpu: int, ncpus: int) -> None:
        self.cpu = cpu
        self.ncpus = ncpus
        self.base = a.APIC_DEFAULT_BASE
        self.pv_eoi_pending = False  # set by the interrupt path when an injection allows it
        self.pv_eois = 0

    # ---- register access, per variant

    def read(self, reg: int) -> KernelOp[int]:
        raise NotImplementedError
        yield  # pragma: no cover

    def write(self, reg: int, value: int) -> KernelOp[None]:
        raise NotImplementedError
        yield  # pragma: no cover

    # ---- setup

    def setup(self) -> KernelOp[None]:
        """``setup_local_APIC``: software-enable the APIC (SVR bit 8)."""
        yield from self.write(a.APIC_SPIV, _SVR_ENABLE)

    # ---- EOI

    def eoi(self) -> KernelOp[None]:
        yield from self.write(a.APIC_EOI, 0)

    # ---- IPIs

    def wait_icr_idle(self) -> KernelOp[None]:
        """``apic_wait_icr_idle``: spin while ICR's delivery-status bit is set."""
        while (yield from self.read(a.APIC_ICR)) & a.APIC_ICR_BUSY:
            pass

    def icr_write(self, low: int, dest: int) -> KernelOp[None]:
        yield from self.write(a.APIC_ICR2, (dest & 0xFF) << 24)
        yield from self.write(a.APIC_ICR, low)

    def send_shortcut(self, shortcut: int, vector: int) -> KernelOp[None]:
        """``__default_send_IPI_shortcut``: wait for ICR idle, then write ICR low only."""
        yield from self.wait_icr_idle()
        yield from preemption_point(PREEMPT_ICR_IDLE_TO_WRITE)
        yield from self.write(a.APIC_ICR, shortcut | a.APIC_DEST_PHYSICAL | vector)

    def send_IPI(self, cpu: int, vector: int) -> KernelOp[None]:  # noqa: N802 - Linux name
        """``__default_send_IPI_dest_field`` to one CPU (physical destination)."""
        yield from self.wait_icr_idle()
        yield from preemption_point(PREEMPT_ICR_IDLE_TO_WRITE)
        yield from self.icr_write(a.APIC_DEST_PHYSICAL | vector, cpu)

    def send_IPI_mask(self, cpus: Iterable[int], vector: int) -> KernelOp[None]:  # noqa: N802
        """Physical mode mask send: one IPI per destination."""
        for cpu in cpus:
            yield from self.send_IPI(cpu, vector)

    def send_IPI_allbutself(self, vector: int) -> KernelOp[None]:  # noqa: N802
        yield from self.send_shortcut(a.APIC_DEST_ALLBUT, vector)

    def send_IPI_all(self, vector: int) -> KernelOp[None]:  # noqa: N802
        yield from self.send_shortcut(a.APIC_DEST_ALLINC, vector)

    def send_IPI_self(self, vector: int) -> KernelOp[None]:  # noqa: N802
        yield from self.send_shortcut(a.APIC_DEST_SELF, vector)


class XApicOps(ApicOps):
    """xAPIC: every register access is an MMIO exit."""

    name = "xapic"

    def read(self, reg: int) -> KernelOp[int]:
        return (yield from mmio_read(self.base + reg))

    def write(self, reg: int, value: int) -> KernelOp[None]:
        yield from mmio_write(self.base + reg, value)


class X2ApicOps(ApicOps):
    """x2APIC: registers are MSRs, the ICR is one 64-bit MSR and there is no ICR wait."""

    name = "x2apic"

    def setup(self) -> KernelOp[None]:
        # xAPIC -> x2APIC: set EXTD with EN (reference section 1, APIC_BASE transitions)
        base = yield from rdmsr(a.MSR_IA32_APICBASE)
        yield from wrmsr(a.MSR_IA32_APICBASE, base | a.APICBASE_EN | a.APICBASE_EXTD)
        yield from super().setup()

    def read(self, reg: int) -> KernelOp[int]:
        return (yield from rdmsr(a.x2apic_msr(reg)))

    def write(self, reg: int, value: int) -> KernelOp[None]:
        yield from wrmsr(a.x2apic_msr(reg), value)

    def wait_icr_idle(self) -> KernelOp[None]:
        return  # x2APIC has no delivery-status bit to wait for (Linux: a no-op)
        yield  # pragma: no cover

    def icr_write(self, low: int, dest: int) -> KernelOp[None]:
        yield from wrmsr(a.x2apic_msr(a.APIC_ICR), (dest << 32) | low)

    def send_shortcut(self, shortcut: int, vector: int) -> KernelOp[None]:
        yield from preemption_point(PREEMPT_ICR_IDLE_TO_WRITE)
        yield from self.icr_write(shortcut | vector, 0)


class VmiApicOps(XApicOps):
    """VMI: the xAPIC programming model, each access a hypercall instead of an MMIO trap."""

    name = "vmi"

    def read(self, reg: int) -> KernelOp[int]:
        value = yield from hypercall(Hypercall.VTICK_VMI_APIC_READ, reg)
        if value < 0:
            raise ValueError(f"VMI apic_read({reg:#x}) failed: {value}")
        return value

    def write(self, reg: int, value: int) -> KernelOp[None]:
        rc = yield from hypercall(Hypercall.VTICK_VMI_APIC_WRITE, reg, value)
        if rc < 0:
            raise ValueError(f"VMI apic_write({reg:#x}) failed: {rc}")


class KvmPvApicOps(X2ApicOps):
    """KVM paravirt: x2APIC plus PV EOI and KVM_HC_SEND_IPI."""

    name = "kvm-pv"

    def __init__(self, cpu: int, ncpus: int, pv_eoi_gpa: int = 0x1000) -> None:
        super().__init__(cpu, ncpus)
        self.pv_eoi_gpa = pv_eoi_gpa

    def setup(self) -> KernelOp[None]:
        yield from super().setup()
        # kvm_guest_cpu_init: enable PV EOI with the (4-byte aligned) flag address
        yield from wrmsr(Msr.MSR_KVM_PV_EOI_EN, self.pv_eoi_gpa | 1)

    def eoi(self) -> KernelOp[None]:
        """``kvm_guest_apic_eoi_write``: test-and-clear the flag; trap only if it was clear."""
        if self.pv_eoi_pending:
            self.pv_eoi_pending = False
            self.pv_eois += 1
            return
        yield from super().eoi()

    def send_IPI_mask(self, cpus: Iterable[int], vector: int) -> KernelOp[None]:  # noqa: N802
        """``__send_ipi_mask``: pack APIC IDs into a 128-bit bitmap relative to the lowest
        one; flush a hypercall when the next ID falls outside the window."""
        ids = sorted(set(cpus))
        icr = a.DeliveryMode.FIXED | vector
        i = 0
        while i < len(ids):
            low = ids[i]
            bitmap = 0
            while i < len(ids) and ids[i] - low < PV_IPI_WINDOW:
                bitmap |= 1 << (ids[i] - low)
                i += 1
            rc = yield from hypercall(
                Hypercall.KVM_HC_SEND_IPI,
                bitmap & ((1 << 64) - 1),
                bitmap >> 64,
                low,
                icr,
            )
            if rc < 0 and rc != -KvmErrno.KVM_ENOSYS:
                raise ValueError(f"KVM_HC_SEND_IPI failed: {rc}")

    def send_IPI(self, cpu: int, vector: int) -> KernelOp[None]:  # noqa: N802
        yield from self.send_IPI_mask([cpu], vector)

    def send_IPI_allbutself(self, vector: int) -> KernelOp[None]:  # noqa: N802
        yield from self.send_IPI_mask([c for c in range(self.ncpus) if c != self.cpu], vector)

    def send_IPI_all(self, vector: int) -> KernelOp[None]:  # noqa: N802
        yield from self.send_IPI_mask(range(self.ncpus), vector)


APIC_OPS: dict[str, type[ApicOps]] = {
    cls.name: cls for cls in (XApicOps, X2ApicOps, VmiApicOps, KvmPvApicOps)
}
assert tuple(APIC_OPS) == APIC_NAMES, "vtick.proto.catalog.APIC_NAMES disagrees"
