"""The host's pure model of a VM: per-vCPU exit dispatch, interrupt injection, HLT.

No I/O and no clock: every entry point takes ``now`` (host CLOCK_MONOTONIC ns) and
queues what must happen as :class:`Action` values that the server drains
(:meth:`Machine.take_actions`).  Devices plug in by registering handlers in the dispatch
tables of :class:`Machine` (hypercall numbers, MSRs, port ranges, MMIO ranges), the way
KVM routes an exit to ``apic_mmio_ops`` or ``kvm_emulate_hypercall``; an exit nobody
claims gets the architectural answer (#GP for an unknown MSR, all-ones for unclaimed
MMIO and ports, -KVM_ENOSYS for an unknown hypercall) and is counted.

Every vCPU has a local APIC (``vtick.host.lapic``), as KVM's in-kernel LAPIC: devices
raise interrupts through it (IRR, coalescing, priority against PPR), and an interrupt is
injected when it becomes deliverable, at which moment it is acknowledged (IRR -> ISR) as
on VM entry.  The next one of the same or lower priority waits for the guest's EOI.

A halted vCPU is blocked in the host, as KVM blocks it in ``kvm_vcpu_block``: its
``exit-hlt`` is answered only when an interrupt is pending for it, or at shutdown.

For a chaos run (``host/chaos/``) the server sets :attr:`Machine.record`, a sink for
``vtick.proto.eventlog`` host records, and the Machine names where each interrupt came
from, by ids instead of times: a host timer keeps the number of the guest exit that
armed it (its *origin*), a timer interrupt carries the origin of the timer that raised
it, and an IPI is named by (source vCPU, source generation, source exit number) from
its delivery to the injection that carries it (coalesced ones ride along with the
pending one).  Without ``record`` none of this is kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from vtick.host.faults import GuestFault
from vtick.host.hrtimer import HrtimerQueue
from vtick.host.lapic.delivery import deliver, route
from vtick.host.lapic.lapic import Lapic
from vtick.host.mutations import Mutations
from vtick.proto import apicdef as lapic_regs
from vtick.proto import messages as m
from vtick.proto.abi import Fault, KvmErrno, Vector
from vtick.proto.eventlog import (
    H_IPI,
    H_TARM,
    H_TFIRE,
    IPI_ACCEPTED,
    IPI_COALESCED,
    IPI_NOT_ACCEPTED,
)
from vtick.proto.pvclock import PvclockInfo, TscModel

#: the NMI's vector number in the IDT
NMI_VECTOR = 2
#: how early the ``early-timer`` mutation fires a host timer (vtick.host.mutations)
EARLY_TIMER_NS = 1_000_000

__all__ = [
    "Action",
    "InjectIrq",
    "CompleteHlt",
    "ExitResult",
    "Machine",
    "VcpuState",
    "HypercallHandler",
]


@dataclass(frozen=True, slots=True)
class InjectIrq:
    vcpu: int
    vector: int
    now: int
    #: timer advance: do not deliver before this host time (KVM busy-waits until the
    #: TSC deadline before entry; the server does the same before sending)
    not_before: int | None = None
    #: the PV EOI flag is set for this interrupt: the vCPU may EOI without an exit
    pv_eoi: bool = False
    #: chaos history: the guest exit that armed the timer behind it (0: none/unknown)
    origin: int = 0
    #: chaos history: the IPIs it carries, (source, source generation, source exit)
    ipis: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class CompleteHlt:
    """Answer the halted vCPU's pending ``exit-hlt`` (it is runnable again)."""

    vcpu: int
    re: int


Action = InjectIrq | CompleteHlt


@dataclass(frozen=True, slots=True)
class ExitResult:
    value: int = 0
    fault: int = Fault.NONE
    #: the reply is sent later (a HLT that blocks)
    deferred: bool = False


#: handler(vcpu_state, args, now) -> RAX value
HypercallHandler = Callable[["VcpuState", list[int], int], int]
#: rdmsr(vcpu_state, msr, now) -> value; may raise GuestFault
MsrReader = Callable[["VcpuState", int, int], int]
#: wrmsr(vcpu_state, msr, value, now); may raise GuestFault
MsrWriter = Callable[["VcpuState", int, int, int], None]
#: in(vcpu_state, port, size, now) -> value
PortReader = Callable[["VcpuState", int, int, int], int]
#: out(vcpu_state, port, size, value, now)
PortWriter = Callable[["VcpuState", int, int, int, int], None]
#: mmio read(vcpu_state, gpa, size, now) -> value; may raise GuestFault
MmioReader = Callable[["VcpuState", int, int, int], int]
#: mmio write(vcpu_state, gpa, size, value, now); may raise GuestFault
MmioWriter = Callable[["VcpuState", int, int, int, int], None]
#: does this region claim gpa for this vCPU?  (the APIC page moves with APIC_BASE)
MmioClaim = Callable[["VcpuState", int], bool]


@dataclass(frozen=True, slots=True)
class _Range:
    first: int
    last: int
    name: str
    read: Callable[..., int]
    write: Callable[..., None]


@dataclass(frozen=True, slots=True)
class _MmioRegion:
    name: str
    claims: MmioClaim
    read: MmioReader
    write: MmioWriter


#: timer callback(vcpu_state, now)
TimerCallback = Callable[["VcpuState", int], None]


@dataclass
class VcpuState:
    """Host-side state of one vCPU."""

    vcpu: int
    machine: Machine
    pvclock: PvclockInfo
    halted_exit: int | None = None  # seq of the exit-hlt awaiting its answer
    unclaimed: Counter[str] = field(default_factory=Counter)
    injected: int = 0
    #: feature bits negotiated in this vCPU's handshake; devices gate on them
    features: int = 0
    #: model bugs caught outside an exit (a timer callback that raised)
    bugs: list[str] = field(default_factory=list)

    lapic: Lapic = field(init=False)
    #: MSR_KVM_PV_EOI_EN as last written, and the vector whose EOI the vCPU may do by
    #: clearing the PV EOI flag (set at injection, consumed when an exit reports it)
    pv_eoi_msr: int = 0
    pv_eoi_enabled: bool = False
    pv_eoi_vector: int | None = None
    pv_eois: int = 0
    #: chaos history (Machine.record set): resets seen, the origin of a timer interrupt
    #: in IRR by vector, the IPIs pending in IRR by vector
    generation: int = 0
    irq_origin: dict[int, int] = field(default_factory=dict)
    ipi_pending: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)

    def raise_irq(self, vector: int, now: int) -> bool:
        """A device raises a fixed, edge-triggered interrupt at this vCPU's LAPIC.

        Returns False if it was coalesced with the same vector already pending in IRR,
        or dropped because the APIC is disabled (counted in ``lapic.stats``).
        """
        accepted = self.lapic.accept_irq(vector, now=now)
        self.machine.update_injection(self, now)
        return accepted

    def wake(self) -> None:
        if self.halted_exit is not None:
            self.machine._actions.append(CompleteHlt(self.vcpu, self.halted_exit))
            self.halted_exit = None

    # ------------------------------------------------------------------ migration (issue 13)

    def save(self, now: int) -> dict[str, Any]:
        """This vCPU's host-side state at host time ``now`` (CDDL ``vcpu-state`` minus
        the device and link parts, which ``vtick.host.migration`` adds).

        What changes behaviour travels: the negotiated features (devices gate on them),
        the deferred exit-hlt, PV EOI (MSR, enabled, the vector whose flag is set), the
        LAPIC, the actions queued for this vCPU that the server has not sent yet, and
        the chaos history ids.  Counters (``unclaimed``, ``injected``, ``pv_eois``,
        ``bugs``) are statistics and stay behind.  No host time leaves: an injection's
        raise time travels as guest ktime (the TscModel's, ``host - ktime_epoch``) and
        its timer-advance hold as the guest TSC it waits for.
        """
        machine = self.machine
        tsc = machine.tsc
        pending: list[dict[str, Any]] = []
        for action in machine._actions:
            if action.vcpu != self.vcpu:
                continue
            if isinstance(action, CompleteHlt):
                pending.append({"hlt_done": action.re})
                continue
            entry: dict[str, Any] = {
                "vector": action.vector,
                "raised_ns": action.now - tsc.ktime_epoch,
            }
            if action.not_before is not None:
                # not_before is tsc_to_host_ns(deadline): the first ns of its TSC tick,
                # so host_ns_for_tsc(tsc(not_before)) gives it back exactly
                entry["not_before_tsc"] = tsc.tsc(action.not_before)
            if action.pv_eoi:
                entry["pv_eoi"] = True
            if action.origin:
                entry["origin"] = action.origin
            if action.ipis:
                entry["ipis"] = [list(ipi) for ipi in action.ipis]
            pending.append(entry)
        pv_eoi: dict[str, Any] = {"msr": self.pv_eoi_msr, "enabled": self.pv_eoi_enabled}
        if self.pv_eoi_vector is not None:
            pv_eoi["vector"] = self.pv_eoi_vector
        timers = [
            {"timer": name, "origin": origin}
            for (name, vcpu), (origin, _) in machine._timer_origin.items()
            if vcpu == self.vcpu and machine.hrtimers.expiry((name, vcpu)) is not None
        ]
        state: dict[str, Any] = {
            "vcpu": self.vcpu,
            "features": self.features,
            "pv_eoi": pv_eoi,
            "lapic": self.lapic.save(now),
            "pending": pending,
            "history": {
                "generation": self.generation,
                # int(): a vector may be a Vector (IntEnum), which the schema's exact
                # type check refuses (the timer vector's origin, found by chaos runs)
                "irq_origin": [
                    {"vector": int(v), "origin": int(o)} for v, o in self.irq_origin.items()
                ],
                "ipi_pending": [
                    {"vector": int(v), "ipis": [[int(x) for x in ipi] for ipi in ipis]}
                    for v, ipis in self.ipi_pending.items()
                ],
                "timers": timers,
            },
        }
        if self.halted_exit is not None:
            state["halted"] = self.halted_exit
        return state

    def restore(self, state: dict[str, Any], now: int) -> None:
        """Load a :meth:`save` result into this (fresh) vCPU at host time ``now``.

        Queued actions are put back first, in their order, so they go out before
        anything the restore itself raises; then the LAPIC restarts its timer (which
        may fire at once: a TSC deadline passed during the blackout).  ``pvclock`` is
        not part of this map: ``vtick.host.migration`` restores it before calling here.

        Raises:
            ValueError: the state belongs to another vCPU or does not fit its LAPIC.
        """
        if state["vcpu"] != self.vcpu:
            raise ValueError(f"state of vCPU {state['vcpu']} restored into vCPU {self.vcpu}")
        machine = self.machine
        tsc = machine.tsc
        self.features = state["features"]
        self.halted_exit = state.get("halted")
        pv_eoi = state["pv_eoi"]
        self.pv_eoi_msr = pv_eoi["msr"]
        self.pv_eoi_enabled = pv_eoi["enabled"]
        self.pv_eoi_vector = pv_eoi.get("vector")
        history = state["history"]
        self.generation = history["generation"]
        self.irq_origin = {e["vector"]: e["origin"] for e in history["irq_origin"]}
        self.ipi_pending = {
            e["vector"]: [(s, g, q) for s, g, q in e["ipis"]] for e in history["ipi_pending"]
        }
        for entry in history["timers"]:
            # re-armed timers keep the exit that armed them (Machine.arm_timer reads it)
            machine._timer_origin[(entry["timer"], self.vcpu)] = (entry["origin"], 0)
        for entry in state["pending"]:
            if "hlt_done" in entry:
                machine._actions.append(CompleteHlt(self.vcpu, entry["hlt_done"]))
                continue
            nb = entry.get("not_before_tsc")
            machine._actions.append(
                InjectIrq(
                    self.vcpu,
                    entry["vector"],
                    tsc.ktime_epoch + entry["raised_ns"],
                    None if nb is None else tsc.host_ns_for_tsc(nb),
                    entry.get("pv_eoi", False),
                    origin=entry.get("origin", 0),
                    ipis=tuple((s, g, q) for s, g, q in entry.get("ipis", ())),
                )
            )
        self.lapic.restore(state["lapic"], now)

    def save_stats(self) -> dict[str, Any]:
        """This vCPU's statistics counters (CDDL ``vcpu-stats`` minus ``devices``).

        Not state (nothing behaves differently for them), but a migrated run's results
        and the chaos checker ``lapic-consistent`` (injections = EOIs + vectors in
        service) read them as whole-run figures: they travel so that the destination's
        counters continue the source's instead of restarting at zero.
        """
        return {
            "lapic": counters_of(self.lapic.stats),
            "injected": self.injected,
            "pv_eois": self.pv_eois,
            "unclaimed": dict(self.unclaimed),
        }

    def restore_stats(self, stats: dict[str, Any]) -> None:
        """Load :meth:`save_stats` into this (fresh) vCPU, before anything it restores
        counts (a pending injection, a timer due during the blackout): those add to the
        source's figures."""
        load_counters(self.lapic.stats, stats["lapic"])
        self.injected = stats["injected"]
        self.pv_eois = stats["pv_eois"]
        self.unclaimed = Counter(stats["unclaimed"])


def counters_of(stats: Any) -> dict[str, int]:
    """The integer fields of a statistics dataclass, by name (issue 13: they migrate)."""
    return {f.name: v for f in fields(stats) if isinstance(v := getattr(stats, f.name), int)}


def load_counters(stats: Any, counts: dict[str, int]) -> None:
    """Set a statistics dataclass's integer fields from ``counts``; names this vtick
    does not know (another version's) are ignored, missing ones stay as they are."""
    for f in fields(stats):
        if f.name in counts and isinstance(getattr(stats, f.name), int):
            setattr(stats, f.name, counts[f.name])


class _ApicPort:
    """The LAPIC's window on the host for one vCPU (``vtick.host.lapic.port.LapicPort``)."""

    TIMER = "lapic"

    def __init__(self, machine: Machine, state: VcpuState) -> None:
        self.machine = machine
        self.state = state
        self.tsc_khz = machine.tsc.tsc_khz

    def arm_timer(self, expiry_ns: int) -> None:
        self.machine.arm_timer(self.TIMER, self.state, expiry_ns, self._fire)

    def cancel_timer(self) -> None:
        self.machine.cancel_timer(self.TIMER, self.state)

    def _fire(self, state: VcpuState, now: int) -> None:
        state.lapic.on_timer(now)

    def guest_tsc(self, now: int) -> int:
        return self.machine.tsc.tsc(now)

    def tsc_to_host_ns(self, tsc: int) -> int:
        return self.machine.tsc.host_ns_for_tsc(tsc)

    def send_ipi(self, source: int, icr_low: int, dest: int) -> None:
        self.machine.send_ipi(source, icr_low, dest)

    def irq_state_changed(self) -> None:
        self.machine._irq_dirty.add(self.state.vcpu)
        if self.machine.record is not None:
            self.machine._tag_timer_irq(self.state)


class Machine:
    """All vCPUs of one VM plus the host timer queue their devices share."""

    def __init__(
        self,
        vcpus: int,
        tsc: TscModel,
        now: int,
        *,
        timer_advance: bool = False,
        mutations: Mutations | None = None,
    ) -> None:
        self.tsc = tsc
        #: planted bugs active in this VM (``vtick host --mutate``); none normally
        self.mutations = mutations or Mutations()
        self.hrtimers = HrtimerQueue()
        self.vcpus = [VcpuState(i, self, tsc.publish(now, version=2)) for i in range(vcpus)]
        self._irq_dirty: set[int] = set()
        self._now = now  # the time of the entry point being run (for IPIs sent inside it)
        for state in self.vcpus:
            state.lapic = Lapic(
                state.vcpu,
                _ApicPort(self, state),
                timer_advance=timer_advance,
                mutations=self.mutations,
            )
        self.lapics = [state.lapic for state in self.vcpus]
        self._actions: list[Action] = []
        #: the device models plugged into this VM, by name ("kvmclock", "pvtimer",
        #: "vmi-alarm", "pit", "pvapic"): each registers itself when it is built, so a
        #: migration (vtick.host.migration) finds them from the Machine alone
        self.devices: dict[str, Any] = {}
        self._timer_callbacks: dict[tuple[str, int], TimerCallback] = {}
        #: chaos history sink: record(kind, t, a, b, c, d, e, f) (vtick.proto.eventlog);
        #: None = not recording
        self.record: Callable[..., Any] | None = None
        #: (vcpu, exit seq) while an exit is handled; (vcpu, origin) while a timer fires
        self._exit: tuple[int, int] | None = None
        self._firing: tuple[int, int] | None = None
        #: host timer -> (origin exit seq, the expiry its device asked for)
        self._timer_origin: dict[tuple[str, int], tuple[int, int]] = {}
        self.hypercalls: dict[int, HypercallHandler] = {}
        self._msrs: list[_Range] = []
        self._ports: list[_Range] = []
        self._mmio: list[_MmioRegion] = []
        #: guest-visible faults raised by device models, by exit kind and reason
        self.faults: Counter[str] = Counter()
        self._dispatch: dict[
            type[m.Message], Callable[[VcpuState, m.Message, int, bool], ExitResult]
        ] = {
            m.ExitHypercall: self._hypercall,
            m.ExitHlt: self._hlt,
            m.ExitPause: self._pause,
            m.ExitMsrRead: self._msr_read,
            m.ExitMsrWrite: self._msr_write,
            m.ExitMmioRead: self._mmio_read,
            m.ExitMmioWrite: self._mmio_write,
            m.ExitPioIn: self._pio_in,
            m.ExitPioOut: self._pio_out,
        }
        self._register_lapic()

    # ------------------------------------------------------------------ the local APICs

    def _register_lapic(self) -> None:
        """The LAPIC's MSRs and its MMIO page (which moves with APIC_BASE)."""

        def rd(state: VcpuState, msr: int, now: int) -> int:
            return state.lapic.msr_read(msr, now)

        def wr(state: VcpuState, msr: int, value: int, now: int) -> None:
            state.lapic.msr_write(msr, value, now)

        self.register_msr(
            lapic_regs.MSR_IA32_APICBASE, lapic_regs.MSR_IA32_APICBASE, rd, wr, "APIC_BASE"
        )
        self.register_msr(
            lapic_regs.MSR_IA32_TSC_DEADLINE,
            lapic_regs.MSR_IA32_TSC_DEADLINE,
            rd,
            wr,
            "TSC_DEADLINE",
        )
        self.register_msr(lapic_regs.X2APIC_MSR_BASE, lapic_regs.X2APIC_MSR_LAST, rd, wr, "x2APIC")
        self.register_mmio(
            lambda state, gpa: state.lapic.claims(gpa),
            lambda state, gpa, size, now: state.lapic.mmio_read(
                gpa - state.lapic.base_address, size, now
            ),
            lambda state, gpa, size, value, now: state.lapic.mmio_write(
                gpa - state.lapic.base_address, size, value, now
            ),
            "LAPIC",
        )

    def send_ipi(self, source: int, icr_low: int, dest: int) -> list[int]:
        """Route an IPI from vCPU ``source`` to every LAPIC its ICR matches (KVM rules)."""
        fixed = icr_low & lapic_regs.APIC_DM_MASK == lapic_regs.DeliveryMode.FIXED
        if fixed and self.mutations.sometimes("drop-ipi"):
            return []  # mutation: the IPI reaches no LAPIC
        # ``deliver`` calls accept_irq on each target, which marks it for injection
        if self.record is None:
            return deliver(source, icr_low, dest, self.lapics, self._now)
        targets = route(source, icr_low, dest, self.lapics)[0]
        accepted = deliver(source, icr_low, dest, self.lapics, self._now)
        for target in targets:
            self.note_ipi(source, target, icr_low & lapic_regs.APIC_VECTOR_MASK, target in accepted)
        return accepted

    def note_ipi(self, source: int, target: int, vector: int, accepted: bool) -> None:
        """Chaos history: an IPI of the exit being handled reached ``target``'s LAPIC
        (accepted into IRR, coalesced with the same vector pending there, or not accepted
        by a disabled APIC)."""
        if self.record is None:
            return
        seq = self._exit[1] if self._exit is not None and self._exit[0] == source else 0
        gen = self.vcpus[source].generation
        state = self.vcpus[target]
        if accepted:
            outcome = IPI_ACCEPTED
        elif state.lapic.irr >> vector & 1:
            outcome = IPI_COALESCED
        else:
            outcome = IPI_NOT_ACCEPTED
        self.record(H_IPI, self._now, source, gen, seq, target, vector, outcome)
        if outcome != IPI_NOT_ACCEPTED:
            state.ipi_pending.setdefault(vector, []).append((source, gen, seq))

    def _tag_timer_irq(self, state: VcpuState) -> None:
        """Chaos history: a timer vector that just entered IRR takes the origin of the
        timer firing (or of the exit that fired it at once); coalesced ones keep the first."""
        vector = Vector.LOCAL_TIMER
        if vector in state.irq_origin or not state.lapic.irr >> vector & 1:
            return
        ctx = self._firing or self._exit
        if ctx is not None and ctx[0] == state.vcpu:
            state.irq_origin[vector] = ctx[1]

    def update_injection(self, state: VcpuState, now: int) -> None:
        """Inject what this vCPU's LAPIC can deliver now (KVM does it on VM entry).

        Each deliverable vector is acknowledged (IRR -> ISR) as it is injected, so the
        next one waits for the guest's EOI unless its priority class is higher.
        """
        self._irq_dirty.discard(state.vcpu)
        lapic = state.lapic
        if lapic.take_nmi():
            # vtick's guests have no NMI handler state yet: the NMI is taken and its
            # handler considered returned (unblocking the next) when it is injected
            lapic.nmi_iret()
            self._inject(state, NMI_VECTOR, now, None)
        while True:
            not_before = lapic.inject_not_before
            vector = lapic.ack()
            if vector is None:
                return
            self._inject(state, vector, now, not_before)

    def _inject(self, state: VcpuState, vector: int, now: int, not_before: int | None) -> None:
        state.injected += 1
        pv_eoi = self._pv_eoi_safe(state, vector)
        if pv_eoi:
            state.pv_eoi_vector = vector
        origin = 0
        ipis: tuple[tuple[int, int, int], ...] = ()
        if self.record is not None:
            origin = state.irq_origin.pop(vector, 0)
            ipis = tuple(state.ipi_pending.pop(vector, ()))
        self._actions.append(
            InjectIrq(state.vcpu, vector, now, not_before, pv_eoi, origin=origin, ipis=ipis)
        )
        state.wake()

    # ------------------------------------------------------------------ PV EOI

    def set_pv_eoi(self, state: VcpuState, *, enabled: bool, now: int) -> None:
        """MSR_KVM_PV_EOI_EN was written (the PvApic device validated it)."""
        state.pv_eoi_enabled = enabled

    @staticmethod
    def _pv_eoi_safe(state: VcpuState, vector: int) -> bool:
        """KVM sets the PV EOI flag before entry only when it is safe (reference §7):
        PV EOI enabled, no flag outstanding, no other interrupt pending in IRR, the
        vector alone in service (KVM's "highest ISR cache valid", i.e. not nested) and
        edge-triggered (a level EOI must reach the IOAPIC)."""
        lapic = state.lapic
        bit = 1 << vector
        return (
            state.pv_eoi_enabled
            and state.pv_eoi_vector is None
            and lapic.irr == 0
            and lapic.isr == bit
            and not lapic.tmr & bit
        )

    def _pv_eoi_done(self, state: VcpuState, now: int) -> None:
        """The vCPU cleared the PV EOI flag: perform the EOI on its behalf.

        DEVIATION from KVM: KVM also takes the flag back at the next exit when the guest
        has not cleared it yet (the guest's later EOI then traps).  vtick's vCPU cannot
        see a host-side write to its flag, so the host waits for the vCPU to report the
        clear on one of its exits; a lower-priority interrupt that arrives meanwhile waits
        until then (at the latest, the vCPU's next HLT).
        """
        if state.pv_eoi_vector is None:
            self.faults["pv_eoi without a flag set"] += 1
            return
        state.pv_eoi_vector = None
        state.pv_eois += 1
        state.lapic.eoi()
        self._irq_dirty.add(state.vcpu)

    def _flush_irqs(self, now: int) -> None:
        while self._irq_dirty:
            self.update_injection(self.vcpus[min(self._irq_dirty)], now)

    # ------------------------------------------------------------------ devices plug in here

    def register_hypercall(self, nr: int, handler: HypercallHandler) -> None:
        if nr in self.hypercalls:
            raise ValueError(f"hypercall {nr:#x} registered twice")
        self.hypercalls[nr] = handler

    @staticmethod
    def _add_range(table: list[_Range], new: _Range, what: str) -> None:
        if new.first > new.last:
            raise ValueError(f"{what} {new.name}: empty range")
        for old in table:
            if new.first <= old.last and old.first <= new.last:
                raise ValueError(f"{what} {new.name} overlaps {old.name}")
        table.append(new)

    def register_msr(
        self, first: int, last: int, read: MsrReader, write: MsrWriter, name: str
    ) -> None:
        """Claim MSRs ``first..last`` (inclusive) for a device."""
        self._add_range(self._msrs, _Range(first, last, name, read, write), "MSR range")

    def register_pio(
        self, first: int, last: int, read: PortReader, write: PortWriter, name: str
    ) -> None:
        """Claim I/O ports ``first..last`` (inclusive) for a device."""
        self._add_range(self._ports, _Range(first, last, name, read, write), "port range")

    def register_mmio(
        self, claims: MmioClaim, read: MmioReader, write: MmioWriter, name: str
    ) -> None:
        """Add an MMIO region; ``claims(vcpu, gpa)`` decides per access (regions may move)."""
        self._mmio.append(_MmioRegion(name, claims, read, write))

    @staticmethod
    def _lookup(table: list[_Range], key: int) -> _Range | None:
        for r in table:
            if r.first <= key <= r.last:
                return r
        return None

    def arm_timer(self, name: str, vcpu: VcpuState, expiry: int, callback: TimerCallback) -> None:
        """Arm (or re-arm) the host hrtimer ``name`` of ``vcpu`` for host time ``expiry``."""
        handle = (name, vcpu.vcpu)
        self._timer_callbacks[handle] = callback
        if self.record is not None:
            if self._exit is not None and self._exit[0] == vcpu.vcpu:
                self._timer_origin[handle] = (self._exit[1], expiry)
                self.record(H_TARM, self._now, vcpu.vcpu, self._exit[1], expiry)
            else:  # re-armed by its own expiry (periodic): the same origin
                origin = self._timer_origin.get(handle, (0, 0))[0]
                self._timer_origin[handle] = (origin, expiry)
        if self.mutations.sometimes("early-timer"):
            expiry -= EARLY_TIMER_NS  # mutation: the host timer fires before its expiry
        self.hrtimers.arm(handle, expiry)

    def cancel_timer(self, name: str, vcpu: VcpuState) -> bool:
        return self.hrtimers.cancel((name, vcpu.vcpu))

    # ------------------------------------------------------------------ inputs

    def handle_exit(
        self, vcpu: int, seq: int, msg: m.Message, now: int, unseen: bool
    ) -> ExitResult:
        """Handle exit ``seq`` of ``vcpu``.

        Args:
            unseen: the vCPU had not yet received everything the host sent it when it
                exited (so an injection may be on its way: a HLT must not block).
        """
        state = self.vcpus[vcpu]
        handler = self._dispatch.get(type(msg))
        if handler is None:
            raise TypeError(f"{type(msg).__name__} is not an exit")
        self._now = now
        self._exit = (vcpu, seq)
        try:
            if isinstance(msg, m.ExitMessage) and msg.pv_eoi:
                self._pv_eoi_done(state, now)
            if isinstance(msg, m.ExitHlt):
                self._flush_irqs(now)
                return self._hlt_seq(state, seq, unseen)
            result = handler(state, msg, now, unseen)
            self._flush_irqs(now)
            return result
        finally:
            self._exit = None

    def on_timer(self, now: int) -> None:
        """Run the callbacks of every host hrtimer due at ``now``."""
        self._now = now
        for handle in self.hrtimers.expire(now):
            callback = self._timer_callbacks.pop(handle)
            name, vcpu = handle
            if self.record is not None:
                origin, asked = self._timer_origin.get(handle, (0, 0))
                self.record(H_TFIRE, now, vcpu, origin, asked)
                self._firing = (vcpu, origin)
            try:
                callback(self.vcpus[vcpu], now)
            except Exception as exc:
                # A device model bug in one timer must not stop the others (nor the
                # host): recorded against its vCPU and reported in the results.
                self.vcpus[vcpu].bugs.append(f"timer {name} at {now}: {exc!r}")
            finally:
                self._firing = None
        self._flush_irqs(now)

    def next_deadline(self) -> int | None:
        return self.hrtimers.next_expiry()

    def reset_vcpu(self, vcpu: int, now: int) -> None:
        """A new guest process took over ``vcpu``: put it back in its power-on state.

        Like a reset of a real CPU: its LAPIC is reset (IRR/ISR cleared, timer stopped,
        software-disabled), every host timer armed for it is cancelled, PV EOI is off,
        and it is no longer halted.  Without this an interrupt the old process never
        EOI'd would block the new one forever.
        """
        state = self.vcpus[vcpu]
        self.cancel_vcpu_timers(vcpu)
        state.lapic.reset()
        state.halted_exit = None
        state.pv_eoi_msr = 0
        state.pv_eoi_enabled = False
        state.pv_eoi_vector = None
        self._irq_dirty.discard(vcpu)
        self._actions = [a for a in self._actions if a.vcpu != vcpu]
        state.generation += 1
        state.irq_origin.clear()
        state.ipi_pending.clear()

    def cancel_vcpu_timers(self, vcpu: int) -> None:
        """Cancel every host timer armed for ``vcpu``: the vCPU is gone (a reset, or its
        session ended with goodbyes).  KVM does this when it destroys a vCPU
        (``kvm_free_lapic`` -> ``hrtimer_cancel``); a Linux guest that shut down masked its
        LAPIC timer before that (``disable_local_APIC``).  Without it a finished vCPU's
        periodic LAPIC timer kept firing in the host, 256 of them at 1 kHz, while the
        others' reports waited (issue 9)."""
        for handle in [h for h in self._timer_callbacks if h[1] == vcpu]:
            self.hrtimers.cancel(handle)
            del self._timer_callbacks[handle]

    def shutdown(self) -> None:
        """Every halted vCPU becomes runnable (it is about to be told to stop)."""
        for state in self.vcpus:
            state.wake()

    def take_actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    # ------------------------------------------------------------------ default exit handling

    def _hlt(self, state: VcpuState, msg: m.Message, now: int, unseen: bool) -> ExitResult:
        raise AssertionError("HLT goes through _hlt_seq")  # pragma: no cover

    def _pause(self, state: VcpuState, msg: m.Message, now: int, unseen: bool) -> ExitResult:
        # kvm_vcpu_on_spin would yield to another vCPU; the PV EOI the exit carries was
        # already done in handle_exit, which is what the spinning vCPU needed
        return ExitResult()

    def _hlt_seq(self, state: VcpuState, seq: int, unseen: bool) -> ExitResult:
        # Runnable if an interrupt is on its way: sent but not yet seen by the vCPU
        # (``unseen``), or raised but not yet taken off the action queue by the server.
        if unseen or any(isinstance(a, InjectIrq) and a.vcpu == state.vcpu for a in self._actions):
            return ExitResult()
        state.halted_exit = seq
        return ExitResult(deferred=True)

    def _hypercall(self, state: VcpuState, msg: m.Message, now: int, unseen: bool) -> ExitResult:
        assert isinstance(msg, m.ExitHypercall)
        handler = self.hypercalls.get(msg.nr)
        if handler is None:
            state.unclaimed[f"hypercall {msg.nr:#x}"] += 1
            return ExitResult(value=-KvmErrno.KVM_ENOSYS)
        return ExitResult(value=handler(state, msg.args, now))

    def _fault(self, state: VcpuState, what: str, exc: GuestFault) -> ExitResult:
        self.faults[f"{what}: {exc.reason or exc.vector}"] += 1
        return ExitResult(fault=exc.vector)

    def _msr_read(self, state: VcpuState, msg: m.Message, now: int, unseen: bool) -> ExitResult:
        assert isinstance(msg, m.ExitMsrRead)
        r = self._lookup(self._msrs, msg.msr)
        if r is None:
            state.unclaimed[f"rdmsr {msg.msr:#x}"] += 1
            return ExitResult(fault=Fault.GP)
        try:
            return ExitResult(value=r.read(state, msg.msr, now))
        except GuestFault as exc:
            return self._fault(state, f"rdmsr {msg.msr:#x}", exc)

    def _msr_write(self, state: VcpuState, msg: m.Message, now: int, unseen: bool) -> ExitResult:
        assert isinstance(msg, m.ExitMsrWrite)
        r = self._lookup(self._msrs, msg.msr)
        if r is None:
            state.unclaimed[f"wrmsr {msg.msr:#x}"] += 1
            return ExitResult(fault=Fault.GP)
        try:
            r.write(state, msg.msr, msg.value, now)
        except GuestFault as exc:
            return self._fault(state, f"wrmsr {msg.msr:#x}", exc)
        return ExitResult()

    def _mmio_region(self, state: VcpuState, gpa: int) -> _MmioRegion | None:
        for region in self._mmio:
            if region.claims(state, gpa):
                return region
        return None

    def _mmio_read(self, state: VcpuState, msg: m.Message, now: int, unseen: bool) -> ExitResult:
        assert isinstance(msg, m.ExitMmioRead)
        region = self._mmio_region(state, msg.gpa)
        if region is None:
            # unassigned MMIO reads as all ones
            state.unclaimed[f"mmio read {msg.gpa:#x}"] += 1
            return ExitResult(value=(1 << (8 * min(msg.size, 8))) - 1)
        try:
            return ExitResult(value=region.read(state, msg.gpa, msg.size, now))
        except GuestFault as exc:
            return self._fault(state, f"mmio read {msg.gpa:#x}", exc)

    def _mmio_write(self, state: VcpuState, msg: m.Message, now: int, unseen: bool) -> ExitResult:
        assert isinstance(msg, m.ExitMmioWrite)
        region = self._mmio_region(state, msg.gpa)
        if region is None:
            state.unclaimed[f"mmio write {msg.gpa:#x}"] += 1
            return ExitResult()
        try:
            region.write(state, msg.gpa, msg.size, msg.value, now)
        except GuestFault as exc:
            return self._fault(state, f"mmio write {msg.gpa:#x}", exc)
        return ExitResult()

    def _pio_in(self, state: VcpuState, msg: m.Message, now: int, unseen: bool) -> ExitResult:
        assert isinstance(msg, m.ExitPioIn)
        r = self._lookup(self._ports, msg.port)
        if r is None:
            # nothing decodes the port: the bus floats high
            state.unclaimed[f"in {msg.port:#x}"] += 1
            return ExitResult(value=(1 << (8 * min(msg.size, 4))) - 1)
        return ExitResult(value=r.read(state, msg.port, msg.size, now))

    def _pio_out(self, state: VcpuState, msg: m.Message, now: int, unseen: bool) -> ExitResult:
        assert isinstance(msg, m.ExitPioOut)
        r = self._lookup(self._ports, msg.port)
        if r is None:
            state.unclaimed[f"out {msg.port:#x}"] += 1
            return ExitResult()
        r.write(state, msg.port, msg.size, msg.value, now)
        return ExitResult()
