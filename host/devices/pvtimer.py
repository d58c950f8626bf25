"""The paravirtual clock-event device: one hypercall with an absolute expiry in guest ns.

``VTICK_SET_NEXT_KTIME(expiry, flags)`` arms the vCPU's one-shot timer for guest
CLOCK_MONOTONIC ``expiry`` (what Linux's ``set_next_ktime`` hands a KTIME-capable
clock_event_device).  The host converts it through the vCPU's published kvmclock
parameters and arms a host hrtimer; no unit conversion on the guest side, no second
trap.  With ``PV_TIMER_FUTURE`` in ``flags`` a past expiry is refused with -ETIME, as
Xen's ``VCPU_SSHOTTMR_future`` did (reference section 7); without it a past expiry
fires at once.  Re-programming replaces the previous expiry; ``VTICK_TIMER_SHUTDOWN``
disarms it.  Both hypercalls answer -KVM_ENOSYS unless the vCPU negotiated
``Feature.PV_TIMER`` in its handshake.
"""

from __future__ import annotations

from vtick.host.machine import Machine, VcpuState
from vtick.proto.abi import ETIME, PV_TIMER_FUTURE, Feature, Hypercall, KvmErrno, Vector

__all__ = ["PvTimer"]

TIMER = "pvtimer"


class PvTimer:
    """Registers the PV timer hypercalls on ``machine``."""

    def __init__(self, machine: Machine, vector: int = Vector.LOCAL_TIMER) -> None:
        self.machine = machine
        self.vector = vector
        self.fired = 0
        machine.register_hypercall(Hypercall.VTICK_SET_NEXT_KTIME, self.set_next_ktime)
        machine.register_hypercall(Hypercall.VTICK_TIMER_SHUTDOWN, self.shutdown)

    def set_next_ktime(self, vcpu: VcpuState, args: list[int], now: int) -> int:
        if not vcpu.features & Feature.PV_TIMER:
            return -KvmErrno.KVM_ENOSYS  # not negotiated: as if the hypercall did not exist
        if not args:
            return -KvmErrno.KVM_EINVAL
        expiry = args[0]
        flags = args[1] if len(args) > 1 else 0
        if flags & ~PV_TIMER_FUTURE:
            return -KvmErrno.KVM_EINVAL
        host_expiry = self.machine.tsc.host_ns_for_ktime(vcpu.pvclock, expiry)
        if host_expiry <= now:
            if flags & PV_TIMER_FUTURE:
                return -ETIME
            self.machine.cancel_timer(TIMER, vcpu)
            self._fire(vcpu, now)
            return 0
        self.machine.arm_timer(TIMER, vcpu, host_expiry, self._fire)
        return 0

    def shutdown(self, vcpu: VcpuState, args: list[int], now: int) -> int:
        if not vcpu.features & Feature.PV_TIMER:
            return -KvmErrno.KVM_ENOSYS
        self.machine.cancel_timer(TIMER, vcpu)
        return 0

    def _fire(self, vcpu: VcpuState, now: int) -> None:
        self.fired += 1
        vcpu.raise_irq(self.vector, now)
