"""The paravirtual clock-event device: one hypercall per programmed event, in guest ns.

Theory of operation
-------------------
``VTICK_SET_NEXT_KTIME(expiry, flags)`` arms the vCPU's one-shot timer for guest
CLOCK_MONOTONIC ``expiry`` (what Linux's ``set_next_ktime`` hands a KTIME-capable
clock_event_device).  The host converts it through the vCPU's published kvmclock
parameters (``TscModel.host_ns_for_ktime``: the earliest host ns at which the guest
reads ktime >= expiry, so it never fires early) and arms a host hrtimer; no unit
conversion on the guest side, no second trap (DESIGN.md section 1, the "pv-ktime" mode).

``VTICK_SET_NEXT_DELTA(delta, flags)`` is the "pv-delta" mode: ``delta`` is a signed
64-bit count of ns (1:1, no mult/shift) added to the guest's ktime at the host's
``now`` when it handles the exit.  That is the whole point of the variant: a delta
computed at guest time t and delivered at t + P (the vCPU was preempted for P) fires P
late, where an absolute expiry would not move (DESIGN.md section 1, "why absolute
matters").  The u64 argument is read as s64; a ``delta <= 0`` means "already due" and is
treated exactly like a past absolute expiry (fire at once, or -ETIME with the flag).

Past expiries: with ``PV_TIMER_FUTURE`` in ``flags`` a reached expiry is refused with
-ETIME (62) and nothing changes (the previous expiry, if any, stays armed), as Xen's
``VCPU_SSHOTTMR_future`` did in older Xen/KVM-Xen (reference section 7); without it the
old expiry is cancelled and the interrupt is raised in the same exit ("get an event
anyway", what Linux passes today).  Unknown flag bits or a missing argument: -EINVAL.

Re-programming replaces the previous expiry (one timer per vCPU);
``VTICK_TIMER_SHUTDOWN`` disarms it.  All three hypercalls answer -KVM_ENOSYS unless
the vCPU negotiated ``Feature.PV_TIMER`` in its handshake.

The armed expiry is remembered in guest ktime: when kvmclock re-publishes the vCPU's
pvclock (``KvmClock.add_listener(pvtimer.on_republish)``) the host expiry is recomputed
through the new parameters, so the never-early guarantee holds for the clock the guest
will be reading when the interrupt arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vtick.host.machine import Machine, VcpuState
from vtick.proto.abi import ETIME, PV_TIMER_FUTURE, Feature, Hypercall, KvmErrno, Vector
from vtick.proto.clockmath import U64_MASK

__all__ = ["PvTimer", "PvTimerStats", "s64"]

TIMER = "pvtimer"
#: how soon the ``double-fire`` mutation fires the timer again (vtick.host.mutations)
DOUBLE_FIRE_NS = 20_000


def s64(value: int) -> int:
    """A u64 hypercall argument read as a signed 64-bit value (two's complement)."""
    value &= U64_MASK
    return value - (1 << 64) if value >> 63 else value


@dataclass
class PvTimerStats:
    """Per-vCPU counters of the PV timer."""

    programs: int = 0  # accepted set_next_ktime / set_next_delta calls (armed or fired at once)
    delta_programs: int = 0  # of which through VTICK_SET_NEXT_DELTA
    immediate: int = 0  # accepted programs whose expiry was already due (fired in the exit)
    replaced: int = 0  # accepted programs that replaced a still-armed expiry
    fires: int = 0  # interrupts raised (timer expiry or immediate)
    etime: int = 0  # past expiries refused with -ETIME (PV_TIMER_FUTURE)
    einval: int = 0  # malformed calls
    shutdowns: int = 0  # VTICK_TIMER_SHUTDOWN calls
    cancelled: int = 0  # shutdowns that disarmed a pending expiry
    rearmed: int = 0  # armed expiries recomputed after a pvclock re-publication
    never: int = 0  # accepted programs whose expiry the guest clock never reaches (disarm)


class PvTimer:
    """Registers the PV timer hypercalls on ``machine``.

    Args:
        machine: the VM.
        vector: the vector raised on expiry (Linux's LOCAL_TIMER_VECTOR by default).
    """

    def __init__(self, machine: Machine, vector: int = Vector.LOCAL_TIMER) -> None:
        self.machine = machine
        self.vector = vector
        self.stats = [PvTimerStats() for _ in machine.vcpus]
        #: armed expiry per vCPU id, in guest ktime ns
        self.armed: dict[int, int] = {}
        machine.devices["pvtimer"] = self
        machine.register_hypercall(Hypercall.VTICK_SET_NEXT_KTIME, self.set_next_ktime)
        machine.register_hypercall(Hypercall.VTICK_TIMER_SHUTDOWN, self.shutdown)
        machine.register_hypercall(Hypercall.VTICK_SET_NEXT_DELTA, self.set_next_delta)

    @property
    def fired(self) -> int:
        """Interrupts raised, all vCPUs together."""
        return sum(s.fires for s in self.stats)

    # ------------------------------------------------------------------ hypercalls

    def set_next_ktime(self, vcpu: VcpuState, args: list[int], now: int) -> int:
        if not vcpu.features & Feature.PV_TIMER:
            return -KvmErrno.KVM_ENOSYS  # not negotiated: as if the hypercall did not exist
        flags = self._flags(vcpu, args)
        if flags is None:
            return -KvmErrno.KVM_EINVAL
        return self._program(vcpu, args[0], flags, now)

    def set_next_delta(self, vcpu: VcpuState, args: list[int], now: int) -> int:
        if not vcpu.features & Feature.PV_TIMER:
            return -KvmErrno.KVM_ENOSYS
        flags = self._flags(vcpu, args)
        if flags is None:
            return -KvmErrno.KVM_EINVAL
        delta = s64(args[0])
        ktime_now = vcpu.pvclock.ktime(self.machine.tsc.tsc(now))
        # delta <= 0 yields an expiry <= ktime_now: the "already due" path below
        result = self._program(vcpu, ktime_now + delta, flags, now)
        if result == 0:
            self.stats[vcpu.vcpu].delta_programs += 1
        return result

    def shutdown(self, vcpu: VcpuState, args: list[int], now: int) -> int:
        if not vcpu.features & Feature.PV_TIMER:
            return -KvmErrno.KVM_ENOSYS
        stats = self.stats[vcpu.vcpu]
        stats.shutdowns += 1
        self.armed.pop(vcpu.vcpu, None)
        if self.machine.cancel_timer(TIMER, vcpu):
            stats.cancelled += 1
        return 0

    # ------------------------------------------------------------------ kvmclock hook

    def on_republish(self, vcpu: VcpuState, now: int) -> None:
        """``vcpu.pvclock`` changed: re-derive the armed host expiry from the new one."""
        expiry = self.armed.get(vcpu.vcpu)
        if expiry is None:
            return
        self.stats[vcpu.vcpu].rearmed += 1
        host_expiry = self.machine.tsc.host_ns_for_ktime(vcpu.pvclock, expiry)
        if host_expiry is None:  # unreachable through the new clock: never
            self.armed.pop(vcpu.vcpu, None)
            self.machine.cancel_timer(TIMER, vcpu)
        elif host_expiry <= now:
            self.machine.cancel_timer(TIMER, vcpu)
            self._fire(vcpu, now)
        else:
            self.machine.arm_timer(TIMER, vcpu, host_expiry, self._fire)

    # ------------------------------------------------------------------ internals

    def _flags(self, vcpu: VcpuState, args: list[int]) -> int | None:
        flags = args[1] if len(args) > 1 else 0
        if not args or flags & ~PV_TIMER_FUTURE:
            self.stats[vcpu.vcpu].einval += 1
            return None
        return flags

    def _program(self, vcpu: VcpuState, expiry: int, flags: int, now: int) -> int:
        """Arm ``vcpu``'s timer for guest ktime ``expiry`` (fire at once if it is due)."""
        stats = self.stats[vcpu.vcpu]
        host_expiry = self.machine.tsc.host_ns_for_ktime(vcpu.pvclock, expiry)
        if host_expiry is None:
            # An expiry the guest's clock never reaches (KTIME_MAX included) means
            # "never": clockevents programs KTIME_MAX to stop the device
            # (clockevents_program_event, CLOCK_EVT_STATE_ONESHOT_STOPPED), and KVM's
            # hrtimer for such a deadline never fires.  Disarm; the call succeeds.
            stats.programs += 1
            stats.never += 1
            stats.replaced += self.machine.cancel_timer(TIMER, vcpu)
            self.armed.pop(vcpu.vcpu, None)
            return 0
        if host_expiry <= now:
            if flags & PV_TIMER_FUTURE:
                stats.etime += 1
                return -ETIME
            stats.programs += 1
            stats.immediate += 1
            stats.replaced += self.machine.cancel_timer(TIMER, vcpu)
            self.armed.pop(vcpu.vcpu, None)
            self._fire(vcpu, now)
            return 0
        stats.programs += 1
        stats.replaced += self.machine.hrtimers.expiry((TIMER, vcpu.vcpu)) is not None
        self.armed[vcpu.vcpu] = expiry
        self.machine.arm_timer(TIMER, vcpu, host_expiry, self._fire)
        return 0

    def _fire(self, vcpu: VcpuState, now: int) -> None:
        self.armed.pop(vcpu.vcpu, None)
        self.stats[vcpu.vcpu].fires += 1
        vcpu.raise_irq(self.vector, now)
        if self.machine.mutations.sometimes("double-fire"):
            # mutation: the one-shot fires a second time (vtick.host.mutations)
            self.machine.arm_timer(TIMER, vcpu, now + DOUBLE_FIRE_NS, self._fire)

    # ------------------------------------------------------------------ migration (issue 13)

    def save_vcpu(self, vcpu: int, now: int) -> dict[str, Any]:
        """The armed expiry in guest ktime (absolute), if any (CDDL ``pvtimer-vcpu``).

        That is all the device keeps: the flags (PV_TIMER_FUTURE) only decide the
        hypercall's answer, and a delta program is stored as its absolute expiry.  The
        host expiry is not saved: it is a host time, re-derived on restore.
        """
        expiry = self.armed.get(vcpu)
        return {} if expiry is None else {"expiry": expiry}

    def restore_vcpu(self, vcpu: int, state: dict[str, Any], now: int) -> None:
        """Re-arm an absolute guest-ktime expiry on this host.

        Converted through the vCPU's pvclock and ``machine.tsc`` of *this* host (restored
        first), so the re-based expiry is exactly when the guest's clock reads it: an
        absolute expiry survives a move unchanged in guest time (the point of the
        "pv-ktime" mode).  One already reached (due during the blackout) is armed in the
        past and fires at the next expiry pass, late by the blackout; one the clock
        never reaches stays disarmed, as it was on the source.
        """
        expiry = state.get("expiry")
        if expiry is None:
            return
        state_v = self.machine.vcpus[vcpu]
        host_expiry = self.machine.tsc.host_ns_for_ktime(state_v.pvclock, expiry)
        if host_expiry is None:
            return
        self.armed[vcpu] = expiry
        self.machine.arm_timer(TIMER, state_v, host_expiry, self._fire)
