"""TimerStormWorkload: the guest timer storm as a pure state machine over guest ktime.

The workload only talks to the :class:`~vtick.guest.workload.TimerKernel` surface, so it
is driven here over a bare :class:`HrtimerQueue`; the device side (programming, early
device events, -ETIME retries) is ``HighResTimers``' job and is tested in
``test_guest_hrtimer.py``.
"""

from __future__ import annotations

from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtick.guest.hrtimer import HrtimerCallback, HrtimerQueue
from vtick.guest.workload import TimerStormWorkload

Ran = tuple[Hashable, int, int]  # (timer, expiry, lateness)


class QueueKernel:
    """The TimerKernel calls a timer workload makes, over one hrtimer queue."""

    def __init__(self) -> None:
        self.queue = HrtimerQueue()

    def start_timer(self, timer: Hashable, expires: int, callback: HrtimerCallback) -> None:
        self.queue.start(timer, expires, callback)

    def cancel_timer(self, timer: Hashable) -> bool:
        return self.queue.cancel(timer)

    def start_tick(self) -> None:
        pass

    def armed(self) -> dict[Hashable, int]:
        return {t: e for t, (e, _, _) in self.queue._armed.items()}

    def interrupt(self, now: int) -> list[Ran]:
        """Run every timer due at ``now`` in expiry order, restarting those that ask."""
        ran: list[Ran] = []
        while (item := self.queue.pop_due(now)) is not None:
            timer, expires, callback = item
            ran.append((timer, expires, now - expires))
            again = callback(now, expires)
            if again is not None:
                self.queue.start(timer, again, callback)
        return ran


def storm(seed: int, **kwargs: int) -> tuple[QueueKernel, TimerStormWorkload]:
    kernel = QueueKernel()
    return kernel, TimerStormWorkload(kernel, seed, **kwargs)


def drive(seed: int, start: int, gaps: list[int]) -> list[list[Ran]]:
    kernel, work = storm(seed, churn_pct=50)
    work.start(start)
    now, out = start, []
    for gap in gaps:
        now += gap
        work.between_interrupts(now)
        out.append(kernel.interrupt(now))
    return out


def test_deterministic_with_a_seed():
    """The same seed gives the same expiries and results; a different seed differs."""
    gaps = [50_000, 300_000, 1_000_000, 10, 2_000_000] * 20
    one = drive(7, 1_000, gaps)
    assert one == drive(7, 1_000, gaps)
    assert one != drive(8, 1_000, gaps)
    assert sum(map(len, one)) > 0


def test_start_arms_every_timer_in_range():
    """start() arms each of the N timers once, at [now + min_ns, now + max_ns)."""
    kernel, work = storm(1, timers=50, min_ns=1_000, max_ns=2_000)
    work.start(10**9)
    armed = kernel.armed()
    assert sorted(i for _, i in armed) == list(range(50))
    assert all(10**9 + 1_000 <= e < 10**9 + 2_000 for e in armed.values())


def test_interrupt_runs_every_due_timer_in_expiry_order():
    """A late interrupt runs all timers that are due, earliest first, with lateness now - expiry."""
    kernel, work = storm(5, timers=8, min_ns=100, max_ns=1_000)
    work.start(0)
    expiries = sorted(kernel.queue._heap)
    now = 10_000  # every timer is due
    ran = kernel.interrupt(now)
    assert [(timer, expiry) for timer, expiry, _ in ran] == [(t, e) for e, _, t in expiries]
    assert [lateness for _, _, lateness in ran] == [now - e for e, _, _ in expiries]
    assert work.events == 8


@settings(max_examples=200)
@given(
    seed=st.integers(0, 2**64 - 1),
    timers=st.integers(1, 16),
    min_ns=st.integers(1, 10_000),
    span=st.integers(1, 100_000),
    churn_pct=st.integers(0, 100),
    start=st.integers(0, 10**12),
    gaps=st.lists(st.integers(0, 150_000), max_size=60),
)
def test_invariants_under_random_interrupts(seed, timers, min_ns, span, churn_pct, start, gaps):
    """Never early (lateness >= 0); due timers run once and re-arm in [now+min, now+max);
    churn touches at most one timer per gap and keeps it in range; the timer set is
    preserved and the counters add up."""
    max_ns = min_ns + span
    kernel, work = storm(seed, timers=timers, min_ns=min_ns, max_ns=max_ns, churn_pct=churn_pct)
    work.start(start)
    everyone = {("storm", i) for i in range(timers)}
    now = start
    events = 0
    for gap in gaps:
        now += gap
        before = kernel.armed()
        churned = work.cancelled + work.rearmed
        work.between_interrupts(now)
        changed = {t for t, e in kernel.armed().items() if e != before[t]}
        assert len(changed) <= work.cancelled + work.rearmed - churned <= 1
        for t in changed:
            assert now + min_ns <= kernel.armed()[t] < now + max_ns
        before = kernel.armed()
        due = {t for t, e in before.items() if e <= now}
        ran = kernel.interrupt(now)
        assert {t for t, _, _ in ran} == due
        assert len(ran) == len(due)
        for t, expiry, lateness in ran:
            assert lateness >= 0
            assert expiry == before[t]
        after = kernel.armed()
        assert set(after) == everyone
        for t, e in after.items():
            if t in due:
                assert now + min_ns <= e < now + max_ns
            else:
                assert e == before[t] > now
        events += len(ran)
    assert work.events == events


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timers": 0},
        {"min_ns": 0},
        {"min_ns": 5, "max_ns": 5},
        {"min_ns": 6, "max_ns": 5},
        {"churn_pct": -1},
        {"churn_pct": 101},
    ],
)
def test_invalid_parameters(kwargs):
    """Zero timers, an empty/negative delay range or a churn outside 0..100 % is refused."""
    with pytest.raises(ValueError, match="timers|min_ns"):
        storm(0, **kwargs)
