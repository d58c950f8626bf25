"""HrtimerQueue against a plain reference model under random arm/cancel/re-arm/expire sequences."""

from __future__ import annotations

import pytest
from hrtimer_model import Model
from hypothesis import given, settings
from hypothesis import strategies as st

from vtick.host.hrtimer import HrtimerQueue

HANDLES = st.sampled_from(["a", "b", "c", ("pvtimer", 0), ("pvtimer", 1), 7])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("arm"), HANDLES, st.integers(0, 60)),
        st.tuples(st.just("cancel"), HANDLES, st.none()),
        st.tuples(st.just("expire"), st.none(), st.integers(0, 15)),
    ),
    max_size=60,
)


#: wheel geometries (tick_shift, level_bits, levels): ns-wide ticks put these small
#: expiries on every level and past the top one; None is the default geometry
GEOMETRIES = [None, (0, 1, 3), (0, 2, 2), (1, 1, 4)]


@pytest.mark.parametrize("geometry", GEOMETRIES)
@settings(max_examples=200)
@given(ops=OPS)
def test_matches_reference_model(geometry, ops):
    """Same fired handles, same order (expiry, then arming order), same next_expiry, always.

    Expiries are relative to a clock that only moves forward; a timer armed in the past
    fires at the next expire.  Also checks directly: nothing fires before its expiry, a
    timer fires at most once per arming, and a cancelled timer never fires.
    """
    if geometry is None:
        q = HrtimerQueue()
    else:
        tick_shift, level_bits, levels = geometry
        q = HrtimerQueue(tick_shift=tick_shift, level_bits=level_bits, levels=levels)
    model = Model()
    now = 0
    armed_at: dict = {}  # handle -> expiry of its live arming
    for op, handle, arg in ops:
        if op == "arm":
            q.arm(handle, now + arg - 10)  # some expiries are already in the past
            model.arm(handle, now + arg - 10)
            armed_at[handle] = now + arg - 10
        elif op == "cancel":
            assert q.cancel(handle) == model.cancel(handle)
            armed_at.pop(handle, None)
        else:
            now += arg
            fired = q.expire(now)
            assert fired == model.expire(now)
            for h in fired:
                assert armed_at.pop(h) <= now  # armed, not cancelled, due; popped: once only
        assert q.next_expiry() == model.next_expiry()
        assert len(q) == len(model.armed)
        for h in {"a", "b", 7}:
            assert q.expiry(h) == (model.armed[h][0] if h in model.armed else None)
    now += 1000
    assert q.expire(now) == model.expire(now)
    assert q.next_expiry() is None
    assert len(q) == 0


def test_equal_expiries_fire_in_arming_order():
    """Ties fire FIFO by arming order; re-arming moves a timer to the back of its tie."""
    q = HrtimerQueue()
    for h in ("x", "y", "z"):
        q.arm(h, 100)
    q.arm("x", 100)  # re-armed last
    q.arm("w", 50)
    assert q.expire(99) == ["w"]
    assert q.expire(100) == ["y", "z", "x"]


def test_rearm_replaces_and_cancel_disarms():
    """Re-arming replaces the old expiry (no early stale fire); a cancelled timer never fires."""
    q = HrtimerQueue()
    q.arm("t", 10)
    q.arm("t", 30)
    assert q.next_expiry() == 30
    assert q.expire(29) == []
    q.arm("c", 5)
    assert q.cancel("c")
    assert not q.cancel("c")
    assert q.next_expiry() == 30
    assert q.expire(30) == ["t"]
    assert q.expire(10**9) == []
    q.arm("t", 1)  # re-arm after firing works
    assert q.expire(1) == ["t"]


def test_fires_at_exact_expiry_not_before():
    """A timer is due at now == expiry and not one nanosecond earlier."""
    q = HrtimerQueue()
    q.arm("t", 1_000_000_007)
    assert q.expire(1_000_000_006) == []
    assert q.expire(1_000_000_007) == ["t"]


@pytest.mark.parametrize("level", range(8))
def test_default_wheel_level_boundaries_fire_exactly(level):
    """Around each default level's bucket edges (2**16 ns ticks, 64 buckets a level).

    Timers a nanosecond either side of a bucket edge and of the edge of the level above
    cascade at different times but fire in exact order, each at its own nanosecond.
    """
    q = HrtimerQueue()
    base = 1_700_000_000_000_000_000  # a plausible CLOCK_MONOTONIC-like origin
    q.expire(base)
    width = 1 << (16 + 6 * level)  # a bucket of this level
    edge = (base // width + 2) * width
    upper = (base // (width * 64) + 1) * width * 64  # the next bucket edge one level up
    expiries = sorted({e + d for e in (edge, upper) for d in (-1, 0, 1)})
    for e in reversed(expiries):
        q.arm(e, e)
    q.arm("tie", edge)
    for e in expiries:
        assert q.next_expiry() == e
        assert q.expire(e - 1) == []
        assert q.expire(e) == ([e, "tie"] if e == edge else [e])
    assert q.next_expiry() is None
