"""Guest hrtimers: the queue against a reference model, and hrtimer_interrupt's rules."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vtick.guest.clockevents import KTIME_MAX, CEFeature, CEState, ClockEventDevice, ClockEvents
from vtick.guest.cpu import PreemptionPoint, run_to_completion
from vtick.guest.hrtimer import Expiry, HighResTimers, HrtimerQueue
from vtick.proto.abi import ETIME


def noop(now: int, expires: int) -> None:
    return None


# ---------------------------------------------------------------------- the queue


class RefQueue:
    """The obvious model: a dict, earliest (expiry, start order) first."""

    def __init__(self) -> None:
        self.armed: dict[int, tuple[int, int]] = {}
        self.order = 0

    def start(self, timer: int, expires: int) -> None:
        self.armed[timer] = (expires, self.order)
        self.order += 1

    def cancel(self, timer: int) -> bool:
        return self.armed.pop(timer, None) is not None

    def forward(self, timer: int, now: int, interval: int) -> int:
        """Linux hrtimer_forward: 0 if not yet expired, else whole intervals past now."""
        if timer not in self.armed or interval <= 0:
            return 0
        expires = self.armed[timer][0]
        delta = now - expires
        if delta < 0:
            return 0
        orun = 1
        if delta >= interval:
            orun = delta // interval
            expires += orun * interval
            if expires > now:  # pragma: no cover - cannot happen (floor division)
                self.start(timer, expires)
                return orun
            orun += 1
        self.start(timer, expires + interval)
        return orun

    def next_expiry(self) -> int | None:
        return min(self.armed.values())[0] if self.armed else None

    def pop_due(self, now: int) -> tuple[int, int] | None:
        if not self.armed:
            return None
        timer, (expires, _) = min(self.armed.items(), key=lambda kv: kv[1])
        if expires > now:
            return None
        del self.armed[timer]
        return timer, expires


timers = st.integers(0, 5)
times = st.integers(0, 2_000)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("start"), timers, times),
        st.tuples(st.just("cancel"), timers),
        st.tuples(st.just("forward"), timers, times, st.integers(-1, 300)),
        st.tuples(st.just("pop"), times),
        st.tuples(st.just("next")),
    ),
    max_size=80,
)


@settings(max_examples=400)
@given(ops)
def test_queue_matches_the_reference_model(program):
    q = HrtimerQueue()
    ref = RefQueue()
    for op in program:
        match op:
            case ("start", t, e):
                q.start(t, e, noop)
                ref.start(t, e)
            case ("cancel", t):
                assert q.cancel(t) == ref.cancel(t)
            case ("forward", t, now, interval):
                assert q.forward(t, now, interval) == ref.forward(t, now, interval)
            case ("pop", now):
                got = q.pop_due(now)
                want = ref.pop_due(now)
                assert (got[:2] if got else None) == want
            case ("next",):
                assert q.next_expiry() == ref.next_expiry()
        assert len(q) == len(ref.armed)
        for t in range(6):
            want_exp = ref.armed.get(t)
            assert q.expires(t) == (want_exp[0] if want_exp else None)


def test_forward_counts_overruns():
    q = HrtimerQueue()
    q.start("t", 1_000, noop)
    assert q.forward("t", 999, 100) == 0  # not expired yet
    assert q.expires("t") == 1_000
    assert q.forward("t", 1_000, 100) == 1  # expiry == now: one interval
    assert q.expires("t") == 1_100
    assert q.forward("t", 1_549, 100) == 5  # 1100 -> 1600, the first past 1549
    assert q.expires("t") == 1_600
    assert q.forward("t", 1_700, 100) == 2  # exactly on an interval boundary: past it
    assert q.expires("t") == 1_800
    assert q.forward("missing", 10**6, 100) == 0


def test_cancelled_and_restarted_timers_leave_no_stale_entry():
    q = HrtimerQueue()
    q.start("a", 100, noop)
    q.start("b", 200, noop)
    q.start("a", 300, noop)  # re-armed later: the 100 entry is stale
    assert q.cancel("b")
    assert not q.cancel("b")
    assert q.next_expiry() == 300
    assert q.pop_due(299) is None
    assert q.pop_due(300)[:2] == ("a", 300)
    assert q.next_expiry() is None
    assert len(q) == 0


def test_equal_expiries_run_in_start_order():
    q = HrtimerQueue()
    for name in "cab":
        q.start(name, 500, noop)
    assert [q.pop_due(500)[0] for _ in range(3)] == ["c", "a", "b"]


# ---------------------------------------------------------------------- hrtimer_interrupt


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


class KtimeDev(ClockEventDevice):
    """A KTIME device; ``refuse_past`` answers -ETIME for an expiry <= now (pv-future)."""

    def __init__(self, clock: Clock, refuse_past: bool = False) -> None:
        super().__init__("ktime", CEFeature.ONESHOT | CEFeature.KTIME, 500)
        self.clock = clock
        self.refuse_past = refuse_past
        self.programmed: list[int] = []

    def set_next_ktime(self, expires: int):
        if self.refuse_past and expires <= self.clock.now:
            return -ETIME
        self.programmed.append(expires)
        return 0
        yield  # pragma: no cover


def run(op) -> Any:
    def answer(item):
        assert isinstance(item, PreemptionPoint)

    return run_to_completion(op, answer)


def make(refuse_past: bool = False) -> tuple[HighResTimers, KtimeDev, Clock, list[Expiry]]:
    clock = Clock()
    core = ClockEvents(clock)
    dev = KtimeDev(clock, refuse_past)
    core.register(dev)
    run(core.switch_state(dev, CEState.ONESHOT))
    ran: list[Expiry] = []
    return HighResTimers(core, dev, ran.append), dev, clock, ran


def test_interrupt_with_nothing_due_counts_early_and_reprograms():
    hr, dev, clock, ran = make()
    hr.queue.start("t", 1_000, noop)
    run(hr.reprogram())
    assert dev.programmed == [1_000]
    clock.now = 999  # the device fired 1 ns early
    assert run(hr.interrupt()) == 0
    assert (hr.early, hr.interrupts, ran) == (1, 1, [])
    assert dev.programmed == [1_000, 1_000]  # programmed again for the same timer
    assert hr.programmed == 1_000
    clock.now = 1_000
    assert run(hr.interrupt()) == 1
    assert ran == [Expiry("t", 1_000, 1_000, programmed_at=999)]  # re-programmed at 999
    assert hr.early == 1
    assert hr.programmed == KTIME_MAX  # nothing left


def test_callbacks_rearm():
    hr, dev, clock, ran = make()
    hr.queue.start("tick", 100, lambda now, expires: expires + 100)
    run(hr.reprogram())
    for now in (100, 250, 300, 400):
        clock.now = now
        run(hr.interrupt())
    # at 250 the 200 expiry ran late; the 300 re-arm ran at 300, and so on
    assert [(e.expires, e.ran_at) for e in ran] == [(100, 100), (200, 250), (300, 300), (400, 400)]
    assert hr.queue.expires("tick") == 500
    assert dev.programmed == [100, 200, 300, 400, 500]


def test_late_interrupt_runs_every_due_timer_in_expiry_order():
    hr, dev, clock, ran = make()
    for i, e in enumerate((300, 100, 200, 900)):
        hr.queue.start(i, e, noop)
    run(hr.reprogram())
    clock.now = 500
    assert run(hr.interrupt()) == 3
    assert [(e.timer, e.lateness) for e in ran] == [(1, 400), (2, 300), (0, 200)]
    assert hr.programmed == 900


def test_etime_from_the_device_runs_the_due_timer_and_retries():
    hr, dev, clock, ran = make(refuse_past=True)
    hr.queue.start("a", 50, noop)
    hr.queue.start("b", 80, noop)
    hr.queue.start("c", 500, noop)
    clock.now = 100  # a and b are already due when the device is programmed
    run(hr.reprogram())
    assert hr.retries == 1
    assert [e.timer for e in ran] == ["a", "b"]
    assert dev.programmed == [500]
    assert hr.core.etime == 1


class SlowKtimeDev(KtimeDev):
    """Each programming takes ``cost`` ns of the vCPU's time (an exit slower than the
    timers' spacing), so the next timer is always due again when the answer comes."""

    def __init__(self, clock: Clock, cost: int) -> None:
        super().__init__(clock, refuse_past=True)
        self.cost = cost

    def set_next_ktime(self, expires: int):
        self.clock.now += self.cost
        return (yield from super().set_next_ktime(expires))


def test_an_etime_storm_ends_after_three_attempts_like_hrtimer_interrupt():
    """hrtimer_interrupt gives the -ETIME loop 3 attempts, then programs the device with
    force for now + the time it spent (at most 100 ms): the CPU gets to take its other
    interrupts.  A timer re-armed 10 ns ahead while each exit takes 50 ns used to keep the
    vCPU in this loop for ever (found by vtick chaos: 227 back-to-back hypercalls)."""
    clock = Clock()
    core = ClockEvents(clock)
    dev = SlowKtimeDev(clock, cost=50)
    core.register(dev)
    run(core.switch_state(dev, CEState.ONESHOT))
    hr = HighResTimers(core, dev)
    hr.queue.start("storm", 5, lambda now, expires: now + 10)
    clock.now = 10
    run(hr.reprogram())
    assert hr.retries == 3
    assert hr.hangs == 1
    assert dev.programmed, "the forced programming went through"
    assert dev.programmed[-1] > clock.now - 50  # in the future when it was programmed


@settings(max_examples=300)
@given(
    expiries=st.lists(st.integers(0, 5_000), min_size=1, max_size=12),
    period=st.integers(1, 3_000),
    steps=st.lists(st.integers(-2_000, 2_000), min_size=1, max_size=40),
)
def test_never_runs_a_callback_before_its_expiry(expiries, period, steps):
    """Device interrupts at arbitrary times (early or late relative to what was
    programmed): no callback ever runs before its expiry, every interrupt with nothing due
    is counted early, and the device is always left programmed for the earliest timer."""
    hr, dev, clock, ran = make()
    for i, e in enumerate(expiries):
        hr.queue.start(i, e, lambda now, expires: now + period)
    run(hr.reprogram())
    early = 0
    for step in steps:
        # the interrupt arrives ``step`` ns after (or before) the programmed expiry
        target = hr.programmed if hr.programmed != KTIME_MAX else clock.now
        clock.now = max(clock.now, target + step)
        nxt = hr.queue.next_expiry()
        due = nxt is not None and nxt <= clock.now
        before = len(ran)
        run(hr.interrupt())
        assert (len(ran) > before) == due
        early += not due
        assert all(e.ran_at >= e.expires for e in ran)
        assert all(e.ran_at == clock.now for e in ran[before:])
        assert hr.programmed == hr.queue.next_expiry()
        assert hr.queue.next_expiry() > clock.now
    assert hr.early == early
    assert len(hr.queue) == len(expiries)  # every timer re-armed
