"""The guest clockevents core: config, program_event, the min-delta retry, state changes.

Pure tests drive the core with fake devices and a settable clock; the exchange test at
the end also runs through the in-process VM (tests/inproc.py) against the real host.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inproc import InProcVm

from vtick.guest.apic import XApicOps
from vtick.guest.clockevents import (
    KTIME_MAX,
    CEFeature,
    CEState,
    ClockEventDevice,
    ClockEvents,
)
from vtick.guest.cpu import PreemptionPoint, run_to_completion
from vtick.guest.drivers.lapic_timer import LapicTimer, tick_nsec
from vtick.guest.drivers.pv_timer import PvDelta, PvKtime
from vtick.guest.drivers.tsc_deadline import TscDeadline
from vtick.guest.drivers.vmi_timer import VmiTimer
from vtick.proto import messages as m
from vtick.proto.abi import ETIME, Hypercall
from vtick.proto.clockmath import cev_delta2ns

U64 = (1 << 64) - 1


class Clock:
    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class FakeDev(ClockEventDevice):
    """Records every driver op; ``set_next_event`` fails ``fail`` times (-ETIME) first."""

    def __init__(
        self,
        name: str = "fake",
        features: CEFeature = CEFeature.ONESHOT,
        rating: int = 100,
        fail: int = 0,
    ) -> None:
        super().__init__(name, features, rating)
        self.fail = fail
        self.calls: list[tuple[str, Any]] = []

    def set_next_event(self, ticks: int):
        self.calls.append(("next", ticks))
        if self.fail:
            self.fail -= 1
            return -ETIME
        return 0
        yield  # pragma: no cover

    def set_next_ktime(self, expires: int):
        self.calls.append(("ktime", expires))
        return 0
        yield  # pragma: no cover

    def set_state_shutdown(self):
        self.calls.append(("shutdown", None))
        return
        yield  # pragma: no cover

    def set_state_oneshot(self):
        self.calls.append(("oneshot", None))
        return
        yield  # pragma: no cover

    def set_state_periodic(self):
        self.calls.append(("periodic", None))
        return
        yield  # pragma: no cover


def run(op):
    """Drive a pure op: only preemption points may be yielded (resumed with None)."""

    def answer(item):
        assert isinstance(item, PreemptionPoint), f"unexpected exit {item!r}"
        return None

    return run_to_completion(op, answer)


def configured(
    freq: int = 1_000_000_000, min_ticks: int = 1000, max_ticks: int = 1 << 40, **kw
) -> tuple[ClockEvents, FakeDev, Clock]:
    clock = Clock()
    core = ClockEvents(clock, hz=kw.pop("hz", 1000))
    dev = FakeDev(**kw)
    core.config_and_register(dev, freq, min_ticks, max_ticks)
    run(core.switch_state(dev, CEState.ONESHOT))
    dev.calls.clear()
    return core, dev, clock


# ---------------------------------------------------------------------- config


def test_lapic_clockevent_config_at_hz_1000():
    """Reference section 8: lapic_timer_period 1e6 at HZ 1000 -> mult 268435456, shift 32;
    min = delta2ns(0xF), max = delta2ns(0x7FFFFFFF)."""
    dev = LapicTimer(XApicOps(0, 1), 1_000_000, 1000)
    assert (dev.mult, dev.shift) == (268435456, 32)
    assert (dev.min_delta_ticks, dev.max_delta_ticks) == (0xF, 0x7FFF_FFFF)
    assert (dev.min_delta_ns, dev.max_delta_ns) == (1000, 34359738352)
    assert dev.features == CEFeature.ONESHOT | CEFeature.PERIODIC
    assert dev.rating == 100
    # the same numbers as clockevents_config at the bus / 16 = 62.5 MHz
    core = ClockEvents(Clock())
    other = FakeDev()
    core.config_and_register(other, 62_500_000, 0xF, 0x7FFF_FFFF)
    assert (other.mult, other.shift, other.min_delta_ns, other.max_delta_ns) == (
        268435456,
        32,
        1000,
        34359738352,
    )


@pytest.mark.parametrize("hz", [100, 250, 300, 1000])
def test_lapic_mult_follows_the_calibrated_period(hz):
    period = 1_000_000_000 // hz  # a 1 GHz bus
    dev = LapicTimer(XApicOps(0, 1), period, hz)
    assert dev.mult == ((period // 16) << 32) // tick_nsec(hz)
    assert dev.min_delta_ns == cev_delta2ns(0xF, dev.mult, 32, False)
    assert dev.max_delta_ns == cev_delta2ns(0x7FFF_FFFF, dev.mult, 32, True)
    # one ms is 62 500 ticks of a 62.5 MHz timer, whatever HZ the period was measured at
    assert abs(((1_000_000 * dev.mult) >> 32) - 62_500) <= 1


def test_tsc_deadline_config_at_2_5_ghz():
    """Reference section 8: 312.5 MHz (2.5 GHz / 8), 0xF, 2^64-1 -> mult 10485760, shift 25,
    min 1000, max 1759218604441."""
    core = ClockEvents(Clock())
    dev = TscDeadline(XApicOps(0, 1), lambda: 0, 2_500_000)
    dev.register(core)
    assert (dev.mult, dev.shift) == (10485760, 25)
    assert (dev.min_delta_ns, dev.max_delta_ns) == (1000, 1759218604441)
    assert (dev.min_delta_ticks, dev.max_delta_ticks) == (0xF, U64)
    assert core.active is dev


@pytest.mark.parametrize(
    ("freq", "min_ticks", "max_ticks", "mult", "shift", "min_ns", "max_ns"),
    [
        (62_500_000, 0xF, 0x7FFF_FFFF, 268435456, 32, 1000, 34359738352),
        (1_000_000_000, 0xF, 0x7FFF_FFFF, 2147483648, 31, 1000, 2147483647),
        (250_000_000, 0xF, U64, 8388608, 25, 1000, 2199023255551),
        (312_500_000, 0xF, U64, 10485760, 25, 1000, 1759218604441),
    ],
)
def test_clockevents_config_reference_vectors(
    freq, min_ticks, max_ticks, mult, shift, min_ns, max_ns
):
    core = ClockEvents(Clock())
    dev = FakeDev()
    core.config_and_register(dev, freq, min_ticks, max_ticks)
    assert (dev.mult, dev.shift, dev.min_delta_ns, dev.max_delta_ns) == (
        mult,
        shift,
        min_ns,
        max_ns,
    )


def test_pv_delta_is_one_to_one():
    core = ClockEvents(Clock())
    dev = PvDelta()
    dev.register(core)
    for ns in (1000, 1_000_000, 123_456_789, 10**12):
        assert (ns * dev.mult) >> dev.shift == ns
    assert dev.min_delta_ns == 1000


def test_vmi_timer_counts_tsc_cycles():
    core = ClockEvents(Clock())
    dev = VmiTimer(lambda: 0, 2_500_000)
    dev.register(core)
    assert (1_000_000 * dev.mult) >> dev.shift == 2_500_000


def test_config_skips_devices_without_oneshot():
    core = ClockEvents(Clock())
    dev = FakeDev(features=CEFeature.PERIODIC)
    core.config(dev, 1_000_000)
    assert (dev.mult, dev.shift, dev.min_delta_ns, dev.max_delta_ns) == (0, 0, 0, 0)


def test_register_picks_the_highest_rating_and_refuses_bad_devices():
    core = ClockEvents(Clock())
    low = FakeDev("low", rating=100)
    high = FakeDev("high", rating=300)
    core.config_and_register(low, 10**9, 1, 10**6)
    core.config_and_register(high, 10**9, 1, 10**6)
    assert core.active is high
    with pytest.raises(ValueError, match="twice"):
        core.register(high)
    with pytest.raises(ValueError, match="neither"):
        core.register(FakeDev("none", features=CEFeature(0)))
    with pytest.raises(ValueError, match="mult"):
        core.register(FakeDev("nomult"))  # relative oneshot, never configured
    core.register(FakeDev("ktime", features=CEFeature.ONESHOT | CEFeature.KTIME, rating=1))


# ---------------------------------------------------------------------- program_event


def test_program_event_converts_the_delta_with_mult_shift():
    core, dev, clock = configured(freq=62_500_000, min_ticks=0xF, max_ticks=0x7FFF_FFFF)
    assert run(core.program_event(dev, clock.now + 1_000_000, force=False)) == 0
    assert dev.calls == [("next", 62_500)]
    assert dev.next_event == clock.now + 1_000_000
    assert dev.programs == 1


def test_program_event_clamps_to_min_and_max():
    core, dev, clock = configured(freq=1_000_000_000, min_ticks=2_000, max_ticks=50_000)
    assert (dev.min_delta_ns, dev.max_delta_ns) == (2_000, 50_000)
    run(core.program_event(dev, clock.now + 10, force=False))
    run(core.program_event(dev, clock.now + 10**9, force=False))
    run(core.program_event(dev, clock.now + 30_000, force=False))
    assert dev.calls == [("next", 2_000), ("next", 50_000), ("next", 30_000)]
    # next_event is the requested expiry, not the clamped one (Linux)
    assert dev.next_event == clock.now + 30_000


@given(delta=st.integers(1, 10**10), min_ticks=st.integers(1, 10**5), span=st.integers(0, 10**7))
@settings(max_examples=200)
def test_program_event_ticks_always_within_the_device_range(delta, min_ticks, span):
    core, dev, clock = configured(freq=62_500_000, min_ticks=min_ticks, max_ticks=min_ticks + span)
    run(core.program_event(dev, clock.now + delta, force=False))
    ((_, ticks),) = dev.calls
    clamped = min(max(delta, dev.min_delta_ns), dev.max_delta_ns)
    clamped = max(clamped, dev.min_delta_ns)
    assert ticks == (clamped * dev.mult) >> dev.shift


@pytest.mark.parametrize("past", [0, 1, 10**6])
def test_past_expiry_without_force_is_etime(past):
    core, dev, clock = configured()
    assert run(core.program_event(dev, clock.now - past, force=False)) == -ETIME
    assert dev.calls == []
    assert core.etime == 1


def test_negative_expiry_is_etime_even_with_force():
    core, dev, _ = configured()
    assert run(core.program_event(dev, -1, force=True)) == -ETIME
    assert dev.calls == []
    assert core.etime == 1


def test_ktime_device_gets_the_absolute_expiry():
    clock = Clock()
    core = ClockEvents(clock)
    dev = FakeDev(features=CEFeature.ONESHOT | CEFeature.KTIME)
    core.register(dev)
    run(core.switch_state(dev, CEState.ONESHOT))
    # even a past one: the device decides (no delta, no preemption point)
    op = core.program_event(dev, clock.now - 5, force=False)
    assert run(op) == 0
    assert dev.calls[-1] == ("ktime", clock.now - 5)


def test_shutdown_device_is_not_programmed():
    core, dev, clock = configured()
    run(core.shutdown(dev))
    dev.calls.clear()
    assert run(core.program_event(dev, clock.now + 5_000, force=False)) == 0
    assert dev.calls == []
    assert dev.next_event == clock.now + 5_000


def test_force_with_a_past_expiry_programs_min_delta():
    core, dev, clock = configured(min_ticks=1_500)
    assert dev.min_delta_ns == 1_500
    assert run(core.program_event(dev, clock.now - 100, force=True)) == 0
    assert dev.calls == [("next", 1_500)]
    assert dev.next_event == clock.now + 1_500
    assert dev.retries == 1
    assert core.etime == 0


def test_force_after_a_driver_error_takes_the_min_delta_path():
    core, dev, clock = configured(min_ticks=1_000, fail=1)
    assert run(core.program_event(dev, clock.now + 50_000, force=True)) == 0
    assert dev.calls == [("next", 50_000), ("next", 1_000)]
    assert dev.retries == 1


def test_driver_error_without_force_is_returned():
    core, dev, clock = configured(fail=1)
    assert run(core.program_event(dev, clock.now + 50_000, force=False)) == -ETIME
    assert dev.retries == 0


def min_delta_model(min_delta: int, fail: int, jiffy: int) -> tuple[list[int], int, int]:
    """Linux clockevents_program_min_delta with MIN_ADJUST: the min_delta_ns of each try,
    the result and the final min_delta_ns."""
    tries: list[int] = []
    i = 0
    while True:
        tries.append(min_delta)
        if len(tries) > fail:
            return tries, 0, min_delta
        i += 1
        if i > 2:
            if min_delta >= jiffy:
                return tries, -ETIME, min_delta
            min_delta = 5000 if min_delta < 5000 else min_delta + (min_delta >> 1)
            min_delta = min(min_delta, jiffy)
            i = 0


@pytest.mark.parametrize("fail", [0, 1, 2, 3, 4, 5, 6, 9, 20, 10**6])
def test_min_delta_retry_raises_min_delta_after_three_failures(fail):
    core, dev, clock = configured(min_ticks=1_000, fail=fail)
    rc = run(core.program_event(dev, clock.now - 1, force=True))
    tries, want_rc, want_min = min_delta_model(1_000, fail, 1_000_000)
    assert [ticks for _, ticks in dev.calls] == tries  # 1 GHz: ticks == ns
    assert (rc, dev.min_delta_ns) == (want_rc, want_min)
    assert dev.retries == len(tries)
    if want_rc:
        assert dev.next_event == KTIME_MAX
        assert core.etime == 1
    else:
        assert dev.next_event == clock.now + want_min


def test_min_delta_raises_to_5000_then_by_half_up_to_one_jiffy():
    core, dev, clock = configured(min_ticks=1_000, fail=10**6)
    assert run(core.program_event(dev, clock.now, force=True)) == -ETIME
    levels = sorted({ticks for _, ticks in dev.calls})
    assert levels == [
        1_000, 5_000, 7_500, 11_250, 16_875, 25_312, 37_968, 56_952, 85_428, 128_142,
        192_213, 288_319, 432_478, 648_717, 973_075, 1_000_000,
    ]  # fmt: skip
    assert [ticks for _, ticks in dev.calls] == [t for t in levels for _ in range(3)]
    assert dev.min_delta_ns == 1_000_000


def test_min_delta_ceiling_is_one_jiffy_of_the_kernel_hz():
    core, dev, clock = configured(min_ticks=1_000, fail=10**6, hz=100)
    assert run(core.program_event(dev, clock.now, force=True)) == -ETIME
    assert dev.min_delta_ns == 10_000_000


def test_min_delta_on_a_shutdown_device_returns_at_once():
    core, dev, clock = configured(fail=10)
    run(core.shutdown(dev))
    dev.calls.clear()
    # program_event returns 0 for SHUTDOWN before the delta is looked at
    assert run(core.program_event(dev, clock.now - 1, force=True)) == 0
    assert dev.calls == []


# ---------------------------------------------------------------------- states


def test_switch_state_refuses_modes_the_device_lacks():
    core = ClockEvents(Clock())
    ktime = PvKtime()
    core.register(ktime)
    with pytest.raises(ValueError, match="periodic"):
        run(core.switch_state(ktime, CEState.PERIODIC))
    assert ktime.state is CEState.DETACHED
    periodic_only = FakeDev("tick", features=CEFeature.PERIODIC)
    core.register(periodic_only)
    with pytest.raises(ValueError, match="oneshot"):
        run(core.switch_state(periodic_only, CEState.ONESHOT))
    assert periodic_only.state is CEState.DETACHED
    assert periodic_only.calls == []
    run(core.switch_state(periodic_only, CEState.PERIODIC))
    assert periodic_only.calls == [("periodic", None)]
    assert periodic_only.state is CEState.PERIODIC


def test_switch_state_to_the_current_state_calls_nothing():
    core, dev, _ = configured()
    run(core.switch_state(dev, CEState.ONESHOT))
    assert dev.calls == []
    run(core.switch_state(dev, CEState.SHUTDOWN))
    run(core.switch_state(dev, CEState.ONESHOT_STOPPED))
    assert dev.calls == [("shutdown", None), ("shutdown", None)]


def test_exchange_shuts_the_old_device_down_and_activates_the_new():
    clock = Clock()
    core = ClockEvents(clock)
    old = FakeDev("old", rating=500)
    new = FakeDev("new", rating=100)
    core.config_and_register(old, 10**9, 1000, 10**9)
    run(core.switch_state(old, CEState.ONESHOT))
    run(core.program_event(old, clock.now + 10_000, force=False))
    new.min_delta_ticks, new.max_delta_ticks = 1000, 10**9
    core.config(new, 10**9)
    assert core.active is old
    run(core.exchange(new, CEState.ONESHOT))
    assert core.active is new
    assert new in core.devices
    assert old.calls[-1] == ("shutdown", None)
    assert old.state is CEState.DETACHED
    assert old.next_event == KTIME_MAX
    assert new.state is CEState.ONESHOT
    assert new.calls == [("oneshot", None)]


def test_exchange_at_run_time_through_the_host():
    """A booted pv-ktime vCPU switches to pv-delta: the old device's shutdown is one
    TIMER_SHUTDOWN hypercall, and from then on the hrtimers program the new device."""
    vm = InProcVm(1, "pv-ktime")
    k = vm.boot(0)
    ctx = vm.vcpus[0]
    expires = vm.ktime(0) + 1_000_000
    k.start_timer("t", expires, lambda now, exp: None)
    vm.run_op(0, k.reprogram())
    assert vm.pvtimer.armed == {0: expires}
    new = PvDelta()
    new.register(k.core)  # the driver configures itself (mult/shift) as it registers
    assert k.core.active is not new  # same rating: the first device stays active
    start = len(ctx.exits)
    vm.run_op(0, k.core.exchange(new, CEState.ONESHOT))
    assert ctx.exit_keys(start) == [("hypercall", Hypercall.VTICK_TIMER_SHUTDOWN, (0,))]
    assert vm.pvtimer.armed == {}
    assert k.core.active is new
    assert new.state is CEState.ONESHOT
    # The queue's next expiry must now be programmed on the active device (Linux's
    # hrtimer code programs tick_cpu_device.evtdev, which the exchange replaced), never
    # on the old one, which is detached and was just shut down.
    later = vm.ktime(0) + 2_000_000
    k.start_timer("u", later, lambda now, exp: None)
    start = len(ctx.exits)
    vm.run_op(0, k.reprogram())
    kinds = [key[1] for key in ctx.exit_keys(start)]
    assert kinds == [Hypercall.VTICK_SET_NEXT_DELTA], "the detached device was re-armed"
    # pv-delta arms the same host PV timer, now for the new (relative) programming
    assert list(vm.pvtimer.armed) == [0]


def test_exchange_to_an_unregistered_driver_lets_it_configure_itself():
    """exchange() accepts a device that is not registered yet; it must register it the
    way the driver does (``dev.register(core)``: PvDelta configures its 1:1 mult/shift
    there), not with the bare core.register that refuses an unconfigured device."""
    clock = Clock()
    core = ClockEvents(clock)
    old = PvKtime()
    old.register(core)
    new = PvDelta()
    answers = iter([0])  # the old device's TIMER_SHUTDOWN hypercall
    run_to_completion(core.exchange(new, CEState.ONESHOT), lambda item: _reply(next(answers)))
    assert core.active is new
    assert new.mult
    assert (1_000_000 * new.mult) >> new.shift == 1_000_000


def _reply(value: int) -> m.ExitReply:
    return m.ExitReply(re=0, value=value, fault=0, host_ns=0)
