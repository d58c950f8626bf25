"""The paravirtual clock-event device, in its three flavours.

* ``pv-ktime``: ``set_next_ktime(expires)`` -- one hypercall with the *absolute* expiry in
  guest ns (CLOCK_MONOTONIC), the device Gleixner proposed in 2007: no unit conversion
  on either side and nothing for a preemption to make stale.
* ``pv-delta``: ``set_next_event(ns)`` with mult/shift 1:1 -- a relative delta in ns; the
  core computes it from "now", so a preemption before the hypercall makes it late.
* ``pv-future``: like pv-ktime with Xen's ``VCPU_SSHOTTMR_future`` flag: a past expiry is
  refused with -ETIME and the core's -ETIME path (re-run expired timers, reprogram)
  takes over (reference section 7).
"""

from __future__ import annotations

from vtick.guest.clockevents import CEFeature, ClockEventDevice, ClockEvents
from vtick.guest.cpu import KernelOp, hypercall
from vtick.proto.abi import PV_TIMER_FUTURE, Hypercall
from vtick.proto.clockmath import NSEC_PER_SEC

__all__ = ["PvKtime", "PvDelta"]

_MAX_NS = (1 << 63) - 1


class PvKtime(ClockEventDevice):
    """Absolute guest-ns expiry; ``future=True`` adds Xen's refuse-the-past flag."""

    def __init__(self, future: bool = False) -> None:
        name = "pv-future" if future else "pv-ktime"
        super().__init__(name, CEFeature.ONESHOT | CEFeature.KTIME, rating=500)
        self.flags = PV_TIMER_FUTURE if future else 0

    def set_next_ktime(self, expires: int) -> KernelOp[int]:
        return (yield from hypercall(Hypercall.VTICK_SET_NEXT_KTIME, expires, self.flags))

    def set_state_shutdown(self) -> KernelOp[None]:
        yield from hypercall(Hypercall.VTICK_TIMER_SHUTDOWN, 0)


class PvDelta(ClockEventDevice):
    """Relative ns, 1:1 (mult 1 << shift)."""

    def __init__(self) -> None:
        super().__init__("pv-delta", CEFeature.ONESHOT, rating=500)

    def register(self, core: ClockEvents) -> None:
        core.config_and_register(self, NSEC_PER_SEC, 1000, _MAX_NS)

    def set_next_event(self, ticks: int) -> KernelOp[int]:
        return (yield from hypercall(Hypercall.VTICK_SET_NEXT_DELTA, ticks, 0))

    def set_state_shutdown(self) -> KernelOp[None]:
        yield from hypercall(Hypercall.VTICK_TIMER_SHUTDOWN, 0)
