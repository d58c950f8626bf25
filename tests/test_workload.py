"""TimerStorm: the guest workload as a pure state machine over guest ktime."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtick.guest.workload import Expired, TimerStorm


def drive(storm: TimerStorm, start: int, interrupts: list[int]) -> list[list[Expired]]:
    storm.start(start)
    now, out = start, []
    for gap in interrupts:
        now += gap
        out.append(storm.on_interrupt(now))
    return out


def test_deterministic_with_a_seed():
    """The same seed gives the same expiries and results; a different seed differs."""
    gaps = [50_000, 300_000, 1_000_000, 10, 2_000_000] * 20
    one = drive(TimerStorm(seed=7), 1_000, gaps)
    two = drive(TimerStorm(seed=7), 1_000, gaps)
    other = drive(TimerStorm(seed=8), 1_000, gaps)
    assert one == two
    assert one != other
    assert sum(map(len, one)) > 0


def test_start_arms_every_timer_in_range():
    """start() arms each of the N timers once, at [now + min_ns, now + max_ns)."""
    storm = TimerStorm(seed=1, timers=50, min_ns=1_000, max_ns=2_000)
    storm.start(10**9)
    expiries = sorted(storm._queue)
    assert sorted(t for _, t in expiries) == list(range(50))
    assert all(10**9 + 1_000 <= e < 10**9 + 2_000 for e, _ in expiries)
    assert storm.next_expiry() == expiries[0][0]


def test_early_interrupt_is_counted_and_runs_nothing():
    """An interrupt before the earliest expiry runs no callback and counts one early event."""
    storm = TimerStorm(seed=3, timers=4)
    storm.start(0)
    first = storm.next_expiry()
    assert storm.on_interrupt(first - 1) == []
    assert storm.on_interrupt(0) == []
    assert (storm.early, storm.events) == (2, 0)
    assert storm.next_expiry() == first  # nothing re-armed
    ran = storm.on_interrupt(first)
    assert len(ran) >= 1
    assert ran[0].lateness == 0
    assert (storm.early, storm.events) == (2, len(ran))


def test_interrupt_runs_every_due_timer_in_expiry_order():
    """A late interrupt runs all timers that are due, earliest first, with lateness now - expiry."""
    storm = TimerStorm(seed=5, timers=8, min_ns=100, max_ns=1_000)
    storm.start(0)
    expiries = sorted(storm._queue)
    now = 10_000  # every timer is due
    ran = storm.on_interrupt(now)
    assert [(r.expiry, r.timer) for r in ran] == expiries
    assert [r.lateness for r in ran] == [now - e for e, _ in expiries]


@settings(max_examples=200)
@given(
    seed=st.integers(0, 2**64 - 1),
    timers=st.integers(1, 16),
    min_ns=st.integers(1, 10_000),
    span=st.integers(1, 100_000),
    start=st.integers(0, 10**12),
    gaps=st.lists(st.integers(0, 150_000), max_size=60),
)
def test_invariants_under_random_interrupts(seed, timers, min_ns, span, start, gaps):
    """Never early (lateness >= 0); due timers run once and re-arm in [now+min, now+max);
    early events are exactly the interrupts with nothing due; the timer set is preserved."""
    max_ns = min_ns + span
    storm = TimerStorm(seed=seed, timers=timers, min_ns=min_ns, max_ns=max_ns)
    storm.start(start)
    now = start
    early = events = 0
    for gap in gaps:
        now += gap
        before = {t: e for e, t in storm._queue}
        due = {t for t, e in before.items() if e <= now}
        ran = storm.on_interrupt(now)
        assert {r.timer for r in ran} == due
        assert len(ran) == len(due)
        for r in ran:
            assert r.lateness >= 0
            assert r.lateness == now - r.expiry
            assert r.expiry == before[r.timer]
        after = {t: e for e, t in storm._queue}
        assert set(after) == set(range(timers))
        for t, e in after.items():
            if t in due:
                assert now + min_ns <= e < now + max_ns
            else:
                assert e == before[t] > now
        early += not ran
        events += len(ran)
        assert storm.next_expiry() == min(after.values())
    assert (storm.early, storm.events) == (early, events)


@pytest.mark.parametrize(
    "kwargs",
    [{"timers": 0}, {"min_ns": 0}, {"min_ns": 5, "max_ns": 5}, {"min_ns": 6, "max_ns": 5}],
)
def test_invalid_parameters(kwargs):
    """Zero timers or an empty/negative delay range is refused at construction."""
    with pytest.raises(ValueError, match="timers|min_ns"):
        TimerStorm(seed=0, **kwargs)
