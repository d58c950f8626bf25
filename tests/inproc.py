"""A deterministic in-process VM: guest kernels driven against a real host Machine.

:class:`InProcVm` runs :class:`vtick.guest.kernel.GuestKernel` instances against a
:class:`vtick.host.machine.Machine` with every device plugged in (KvmClock, PvTimer,
VmiAlarm, Pit, PvApic) and every feature bit negotiated on every vCPU, the way
``vtick.host.server.Host`` wires them, but with no processes, no links and no real clock:

* one integer host clock :attr:`InProcVm.now` (host CLOCK_MONOTONIC ns);
* every exit costs :attr:`InProcVm.exit_cost_ns`, added to ``now`` *before* the host
  handles it; host timers due meanwhile fire at their own deadlines first;
* ``Udelay(ns)`` and an injected preemption (``preempt_ns[name]`` at a
  ``PreemptionPoint``) advance ``now`` with no exit (host timers keep firing);
* a blocking HLT advances ``now`` to the next host timer deadline and runs
  ``Machine.on_timer`` until the vCPU is woken;
* after every exit and every timer, ``Machine.take_actions()`` is drained: an
  ``InjectIrq`` is queued on its vCPU (vector, pv_eoi) for delivery at the guest's next
  instruction boundary, a ``CompleteHlt`` makes the vCPU runnable;
* guest ktime is read through :class:`vtick.guest.clocksource.Kvmclock` from a
  :class:`PvclockPage` refreshed from ``VcpuState.pvclock`` after every exit (what the
  vCPU process does with ``pvclock`` messages); ``rdtsc`` is ``machine.tsc.tsc(now)``.

:meth:`InProcVm.run_op` drives a kernel op like ``GuestVcpu.run_op`` (guest/vcpu.py),
attaching ``pv_eoi=True`` to the first exit after the kernel's ``ops.pv_eois`` grew, and
records every exit in the vCPU's :attr:`VcpuCtx.exits`.  :meth:`InProcVm.run_workload`
mirrors ``GuestVcpu.run_kernel``'s loop for all vCPUs in round-robin.  Guest stores to
another vCPU's memory (``MemoryWrite``: csds and their unlocks) are relayed at once, as the
host relays them; a ``cpu-online`` store sets the VM's cpu_online_mask
(:attr:`InProcVm.online`), which every vCPU reads at once (the host coalesces its
``online-mask`` messages; here there is nothing to coalesce); ``SpinWait``
(csd_lock_wait) is not supported, so the IPI workloads that wait for remote CPUs cannot
run here.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from vtick.guest import cpu as guest_cpu
from vtick.guest.clocksource import Kvmclock, PvclockPage
from vtick.guest.cpu import KernelOp, PreemptionPoint, Udelay
from vtick.guest.hrtimer import Expiry
from vtick.guest.kernel import GuestKernel
from vtick.host.devices.kvmclock import KvmClock
from vtick.host.devices.pit import Pit
from vtick.host.devices.pvapic import PvApic
from vtick.host.devices.pvtimer import PvTimer
from vtick.host.devices.vmi_alarm import VmiAlarm
from vtick.host.machine import CompleteHlt, ExitResult, InjectIrq, Machine
from vtick.proto import messages as m
from vtick.proto.abi import Feature
from vtick.proto.cpumask import encode_mask
from vtick.proto.pvclock import TscModel

__all__ = [
    "ALL_FEATURES",
    "Deadlock",
    "ExitRecord",
    "InProcVm",
    "T0",
    "VcpuCtx",
    "exit_key",
]

T = TypeVar("T")
#: host time at which the VM starts (guest TSC and ktime are 0 here)
T0 = 1_000_000_000
ALL_FEATURES = int(
    Feature.PVCLOCK | Feature.PV_TIMER | Feature.VMI | Feature.PV_EOI | Feature.PV_SEND_IPI
)


class Deadlock(AssertionError):
    """A vCPU halted with no host timer armed and nothing pending: it would sleep forever."""


def exit_key(msg: m.Message) -> tuple[Any, ...]:
    """(kind, key fields...) of an exit message: what tests compare."""
    if isinstance(msg, m.ExitMmioRead):
        return ("mmio-read", msg.gpa)
    if isinstance(msg, m.ExitMmioWrite):
        return ("mmio-write", msg.gpa, msg.value)
    if isinstance(msg, m.ExitMsrRead):
        return ("msr-read", msg.msr)
    if isinstance(msg, m.ExitMsrWrite):
        return ("msr-write", msg.msr, msg.value)
    if isinstance(msg, m.ExitPioIn):
        return ("pio-in", msg.port)
    if isinstance(msg, m.ExitPioOut):
        return ("pio-out", msg.port, msg.value)
    if isinstance(msg, m.ExitHypercall):
        return ("hypercall", msg.nr, tuple(msg.args))
    if isinstance(msg, m.ExitHlt):
        return ("hlt",)
    raise TypeError(f"{type(msg).__name__} is not an exit")


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """One exit a vCPU took."""

    key: tuple[Any, ...]  # (kind, key fields...)
    pv_eoi: bool  # the exit reported a PV EOI
    now: int  # host time the host handled it
    value: int  # the reply's value
    fault: int
    deferred: bool  # a HLT that blocked

    @property
    def kind(self) -> str:
        return self.key[0]


class Workload(Protocol):
    def start(self, now: int) -> None: ...

    def between_interrupts(self, now: int) -> None: ...


@dataclass
class VcpuCtx:
    """The guest side of one vCPU: its kvmclock page, kernel, pending injections, trace."""

    cpu: int
    page: PvclockPage
    clock: Kvmclock
    kernel: GuestKernel | None = None
    #: injected (vector, pv_eoi) not yet delivered, in arrival order
    pending: deque[tuple[int, bool]] = field(default_factory=deque)
    #: every exit taken, in order
    exits: list[ExitRecord] = field(default_factory=list)
    #: exits and preemption points ("preempt", name) / udelays ("udelay", ns) in order
    trace: list[tuple[Any, ...]] = field(default_factory=list)
    #: every injection received: (host now, vector, pv_eoi)
    injections: list[tuple[int, int, bool]] = field(default_factory=list)
    halted: bool = False
    seq: int = 0
    pv_eois_reported: int = 0
    expiries: list[Expiry] = field(default_factory=list)
    #: pv_eoi counter source when no kernel is attached (a bare ApicOps under test)
    ops: Any = None
    #: relayed stores (csds, the online mask) that arrived before this vCPU's kernel existed
    inbox: list[m.Message] = field(default_factory=list)

    def exit_keys(self, start: int = 0) -> list[tuple[Any, ...]]:
        return [r.key for r in self.exits[start:]]

    def exit_kinds(self) -> Counter[str]:
        return Counter(r.kind for r in self.exits)


class InProcVm:
    """Args:
    ncpus: vCPUs.
    mode: timer mode for every vCPU's kernel (a key of ``vtick.guest.kernel.MODES``).
    exit_cost_ns: host time one exit costs.
    tsc_khz: guest TSC frequency.
    hz: guest HZ.
    apic: override the mode's APIC ops variant.
    preempt_ns: delay injected each time a vCPU passes the named preemption point.
    features: feature bits negotiated on every vCPU.
    """

    def __init__(
        self,
        ncpus: int = 1,
        mode: str = "pv-ktime",
        *,
        exit_cost_ns: int = 20_000,
        tsc_khz: int = 2_500_000,
        hz: int = 1000,
        apic: str | None = None,
        preempt_ns: dict[str, int] | None = None,
        features: int = ALL_FEATURES,
        start_ns: int = T0,
    ) -> None:
        self.ncpus = ncpus
        self.mode = mode
        self.exit_cost_ns = exit_cost_ns
        self.tsc_khz = tsc_khz
        self.hz = hz
        self.apic = apic
        self.preempt_ns: dict[str, int] = dict(preempt_ns or {})
        self.now = start_ns
        self.tsc = TscModel(tsc_khz=tsc_khz, tsc_epoch=start_ns, ktime_epoch=start_ns)
        self.machine = Machine(ncpus, self.tsc, start_ns)
        self.kvmclock = KvmClock(self.machine)
        self.pvtimer = PvTimer(self.machine)
        self.kvmclock.add_listener(self.pvtimer.on_republish)
        self.vmi_alarm = VmiAlarm(self.machine)
        self.pit = Pit(self.machine)
        self.pvapic = PvApic(self.machine)
        for state in self.machine.vcpus:
            state.features = features
        self.vcpus: list[VcpuCtx] = []
        for i in range(ncpus):
            page = PvclockPage(self.machine.vcpus[i].pvclock)
            self.vcpus.append(VcpuCtx(i, page, Kvmclock(page, self.rdtsc)))
        self.timer_fires = 0
        #: cpu_online_mask (bit i = vCPU i), the page the host holds
        self.online = 0

    # ------------------------------------------------------------------ clocks

    def rdtsc(self) -> int:
        return self.tsc.tsc(self.now)

    def ktime(self, cpu: int) -> int:
        """Guest CLOCK_MONOTONIC of ``cpu`` as its kernel reads it (kvmclock)."""
        return self.vcpus[cpu].clock.read()

    def host_ns_for_ktime(self, cpu: int, ktime: int) -> int:
        return self.tsc.host_ns_for_ktime(self.machine.vcpus[cpu].pvclock, ktime)

    # ------------------------------------------------------------------ kernels

    def kernel(self, cpu: int, mode: str | None = None, **kw: Any) -> GuestKernel:
        """Create (not boot) ``cpu``'s guest kernel, wired to its kvmclock and TSC."""
        ctx = self.vcpus[cpu]
        kernel = GuestKernel(
            cpu,
            self.ncpus,
            mode or self.mode,
            ctx.clock.read,
            self.rdtsc,
            self.tsc_khz,
            hz=self.hz,
            apic=kw.pop("apic", self.apic),
            on_expiry=kw.pop("on_expiry", ctx.expiries.append),
            **kw,
        )
        ctx.kernel = kernel
        inbox, ctx.inbox = ctx.inbox, []
        for msg in inbox:
            self._deliver(ctx, msg)
        return kernel

    def boot(self, cpu: int, mode: str | None = None, **kw: Any) -> GuestKernel:
        kernel = self.kernel(cpu, mode, **kw)
        self.run_op(cpu, kernel.boot())
        return kernel

    def boot_all(self, mode: str | None = None) -> list[GuestKernel]:
        return [self.boot(cpu, mode) for cpu in range(self.ncpus)]

    # ------------------------------------------------------------------ time and actions

    def _drain(self) -> None:
        for action in self.machine.take_actions():
            ctx = self.vcpus[action.vcpu]
            if isinstance(action, InjectIrq):
                ctx.pending.append((action.vector, action.pv_eoi))
                ctx.injections.append((action.now, action.vector, action.pv_eoi))
            elif isinstance(action, CompleteHlt):
                ctx.halted = False
        self._refresh_pages()
        self.kvmclock.take_publications()

    def _refresh_pages(self) -> None:
        for ctx, state in zip(self.vcpus, self.machine.vcpus, strict=True):
            if ctx.page.info != state.pvclock:
                ctx.page.publish(state.pvclock)

    def _run_timers(self, upto: int) -> None:
        """Fire every host timer due at or before ``upto``, each at its own deadline."""
        while (deadline := self.machine.next_deadline()) is not None and deadline <= upto:
            self.timer_fires += 1
            self.machine.on_timer(max(deadline, self.now))
            self._drain()

    def advance(self, ns: int) -> None:
        """Let ``ns`` of host time pass (host timers fire on the way)."""
        assert ns >= 0
        target = self.now + ns
        while (deadline := self.machine.next_deadline()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            self.timer_fires += 1
            self.machine.on_timer(self.now)
            self._drain()
        self.now = target

    def advance_to(self, t: int) -> None:
        self.advance(max(0, t - self.now))

    # ------------------------------------------------------------------ exits

    def exit(self, cpu: int, msg: m.Message) -> ExitResult:
        """Take one exit on ``cpu`` (no blocking: a deferred HLT just marks it halted)."""
        ctx = self.vcpus[cpu]
        ops = ctx.kernel.ops if ctx.kernel is not None else ctx.ops
        if ops is not None and ops.pv_eois != ctx.pv_eois_reported:
            # the vCPU cleared its PV EOI flag: say so on this exit (guest/vcpu.py)
            ctx.pv_eois_reported = ops.pv_eois
            msg = dataclasses.replace(msg, pv_eoi=True)  # type: ignore[type-var]
        self.advance(self.exit_cost_ns)
        ctx.seq += 1
        result = self.machine.handle_exit(cpu, ctx.seq, msg, self.now, bool(ctx.pending))
        if result.deferred:
            ctx.halted = True
        self._drain()
        self._run_timers(self.now)
        key = exit_key(msg)
        ctx.exits.append(
            ExitRecord(
                key,
                bool(getattr(msg, "pv_eoi", False)),
                self.now,
                result.value,
                result.fault,
                result.deferred,
            )
        )
        ctx.trace.append(key)
        return result

    def hlt(self, cpu: int) -> bool:
        """Blocking HLT: sleep until woken.  Returns False if it did not block."""
        result = self.exit(cpu, m.ExitHlt())
        if not result.deferred:
            return False
        self.wait_until_woken(cpu)
        return True

    def wait_until_woken(self, cpu: int, limit: int | None = None) -> None:
        ctx = self.vcpus[cpu]
        while ctx.halted:
            deadline = self.machine.next_deadline()
            if deadline is None or (limit is not None and deadline > limit):
                raise Deadlock(f"vCPU {cpu} halted at {self.now} with no timer to wake it")
            self.advance_to(deadline)

    def _store(self, msg: m.Message) -> None:
        """Relay a guest store to the vCPUs that read it (the host relays them; no exit)."""
        if isinstance(msg, m.CpuOnline):
            self.online |= 1 << msg.cpu
            mask = m.OnlineMask(mask=encode_mask(self.online, self.ncpus))
            for ctx in self.vcpus:
                self._deliver(ctx, mask)
            return
        self._deliver(self.vcpus[getattr(msg, "dst")], msg)  # noqa: B009 - Csd, CsdDone

    def _deliver(self, dst: VcpuCtx, msg: m.Message) -> None:
        kernel = dst.kernel
        if kernel is None:
            dst.inbox.append(msg)
        elif isinstance(msg, m.OnlineMask):
            kernel.smp.on_online_mask(msg.mask)
        elif isinstance(msg, m.CsdDone):
            kernel.smp.on_done(msg)
        else:
            kernel.smp.on_csd(msg)

    def run_op(self, cpu: int, op: KernelOp[T]) -> T:
        """Drive a kernel op to completion on ``cpu``; a HLT inside blocks (time passes)."""
        ctx = self.vcpus[cpu]
        value: Any = None
        try:
            while True:
                item = op.send(value)
                value = None
                if isinstance(item, Udelay):
                    ctx.trace.append(("udelay", item.ns))
                    self.advance(item.ns)
                    continue
                if isinstance(item, PreemptionPoint):
                    ctx.trace.append(("preempt", item.name))
                    delay = self.preempt_ns.get(item.name, 0)
                    if delay:
                        self.advance(delay)
                    continue
                memory_write = getattr(guest_cpu, "MemoryWrite", None)
                if memory_write is not None and isinstance(item, memory_write):
                    ctx.trace.append(("store", type(item.msg).__name__))
                    self._store(item.msg)
                    continue
                if not isinstance(item, m.ExitMessage):
                    # e.g. SpinWait (csd_lock_wait): needs the other vCPUs to run meanwhile
                    raise NotImplementedError(f"the in-process VM cannot run {item!r}")
                result = self.exit(cpu, item)
                if result.deferred:
                    self.wait_until_woken(cpu)
                value = m.ExitReply(
                    re=ctx.seq, value=result.value, fault=result.fault, host_ns=self.exit_cost_ns
                )
        except StopIteration as done:
            return done.value

    def deliver(self, cpu: int) -> int:
        """Instruction boundary: deliver every pending injection; returns how many."""
        ctx = self.vcpus[cpu]
        assert ctx.kernel is not None
        n = 0
        while ctx.pending:
            vector, pv_eoi = ctx.pending.popleft()
            self.run_op(cpu, ctx.kernel.handle_interrupt(vector, pv_eoi))
            n += 1
        return n

    # ------------------------------------------------------------------ workload loop

    def run_workload(
        self,
        workloads: list[Workload],
        duration_ns: int,
        *,
        after_step: Callable[[int], None] | None = None,
    ) -> None:
        """Run ``workloads[cpu]`` on every booted vCPU for ``duration_ns`` of host time.

        Mirrors ``GuestVcpu.run_kernel``: start, reprogram; then per vCPU in round-robin
        deliver pending interrupts, ``between_interrupts``, reprogram, HLT if nothing is
        pending.  When every vCPU is halted, time jumps to the next host timer.
        """
        end = self.now + duration_ns
        for ctx, workload in zip(self.vcpus, workloads, strict=True):
            assert ctx.kernel is not None
            workload.start(ctx.clock.read())
            self.run_op(ctx.cpu, ctx.kernel.reprogram())
        while self.now < end:
            ran = False
            for ctx, workload in zip(self.vcpus, workloads, strict=True):
                if ctx.halted or self.now >= end:
                    continue
                ran = True
                kernel = ctx.kernel
                assert kernel is not None
                self.deliver(ctx.cpu)
                workload.between_interrupts(ctx.clock.read())
                task = getattr(workload, "task", None)
                if task is not None:  # task context (smp_call_function workloads)
                    self.run_op(ctx.cpu, task(ctx.clock.read()))
                self.run_op(ctx.cpu, kernel.reprogram())
                wants_cpu = getattr(workload, "wants_cpu", None)
                if not ctx.pending and not (wants_cpu and wants_cpu(ctx.clock.read())):
                    self.exit(ctx.cpu, m.ExitHlt())
                if after_step is not None:
                    after_step(ctx.cpu)
            if not ran:
                deadline = self.machine.next_deadline()
                if deadline is None:
                    raise Deadlock(f"every vCPU halted at {self.now} with no host timer armed")
                self.advance_to(min(deadline, end))
