"""VMI-style alarm: the guest programs its timer in absolute guest TSC cycles.

Theory of operation
-------------------
VMware's VMI ROM let a paravirtualized kernel keep its APIC model but program alarms
through ``VMI_CALL_SetAlarm(flags, expiry, period)`` / ``VMI_CALL_CancelAlarm(flags)``
in TSC cycles (DESIGN.md section 1, "VMI's middle road"; the 2007 debate in
``reference/lkml``).  vtick's version:

* ``VTICK_VMI_SET_ALARM(deadline, flags, period)``: ``deadline`` is an absolute guest
  TSC value (u64 cycles); ``flags`` bit 0 (``VMI_ALARM_PERIODIC``) makes the alarm
  periodic with ``period`` cycles, otherwise it is one-shot and ``period`` is ignored.
  Any other flag bit, or a periodic alarm with period 0, is -EINVAL.  A new alarm
  replaces the previous one.  Returns 0.
* ``VTICK_VMI_CANCEL_ALARM()``: disarms; returns 1 if an alarm was pending, else 0
  (VMI's CancelAlarm answered whether it cancelled anything).

The guest TSC is ``TscModel.tsc(t) = floor((t - tsc_epoch) * tsc_khz / 10**6)``; the alarm
is armed at the *earliest* host ns ``t`` with ``tsc(t) >= deadline``, i.e.
``tsc_epoch + ceil(deadline * 10**6 / tsc_khz)`` (exact integer arithmetic), so it never
fires before the guest's own RDTSC would read the deadline.  This is TSC-deadline
conversion (reference section 3: ``ns = (deadline - guest_tsc) * 1e6 / tsc_khz``) with
the rounding done upward.  A deadline the TSC has already reached fires in the same exit
(as KVM's TSC-deadline MSR does).

Periodic alarms advance drift-free by exactly one period from the previous deadline.  If
the host ran late and whole periods have passed, they are not replayed: only one
interrupt is raised and the next deadline is the first one after the current TSC (the
phase is kept); the skipped periods are counted in ``overruns``.  Periods shorter than
``min_period_ns`` (default 200 µs) are raised to it, KVM's ``min_timer_period_us`` clamp
for periodic LAPIC timers (reference section 3), counted in ``clamped``.

On expiry the device raises ``vector`` (LOCAL_TIMER, 0xEC) through
``VcpuState.raise_irq``.  Both hypercalls answer -KVM_ENOSYS unless the vCPU negotiated
``Feature.VMI``.  (VMI's apic_read/apic_write hypercalls are a LAPIC-model concern and
are not implemented here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vtick.host.machine import Machine, VcpuState
from vtick.proto.abi import VMI_ALARM_PERIODIC, Feature, Hypercall, KvmErrno, Vector
from vtick.proto.clockmath import U64_MASK
from vtick.proto.pvclock import TscModel

__all__ = ["VmiAlarm", "VmiAlarmStats", "host_ns_for_tsc", "MIN_PERIOD_NS"]

TIMER = "vmi-alarm"
#: KVM's min_timer_period_us default (200 µs), applied to periodic alarms
MIN_PERIOD_NS = 200_000


def host_ns_for_tsc(model: TscModel, deadline: int) -> int:
    """The earliest host ns ``t`` with ``model.tsc(t) >= deadline`` (exact, never early):
    ``TscModel.host_ns_for_tsc``, the one place this conversion is written."""
    return model.host_ns_for_tsc(deadline)


@dataclass
class VmiAlarmStats:
    """Per-vCPU counters of the VMI alarm."""

    programs: int = 0  # accepted SetAlarm calls
    periodic_programs: int = 0  # of which periodic
    immediate: int = 0  # accepted alarms whose deadline had already passed
    replaced: int = 0  # SetAlarm calls that replaced a pending alarm
    fires: int = 0  # interrupts raised
    overruns: int = 0  # whole periods skipped because the host ran late
    clamped: int = 0  # periodic alarms whose period was raised to the minimum
    cancels: int = 0  # CancelAlarm calls
    cancelled: int = 0  # of which found an alarm pending
    einval: int = 0


@dataclass
class _Alarm:
    deadline: int  # guest TSC cycles
    period: int  # cycles; 0 = one-shot


class VmiAlarm:
    """Registers the VMI alarm hypercalls on ``machine``.

    Args:
        machine: the VM; ``machine.tsc`` defines the guest TSC.
        vector: raised on expiry.
        min_period_ns: shortest period a periodic alarm may have.
    """

    def __init__(
        self,
        machine: Machine,
        vector: int = Vector.LOCAL_TIMER,
        min_period_ns: int = MIN_PERIOD_NS,
    ) -> None:
        self.machine = machine
        self.vector = vector
        # the fewest cycles spanning min_period_ns (rounded up)
        self.min_period = -((-min_period_ns * machine.tsc.tsc_khz) // 1_000_000)
        self.stats = [VmiAlarmStats() for _ in machine.vcpus]
        #: the pending alarm per vCPU id
        self.alarms: dict[int, _Alarm] = {}
        machine.devices["vmi-alarm"] = self
        machine.register_hypercall(Hypercall.VTICK_VMI_SET_ALARM, self.set_alarm)
        machine.register_hypercall(Hypercall.VTICK_VMI_CANCEL_ALARM, self.cancel_alarm)

    def deadline(self, vcpu: int) -> int | None:
        """The pending alarm's deadline (guest TSC) for vCPU ``vcpu``."""
        alarm = self.alarms.get(vcpu)
        return None if alarm is None else alarm.deadline

    # ------------------------------------------------------------------ hypercalls

    def set_alarm(self, vcpu: VcpuState, args: list[int], now: int) -> int:
        if not vcpu.features & Feature.VMI:
            return -KvmErrno.KVM_ENOSYS
        stats = self.stats[vcpu.vcpu]
        deadline, flags, period = ([*args, 0, 0, 0])[:3]
        deadline &= U64_MASK
        periodic = bool(flags & VMI_ALARM_PERIODIC)
        if not args or flags & ~VMI_ALARM_PERIODIC or (periodic and period <= 0):
            stats.einval += 1
            return -KvmErrno.KVM_EINVAL
        if not periodic:
            period = 0
        elif period < self.min_period:
            stats.clamped += 1
            period = self.min_period
        stats.programs += 1
        stats.periodic_programs += periodic
        stats.replaced += self.alarms.pop(vcpu.vcpu, None) is not None
        self.machine.cancel_timer(TIMER, vcpu)
        alarm = _Alarm(deadline, period)
        if self.machine.tsc.tsc(now) >= deadline:
            stats.immediate += 1
            self.alarms[vcpu.vcpu] = alarm
            self._fire(vcpu, now)
        else:
            self.alarms[vcpu.vcpu] = alarm
            self._arm(vcpu, alarm)
        return 0

    def cancel_alarm(self, vcpu: VcpuState, args: list[int], now: int) -> int:
        if not vcpu.features & Feature.VMI:
            return -KvmErrno.KVM_ENOSYS
        stats = self.stats[vcpu.vcpu]
        stats.cancels += 1
        self.machine.cancel_timer(TIMER, vcpu)
        if self.alarms.pop(vcpu.vcpu, None) is None:
            return 0
        stats.cancelled += 1
        return 1

    # ------------------------------------------------------------------ internals

    def _arm(self, vcpu: VcpuState, alarm: _Alarm) -> None:
        when = host_ns_for_tsc(self.machine.tsc, alarm.deadline)
        self.machine.arm_timer(TIMER, vcpu, when, self._fire)

    def _fire(self, vcpu: VcpuState, now: int) -> None:
        """The alarm's deadline has been reached at ``now``: raise; re-arm if periodic."""
        alarm = self.alarms.pop(vcpu.vcpu)
        stats = self.stats[vcpu.vcpu]
        stats.fires += 1
        vcpu.raise_irq(self.vector, now)
        if not alarm.period:
            return
        tsc = self.machine.tsc.tsc(now)
        # the first deadline of the series after the current TSC; skipped ones coalesce
        periods = (tsc - alarm.deadline) // alarm.period + 1
        stats.overruns += periods - 1
        nxt = _Alarm(alarm.deadline + periods * alarm.period, alarm.period)
        self.alarms[vcpu.vcpu] = nxt
        self._arm(vcpu, nxt)

    # ------------------------------------------------------------------ migration (issue 13)

    def save_vcpu(self, vcpu: int, now: int) -> dict[str, Any]:
        """The pending alarm in guest TSC cycles, if any (CDDL ``vmi-alarm-vcpu``).

        Deadline and period are guest TSC values, which continue across the move (the
        guest TSC follows the VM, as with KVM_SET_TSC_KHZ plus the TSC offset), so they
        travel unchanged; the host expiry is re-derived on restore.
        """
        alarm = self.alarms.get(vcpu)
        if alarm is None:
            return {}
        return {"deadline": alarm.deadline, "period": alarm.period}

    def restore_vcpu(self, vcpu: int, state: dict[str, Any], now: int) -> None:
        """Re-arm the alarm through this host's guest TSC.  A deadline passed during the
        blackout is armed in the past and fires at the next expiry pass (a periodic one
        then skips the periods it missed, counted as overruns, as on any late host)."""
        if "deadline" not in state:
            return
        alarm = _Alarm(state["deadline"], state["period"])
        self.alarms[vcpu] = alarm
        self._arm(self.machine.vcpus[vcpu], alarm)
