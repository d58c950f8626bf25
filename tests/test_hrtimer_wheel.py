"""The hrtimer wheel against a reference model, across wheel geometries, plus its bench.

Tiny geometries (a few ns per tick, 2..8 buckets per level, 1..4 levels) make short
operation sequences reach every level, every cascade and the overflow heap; the default
geometry is exercised with expiries near ``2**63`` and beyond ``2**64``.  After every
operation the wheel's internal placement is checked against the theory of operation.
"""

from __future__ import annotations

import pytest
from hrtimer_model import Model
from hypothesis import given, settings
from hypothesis import strategies as st

from vtick.host.bench import wheel as bench_wheel
from vtick.host.hrtimer import HrtimerQueue

#: (tick_shift, level_bits, levels); None: the default geometry
GEOMETRIES = [(0, 1, 1), (0, 1, 3), (1, 2, 2), (2, 3, 3), (0, 2, 4), (3, 1, 2), None]


def make(geometry: tuple[int, int, int] | None) -> HrtimerQueue:
    if geometry is None:
        return HrtimerQueue()
    tick_shift, level_bits, levels = geometry
    return HrtimerQueue(tick_shift=tick_shift, level_bits=level_bits, levels=levels)


def check_placement(q: HrtimerQueue) -> None:
    """White box: every live timer is exactly where the module doc says it is."""
    ts, lb, cursor = q._tick_shift, q._level_bits, q._cursor
    epoch_bits = q._levels * lb
    live = q._timers
    seen = []
    stale_near = 0
    for entry in q._near:
        if live.get(entry[2]) is entry:
            assert entry[0] >> ts <= cursor
            seen.append(entry[2])
        else:
            stale_near += 1
    assert stale_near == q._near_stale
    stale_overflow = 0
    for entry in q._overflow:
        if live.get(entry[2]) is entry:
            tick = entry[0] >> ts
            assert tick > cursor
            assert (tick ^ cursor).bit_length() > epoch_bits
            seen.append(entry[2])
        else:
            stale_overflow += 1
    assert stale_overflow == q._overflow_stale
    for index, bucket in enumerate(q._buckets):
        level, slot = index >> lb, index & ((1 << lb) - 1)
        assert bool(bucket) == bool(q._occupied[level] >> slot & 1)
        for handle, entry in bucket.items():
            assert live[handle] is entry
            tick = entry[0] >> ts
            assert tick > cursor
            bits = (tick ^ cursor).bit_length()
            assert bits <= epoch_bits
            assert (bits - 1) // lb == level
            assert (tick >> (level * lb)) & ((1 << lb) - 1) == slot
            seen.append(handle)
    assert sorted(map(repr, seen)) == sorted(map(repr, live))  # each live timer once


HANDLES = st.sampled_from(["a", "b", "c", ("pvtimer", 0), ("lapic", 1), 7])
DELTAS = st.one_of(
    st.integers(-40, 300),  # past, now, near: single ticks and low levels
    st.integers(-(2**12), 2**12),
    st.integers(0, 2**40),  # upper levels of the tiny geometries, overflow too
    st.integers(2**62, 2**66),  # default geometry's top levels and its overflow
)
ABSOLUTE = st.one_of(
    st.integers(2**63 - 2**20, 2**63 + 2**20),  # around int64 max (ktime_t)
    st.integers(2**64 - 2**10, 2**64 + 2**10),  # the default wheel's reach
    st.integers(-(2**63), -1),  # negative: always in the past
)
ADVANCES = st.one_of(st.integers(0, 64), st.integers(0, 2**14), st.integers(0, 2**66))
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("arm"), HANDLES, DELTAS),
        st.tuples(st.just("arm_at"), HANDLES, ABSOLUTE),
        st.tuples(st.just("cancel"), HANDLES, st.none()),
        st.tuples(st.just("expire"), st.none(), ADVANCES),
        st.tuples(st.just("loop"), st.none(), st.none()),  # expire(next_expiry())
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(geometry=st.sampled_from(GEOMETRIES), start=st.integers(0, 2**63), ops=OPS)
def test_wheel_matches_reference_model(geometry, start, ops):
    """Fired handles and their order, next_expiry, len and expiry always match the model.

    ``loop`` is the host's timer loop: sleep until next_expiry, then expire at exactly
    that time; everything it fires must have exactly that expiry (never early, never late).
    """
    q, model = make(geometry), Model()
    now = start
    for op, handle, arg in ops:
        if op == "arm":
            q.arm(handle, now + arg)
            model.arm(handle, now + arg)
        elif op == "arm_at":
            q.arm(handle, arg)
            model.arm(handle, arg)
        elif op == "cancel":
            assert q.cancel(handle) == model.cancel(handle)
        elif op == "expire":
            now += arg
            assert q.expire(now) == model.expire(now)
        else:
            nxt = q.next_expiry()
            if nxt is not None and nxt >= now:
                now = nxt
                due = {h: e for h, (e, _) in model.armed.items() if e <= now}
                fired = model.expire(now)
                assert fired
                assert all(due[h] == now for h in fired)
                assert q.expire(now) == fired
        assert q.next_expiry() == model.next_expiry()
        assert len(q) == len(model.armed)
        for h in ("a", "c", 7):
            assert q.expiry(h) == (model.armed[h][0] if h in model.armed else None)
        check_placement(q)
    now = max([now, *(e for e, _ in model.armed.values())])
    assert q.expire(now) == model.expire(now)
    assert q.next_expiry() is None
    assert len(q) == 0
    check_placement(q)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("start", [0, 5, 2**40 - 3])
def test_every_expiry_across_cascade_boundaries_fires_exactly_on_time(geometry, start):
    """Timers at every ns around bucket and level boundaries; the clock steps 1 ns at a time.

    With a tiny geometry the span covers every level's boundaries and the overflow heap
    (the epoch is at most 2**12 ns); nothing fires a nanosecond early or late.
    """
    q = make(geometry)
    q.expire(start - 21)  # the cursor follows the clock up to here
    span = 600
    for e in range(start + span, start - 21, -1):  # armed latest first: FIFO must not matter
        q.arm(e, e)
    q.arm("tie-1", start + 256)
    q.arm("tie-2", start + 256)
    check_placement(q)
    for now in range(start - 20, start + span + 1):
        fired = q.expire(now)
        if now == start + 256:
            assert fired == [now, "tie-1", "tie-2"]
        else:
            assert fired == [now]
        assert q.next_expiry() == (now + 1 if now < start + span else None)
        check_placement(q)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_next_expiry_driven_loop_is_exact(geometry):
    """The event loop sleeps until next_expiry and expires then: each fires at its expiry."""
    q = make(geometry)
    expiries = {h: 1000 + (h * 7919) % 37 * 131 for h in range(300)}  # many ties
    for h, e in expiries.items():
        q.arm(h, e)
    for h in range(0, 300, 3):
        q.cancel(h)
    for h in range(1, 300, 3):
        expiries[h] += 333
        q.arm(h, expiries[h])  # re-armed: moves to its new expiry
    want = sorted((e, h) for h, e in expiries.items() if h % 3)
    got = []
    while (nxt := q.next_expiry()) is not None:
        got += [(nxt, h) for h in q.expire(nxt)]
        check_placement(q)
    # by expiry; ties by arming order (re-armed ones armed last)
    assert [e for e, _ in got] == [e for e, _ in want]
    assert sorted(got) == want
    for (e1, h1), (e2, h2) in zip(got, got[1:], strict=False):
        if e1 == e2:
            assert (h1 % 3 == 1, h1) < (h2 % 3 == 1, h2)


def test_huge_and_far_future_expiries_default_geometry():
    """Near int64 max, beyond the wheel's 2**64 ns reach (overflow heap), and negative."""
    q = HrtimerQueue()
    big = 2**63 - 1
    q.arm("max", big)
    q.arm("max-1", big - 1)
    q.arm("far", 2**64 + 5)
    q.arm("farther", 2**70)
    q.arm("neg", -5)
    q.arm("soon", 1_000_000)
    check_placement(q)
    assert q.next_expiry() == -5
    assert q.expire(1_000_000) == ["neg", "soon"]
    assert q.next_expiry() == big - 1
    check_placement(q)
    assert q.expire(big - 2) == []
    assert q.expire(big) == ["max-1", "max"]
    assert q.next_expiry() == 2**64 + 5
    assert q.expire(2**64 + 4) == []
    check_placement(q)
    assert q.expire(2**64 + 5) == ["far"]
    q.arm("back", 2**64 + 6)  # armed after the cursor moved into the far epoch
    assert q.next_expiry() == 2**64 + 6
    assert q.expire(2**71) == ["back", "farther"]
    assert len(q) == 0
    check_placement(q)


def test_far_timer_cancel_and_rearm_in_overflow():
    """Cancelled and re-armed overflow timers never fire; live ones keep FIFO order."""
    q = HrtimerQueue(tick_shift=0, level_bits=2, levels=2)  # epoch: 16 ns
    for h in range(100):
        q.arm(h, 1000 + h % 10)
    for h in range(0, 100, 2):
        q.cancel(h)
    q.arm(1, 5000)
    check_placement(q)
    assert len(q._overflow) <= 2 * len(q) + 64  # stale entries get compacted
    got = q.expire(1009)
    assert got == sorted((h for h in range(3, 100, 2)), key=lambda h: (h % 10, h))
    assert q.expire(4999) == []
    assert q.expire(5000) == [1]


def test_rearm_churn_in_near_heap_stays_bounded():
    """Re-arming a timer that is already in the near heap leaves stale entries: compacted."""
    q = HrtimerQueue()
    q.arm("x", 10)
    q.expire(0)
    for i in range(10_000):
        q.arm("x", i % 50)  # all in the past or the current tick
        q.arm("y", 7)
    assert len(q._near) < 200
    check_placement(q)
    assert q.expire(100) == ["y", "x"]


def test_geometry_is_validated():
    with pytest.raises(ValueError, match="tick_shift"):
        HrtimerQueue(tick_shift=-1)
    with pytest.raises(ValueError, match="level_bits"):
        HrtimerQueue(level_bits=0)
    with pytest.raises(ValueError, match="levels"):
        HrtimerQueue(levels=0)


# ---------------------------------------------------------------------- the bench


def test_bench_runs_and_verifies(capsys):
    assert bench_wheel.run_wheel_bench(timers=3000, seed=3, rounds=1) == 0
    out = capsys.readouterr().out
    assert "hrtimer wheel" in out
    assert "heapq lazy deletion" in out
    assert "ratio" in out
    assert "verified: every queue fired the same" in out


def test_watchdog_shape_fires_every_timer_once_at_its_last_expiry(capsys):
    w = bench_wheel.make_watchdog_workload(200, seed=5)
    assert len(w.times) == 200 * (bench_wheel.REARMS + 1)
    assert sorted(w.expected_handles) == list(range(200))
    assert list(w.times) == sorted(w.times)
    assert bench_wheel.run_wheel_bench(timers=200, seed=5, rounds=1, shape="watchdog") == 0
    out = capsys.readouterr().out
    assert "heapq + compaction" in out
    assert "verified: every queue fired the same 200" in out


def test_compacting_heap_bounds_its_stale_entries():
    q = bench_wheel.HeapTimerQueue(compact=True)
    for i in range(1000):
        q.arm("one", 10**9 + i)  # every re-arm leaves a stale entry behind
    assert q.peak <= 64 + 2
    assert q.expire(2 * 10**9) == ["one"]


def test_bench_fails_loudly_when_a_queue_is_wrong(monkeypatch):
    class IgnoresCancel(HrtimerQueue):
        def cancel(self, handle):
            return self.expiry(handle) is not None  # says yes, but the timer stays armed

    monkeypatch.setattr(bench_wheel, "HrtimerQueue", IgnoresCancel)
    with pytest.raises(AssertionError, match="hrtimer wheel"):
        bench_wheel.run_wheel_bench(timers=200, seed=1, rounds=1)


def test_bench_baseline_matches_model():
    """The heapq baseline obeys the same contract (so the comparison is like for like)."""
    w = bench_wheel.make_workload(2000, seed=5)
    _, _, fired, fired_at = bench_wheel.replay(bench_wheel.HeapTimerQueue(), w)
    bench_wheel._check("heapq", fired, fired_at, w)
    assert w.touched > 0
    assert w.cancelled > 0
