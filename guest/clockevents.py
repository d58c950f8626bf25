"""The clockevents core, modelled on Linux's ``kernel/time/clockevents.c``.

A clock-event device is an ops object (:class:`ClockEventDevice`) that a driver fills in;
this module owns everything a driver should not have to know: registration and rating,
``clockevents_config`` (``clocks_calc_mult_shift`` and ``cev_delta2ns`` from
``vtick.proto.clockmath``), state changes, and ``program_event`` with its min/max clamp,
its -ETIME answer for a past expiry, and the min-delta retry that raises ``min_delta_ns``
after three failures (``CONFIG_GENERIC_CLOCKEVENTS_MIN_ADJUST``; reference section 8).

The same guest code runs over every device by swapping the driver, as Linux swaps a
``clock_event_device``: a KTIME-capable device gets the absolute expiry, every other one
a delta in its own ticks computed from "now".  Between computing that delta and writing
it to the device there is a named preemption point, ``clockevents.delta_to_device``: a
vCPU preempted there fires late by exactly the preemption, which is the heart of the
absolute-versus-relative argument (DESIGN.md section 1).

Every routine that touches a device is a kernel op (a generator yielding exits, see
``vtick.guest.cpu``); configuration is plain Python.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, IntFlag

from vtick.guest.cpu import KernelOp, preemption_point
from vtick.proto.abi import ETIME
from vtick.proto.catalog import PREEMPT_DELTA_TO_DEVICE
from vtick.proto.clockmath import NSEC_PER_SEC, U32_MASK, cev_delta2ns, clocks_calc_mult_shift

__all__ = [
    "CEFeature",
    "CEState",
    "ClockEventDevice",
    "ClockEvents",
    "KTIME_MAX",
    "PREEMPT_DELTA_TO_DEVICE",
]

KTIME_MAX = (1 << 63) - 1
#: clockevents_program_min_delta gives up raising min_delta beyond one jiffy
_MIN_DELTA_RAISE_FROM_NS = 5000
_MIN_DELTA_RETRIES = 3


class CEFeature(IntFlag):
    """``CLOCK_EVT_FEAT_*`` (include/linux/clockchips.h)."""

    PERIODIC = 0x01
    ONESHOT = 0x02
    KTIME = 0x04
    C3STOP = 0x08
    DUMMY = 0x10


class CEState(Enum):
    DETACHED = "detached"
    SHUTDOWN = "shutdown"
    PERIODIC = "periodic"
    ONESHOT = "oneshot"
    ONESHOT_STOPPED = "oneshot-stopped"


class ClockEventDevice:
    """A clock-event device: drivers subclass it and implement the ops they support.

    ``set_next_event(ticks)`` (relative, device ticks) or ``set_next_ktime(expires)``
    (absolute guest ns, with ``CEFeature.KTIME``) return 0 or a negative errno.
    """

    def __init__(self, name: str, features: CEFeature, rating: int) -> None:
        self.name = name
        self.features = features
        self.rating = rating
        self.mult = 0
        self.shift = 0
        self.min_delta_ns = 0
        self.max_delta_ns = 0
        self.min_delta_ticks = 0
        self.max_delta_ticks = 0
        self.state = CEState.DETACHED
        self.next_event = KTIME_MAX
        self.retries = 0
        self.programs = 0

    def register(self, core: ClockEvents) -> None:
        """Register with ``core``; drivers that know their frequency override this to
        call ``clockevents_config_and_register``."""
        core.register(self)

    # ---- driver ops (override what the device supports)

    def set_next_event(self, ticks: int) -> KernelOp[int]:
        raise NotImplementedError(f"{self.name}: no set_next_event")
        yield  # pragma: no cover

    def set_next_ktime(self, expires: int) -> KernelOp[int]:
        raise NotImplementedError(f"{self.name}: no set_next_ktime")
        yield  # pragma: no cover

    def set_state_shutdown(self) -> KernelOp[None]:
        return
        yield  # pragma: no cover

    def set_state_oneshot(self) -> KernelOp[None]:
        return
        yield  # pragma: no cover

    def set_state_periodic(self) -> KernelOp[None]:
        raise NotImplementedError(f"{self.name}: no periodic mode")
        yield  # pragma: no cover


class ClockEvents:
    """The per-vCPU clockevents core.

    Args:
        clock: guest CLOCK_MONOTONIC in ns (``ktime_get``).
        hz: the kernel's HZ, which bounds how far min_delta may be raised (one jiffy).
    """

    def __init__(self, clock: Callable[[], int], hz: int = 1000) -> None:
        if hz < 1:
            raise ValueError("HZ must be positive")
        self.clock = clock
        self.hz = hz
        self.devices: list[ClockEventDevice] = []
        self.active: ClockEventDevice | None = None
        self.etime = 0  # program_event answers of -ETIME

    # ------------------------------------------------------------------ configuration

    def config(self, dev: ClockEventDevice, freq: int) -> None:
        """``clockevents_config``: mult/shift and the ns clamps from ``freq`` and the ticks."""
        if not dev.features & CEFeature.ONESHOT:
            return
        sec = dev.max_delta_ticks // freq
        if not sec:
            sec = 1
        elif sec > 600 and dev.max_delta_ticks > U32_MASK:
            sec = 600
        dev.mult, dev.shift = clocks_calc_mult_shift(NSEC_PER_SEC, freq, sec)
        dev.min_delta_ns = cev_delta2ns(dev.min_delta_ticks, dev.mult, dev.shift, False)
        dev.max_delta_ns = cev_delta2ns(dev.max_delta_ticks, dev.mult, dev.shift, True)

    def config_and_register(
        self, dev: ClockEventDevice, freq: int, min_ticks: int, max_ticks: int
    ) -> None:
        """``clockevents_config_and_register``."""
        dev.min_delta_ticks = min_ticks
        dev.max_delta_ticks = max_ticks
        self.config(dev, freq)
        self.register(dev)

    def register(self, dev: ClockEventDevice) -> None:
        """Add a device; the highest-rated one becomes :attr:`active`.

        (``tick_check_new_device`` prefers the higher rating.)
        """
        if dev in self.devices:
            raise ValueError(f"{dev.name} registered twice")
        if not dev.features & (CEFeature.ONESHOT | CEFeature.PERIODIC):
            raise ValueError(f"{dev.name}: neither oneshot nor periodic")
        relative_oneshot = dev.features & CEFeature.ONESHOT and not dev.features & CEFeature.KTIME
        if relative_oneshot and not dev.mult:
            raise ValueError(f"{dev.name}: oneshot device without mult/shift")
        dev.state = CEState.DETACHED
        self.devices.append(dev)
        if self.active is None or dev.rating > self.active.rating:
            self.active = dev

    # ------------------------------------------------------------------ state

    def switch_state(self, dev: ClockEventDevice, state: CEState) -> KernelOp[None]:
        """``clockevents_switch_state``: refuses modes the device lacks."""
        if dev.state is state:
            return
        if state is CEState.ONESHOT:
            if not dev.features & CEFeature.ONESHOT:
                raise ValueError(f"{dev.name} has no oneshot mode")
            yield from dev.set_state_oneshot()
        elif state is CEState.PERIODIC:
            if not dev.features & CEFeature.PERIODIC:
                raise ValueError(f"{dev.name} has no periodic mode")
            yield from dev.set_state_periodic()
        elif state in (CEState.SHUTDOWN, CEState.DETACHED, CEState.ONESHOT_STOPPED):
            yield from dev.set_state_shutdown()
        dev.state = state
        if state is CEState.ONESHOT and not dev.mult and not dev.features & CEFeature.KTIME:
            dev.mult = 1  # Linux: WARN_ON(!dev->mult) in oneshot mode

    def shutdown(self, dev: ClockEventDevice) -> KernelOp[None]:
        yield from self.switch_state(dev, CEState.SHUTDOWN)
        dev.next_event = KTIME_MAX

    def exchange(self, new: ClockEventDevice, mode: CEState) -> KernelOp[None]:
        """Switch the active device at run time (``clockevents_exchange_device``)."""
        old = self.active
        if new not in self.devices:
            new.register(self)  # the driver's own registration (it may configure itself)
        if old is not None and old is not new:
            yield from self.shutdown(old)
            old.state = CEState.DETACHED
        self.active = new
        yield from self.switch_state(new, mode)

    # ------------------------------------------------------------------ programming

    def program_event(self, dev: ClockEventDevice, expires: int, force: bool) -> KernelOp[int]:
        """``clockevents_program_event``: 0, or -ETIME when ``expires`` is already past
        (and ``force`` is false), or what the driver answered."""
        if expires < 0:
            self.etime += 1
            return -ETIME
        dev.next_event = expires
        if dev.state is CEState.SHUTDOWN:
            return 0
        dev.programs += 1
        if dev.features & CEFeature.KTIME:
            rc = yield from dev.set_next_ktime(expires)
            if rc == -ETIME:
                self.etime += 1
            return rc
        delta = expires - self.clock()
        if delta <= 0:
            if force:
                return (yield from self._program_min_delta(dev))
            self.etime += 1
            return -ETIME
        delta = min(delta, dev.max_delta_ns)
        delta = max(delta, dev.min_delta_ns)
        ticks = (delta * dev.mult) >> dev.shift
        # A relative delta is stale the moment it is computed: a vCPU preempted here
        # programs a timer that fires late by the preemption (DESIGN.md section 1).
        yield from preemption_point(PREEMPT_DELTA_TO_DEVICE)
        rc = yield from dev.set_next_event(ticks)
        if rc and force:
            return (yield from self._program_min_delta(dev))
        return rc

    def _program_min_delta(self, dev: ClockEventDevice) -> KernelOp[int]:
        """``clockevents_program_min_delta`` with MIN_ADJUST: after three failed tries,
        raise min_delta (to 5 us, then by half) up to one jiffy, then give up."""
        jiffy = NSEC_PER_SEC // self.hz
        failures = 0
        while True:
            delta = dev.min_delta_ns
            dev.next_event = self.clock() + delta
            if dev.state is CEState.SHUTDOWN:
                return 0
            dev.retries += 1
            ticks = (delta * dev.mult) >> dev.shift
            if (yield from dev.set_next_event(ticks)) == 0:
                return 0
            failures += 1
            if failures >= _MIN_DELTA_RETRIES:
                if dev.min_delta_ns >= jiffy:
                    dev.next_event = KTIME_MAX
                    self.etime += 1
                    return -ETIME
                if dev.min_delta_ns < _MIN_DELTA_RAISE_FROM_NS:
                    dev.min_delta_ns = _MIN_DELTA_RAISE_FROM_NS
                else:
                    dev.min_delta_ns += dev.min_delta_ns >> 1
                dev.min_delta_ns = min(dev.min_delta_ns, jiffy)
                failures = 0
