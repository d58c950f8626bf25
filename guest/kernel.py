"""One vCPU's guest kernel: the timer mode's driver, the APIC ops, hrtimers and the tick.

:class:`GuestKernel` wires the pure pieces together for one timer *mode* (DESIGN.md
section 4), the way Linux picks a ``clock_event_device`` and an ``apic`` ops table at
boot.  Everything it does that traps is a kernel op (see ``vtick.guest.cpu``); the vCPU
process drives those over the link and tests drive them with a fake host.

Boot (``boot``): enable kvmclock, set up the APIC (x2APIC switch, SVR enable, PV EOI),
calibrate the LAPIC timer against the PIT if the mode uses it, register the mode's
clock-event device and put it in oneshot (or periodic) state.

Interrupts (``handle_interrupt``): the local timer vector is acknowledged first, as
Linux's ``sysvec_apic_timer_interrupt`` does (``apic_eoi`` before the handler), then
the clockevent handler runs: ``hrtimer_interrupt`` in oneshot mode, or the periodic
tick handler (which expires hrtimers at tick granularity, low-resolution mode).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from vtick.guest.apic import APIC_OPS, PREEMPT_ICR_IDLE_TO_WRITE, ApicOps
from vtick.guest.calibrate import Calibration, calibrate_lapic_timer, calibrate_lapic_timer_tsc
from vtick.guest.clockevents import (
    PREEMPT_DELTA_TO_DEVICE,
    CEState,
    ClockEventDevice,
    ClockEvents,
)
from vtick.guest.cpu import KernelOp, wrmsr
from vtick.guest.drivers.lapic_timer import LapicTimer, tick_nsec
from vtick.guest.drivers.pv_timer import PvDelta, PvKtime
from vtick.guest.drivers.tsc_deadline import TscDeadline
from vtick.guest.drivers.vmi_timer import VmiTimer
from vtick.guest.hrtimer import Expiry, HighResTimers, HrtimerCallback
from vtick.guest.smp import PREEMPT_CSD_WAIT, Smp
from vtick.proto.abi import Msr, Vector
from vtick.proto.catalog import IPI_VARIANT_NAMES, MODE_NAMES, PREEMPTION_POINTS

__all__ = [
    "ModeSpec",
    "MODES",
    "IPI_VARIANTS",
    "PREEMPTION_POINTS",
    "GuestKernel",
    "KVMCLOCK_GPA",
    "TICK_TIMER",
]

KVMCLOCK_GPA = 0x2000
TICK_TIMER = "tick"


@dataclass(frozen=True, slots=True)
class ModeSpec:
    apic: str  # default APIC ops variant
    timer: str  # clock-event driver
    calibrate: bool  # needs the LAPIC bus frequency
    periodic: bool = False  # device runs periodic (tick), hrtimers at tick granularity


#: the timer modes of DESIGN.md section 4 (plus the periodic LAPIC tick)
MODES: dict[str, ModeSpec] = {
    "lapic-xapic": ModeSpec("xapic", "lapic", calibrate=True),
    "lapic-x2apic": ModeSpec("x2apic", "lapic", calibrate=True),
    "lapic-periodic": ModeSpec("xapic", "lapic", calibrate=True, periodic=True),
    "tsc-deadline": ModeSpec("x2apic", "tsc-deadline", calibrate=False),
    "vmi": ModeSpec("vmi", "vmi", calibrate=False),
    "pv-ktime": ModeSpec("xapic", "pv-ktime", calibrate=False),
    "pv-delta": ModeSpec("xapic", "pv-delta", calibrate=False),
    "pv-future": ModeSpec("xapic", "pv-future", calibrate=False),
}


assert tuple(MODES) == MODE_NAMES, "vtick.proto.catalog.MODE_NAMES disagrees"
assert set(PREEMPTION_POINTS) == {
    PREEMPT_DELTA_TO_DEVICE,
    PREEMPT_ICR_IDLE_TO_WRITE,
    PREEMPT_CSD_WAIT,
}, "vtick.proto.catalog.PREEMPTION_POINTS disagrees"

#: IPI paths of DESIGN.md section 4: (APIC ops variant, use shorthands)
IPI_VARIANTS: dict[str, tuple[str, bool]] = {
    "xapic-shortcut": ("xapic", True),
    "xapic-mask": ("xapic", False),
    "x2apic": ("x2apic", True),
    "pv": ("kvm-pv", True),
}
assert tuple(IPI_VARIANTS) == IPI_VARIANT_NAMES, "vtick.proto.catalog.IPI_VARIANT_NAMES disagrees"


class GuestKernel:
    """Args:
    cpu, ncpus: this vCPU and the topology.
    mode: a key of :data:`MODES`.
    ktime: guest CLOCK_MONOTONIC (kvmclock).
    rdtsc: the guest TSC.
    tsc_khz: guest TSC frequency.
    hz: the kernel's HZ (the tick, calibration length, min-delta ceiling).
    apic: override the mode's APIC ops variant (``xapic``, ``x2apic``, ``vmi``, ``kvm-pv``).
    on_expiry: called for each hrtimer callback that ran (lateness accounting).
    """

    def __init__(
        self,
        cpu: int,
        ncpus: int,
        mode: str,
        ktime: Callable[[], int],
        rdtsc: Callable[[], int],
        tsc_khz: int,
        hz: int = 1000,
        apic: str | None = None,
        on_expiry: Callable[[Expiry], None] | None = None,
        ipi: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
        self.spec = MODES[mode]
        self.mode = mode
        shortcuts = True
        if ipi is not None:
            if ipi not in IPI_VARIANTS:
                raise ValueError(f"unknown IPI variant {ipi!r}: one of {', '.join(IPI_VARIANTS)}")
            ipi_apic, shortcuts = IPI_VARIANTS[ipi]
            apic = apic or ipi_apic
        variant = apic or self.spec.apic
        if variant not in APIC_OPS:
            raise ValueError(f"unknown APIC ops {variant!r}: one of {', '.join(APIC_OPS)}")
        self.cpu = cpu
        self.ktime = ktime
        self.rdtsc = rdtsc
        self.tsc_khz = tsc_khz
        self.hz = hz
        self.ops: ApicOps = APIC_OPS[variant](cpu, ncpus)
        self.core = ClockEvents(ktime, hz)
        self.smp = Smp(cpu, ncpus, self.ops, ktime, shortcuts=shortcuts)
        self.calibration: Calibration | None = None
        self.dev: ClockEventDevice | None = None
        self.timers: HighResTimers | None = None
        self.on_expiry = on_expiry
        self.jiffies = 0
        self.spurious = 0
        self.unhandled = 0
        #: EOIs performed (by an exit, or by clearing the PV EOI flag): the chaos LAPIC
        #: check holds the host's count against it
        self.eois = 0

    # ------------------------------------------------------------------ boot

    def boot(self) -> KernelOp[None]:
        yield from wrmsr(Msr.MSR_KVM_SYSTEM_TIME_NEW, KVMCLOCK_GPA | 1)
        yield from self.ops.setup()
        if self.spec.calibrate:
            if self.cpu == 0:  # the boot CPU calibrates against the PIT
                self.calibration = yield from calibrate_lapic_timer(
                    self.ops, self.hz, self.rdtsc, self.tsc_khz
                )
            else:  # application processors: against the TSC (see calibrate.py)
                self.calibration = yield from calibrate_lapic_timer_tsc(
                    self.ops, self.hz, self.rdtsc, self.tsc_khz
                )
        dev = self._make_device()
        dev.register(self.core)
        self.dev = dev
        self.timers = HighResTimers(self.core, dev, self.on_expiry)
        state = CEState.PERIODIC if self.spec.periodic else CEState.ONESHOT
        yield from self.core.switch_state(dev, state)
        yield from self.smp.announce_online()

    def _make_device(self) -> ClockEventDevice:
        timer = self.spec.timer
        if timer == "lapic":
            assert self.calibration is not None
            return LapicTimer(self.ops, self.calibration.lapic_timer_period, self.hz)
        if timer == "tsc-deadline":
            return TscDeadline(self.ops, self.rdtsc, self.tsc_khz)
        if timer == "vmi":
            return VmiTimer(self.rdtsc, self.tsc_khz)
        if timer == "pv-ktime":
            return PvKtime()
        if timer == "pv-future":
            return PvKtime(future=True)
        if timer == "pv-delta":
            return PvDelta()
        raise AssertionError(timer)  # pragma: no cover - MODES is closed

    # ------------------------------------------------------------------ hrtimers

    def start_timer(self, timer: Hashable, expires: int, callback: HrtimerCallback) -> None:
        """``hrtimer_start``; call :meth:`reprogram` after a batch of starts/cancels."""
        assert self.timers is not None
        self.timers.queue.start(timer, expires, callback)

    def cancel_timer(self, timer: Hashable) -> bool:
        assert self.timers is not None
        return self.timers.queue.cancel(timer)

    def reprogram(self) -> KernelOp[None]:
        """Program the device for the earliest timer (no-op in periodic mode)."""
        assert self.timers is not None
        if self.spec.periodic:
            return
        yield from self.timers.reprogram()

    def start_tick(self) -> None:
        """The periodic tick: in oneshot mode an hrtimer every jiffy (``tick_sched_timer``),
        forwarded past "now" so missed ticks are skipped, not replayed."""
        if self.spec.periodic:
            return  # the device itself ticks
        period = tick_nsec(self.hz)

        def tick(now: int, expires: int) -> int:
            missed = (now - expires) // period
            self.jiffies += 1 + missed
            return expires + (missed + 1) * period

        self.start_timer(TICK_TIMER, self.ktime() + period, tick)

    # ------------------------------------------------------------------ interrupts

    def handle_interrupt(self, vector: int, pv_eoi: bool = False) -> KernelOp[None]:
        """Deliver one injected vector at an instruction boundary."""
        if vector == Vector.SPURIOUS:
            self.spurious += 1  # no EOI for the spurious vector
            return
        if pv_eoi:
            self.ops.pv_eoi_pending = True
        yield from self.ops.eoi()
        self.eois += 1
        if vector in (Vector.CALL_FUNCTION, Vector.CALL_FUNCTION_SINGLE):
            yield from self.smp.flush_queue()
            return
        if vector == Vector.RESCHEDULE:
            self.smp.stats.reschedules += 1  # scheduler_ipi: nothing else to model
            return
        if vector != Vector.LOCAL_TIMER:
            self.unhandled += 1
            return
        assert self.timers is not None
        if self.spec.periodic:
            # tick_handle_periodic + hrtimer_run_queues: hrtimers at tick granularity
            self.jiffies += 1
            self.timers.interrupts += 1
            if not self.timers._run_due(self.ktime()):
                self.timers.early += 1
            return
        yield from self.timers.interrupt()

    def counters(self) -> dict[str, int]:
        """Kernel-side counters for the report."""
        out: dict[str, int] = {"jiffies": self.jiffies, "etime": self.core.etime}
        if self.dev is not None:
            out["device_programs"] = self.dev.programs
            out["min_delta_retries"] = self.dev.retries
        if self.timers is not None:
            out["hrtimer_retries"] = self.timers.retries
            out["hrtimer_hangs"] = self.timers.hangs
            out["device_interrupts"] = self.timers.interrupts
        out["pv_eois"] = self.ops.pv_eois
        if self.calibration is not None:
            out["calibration_period"] = self.calibration.lapic_timer_period
            out["calibration_polls"] = self.calibration.polls
            out["calibration_rescaled"] = int(self.calibration.rescaled)
        st = self.smp.stats
        out |= {
            "smp_calls": st.calls,
            "csds_sent": st.csds_sent,
            "csds_run": st.csds_run,
            "ipis_sent": st.ipis_sent,
            "shortcut_ipis": st.shortcut_ipis,
            "empty_queue_ipis": st.empty_queue_ipis,
            "csd_timeouts": st.timeouts,
            "csd_errors": st.errors,
            "reschedules": st.reschedules,
        }
        return out
