"""Clock offset estimation between a vCPU machine and the host."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtick.guest.clocksync import ClockSample, estimate_offset


def test_minimum_round_trip_sample_wins():
    # host clock = local + 5 s; the second sample has the smallest round trip
    samples = [
        ClockSample(sent=1_000, host=5_000_000_000 + 1_900, received=3_000),
        ClockSample(sent=10_000, host=5_000_000_000 + 10_100, received=10_200),
        ClockSample(sent=20_000, host=5_000_000_000 + 20_700, received=21_000),
    ]
    off = estimate_offset(samples)
    assert off.rtt == 200
    assert off.ns == 5_000_000_000
    assert not off.same_domain


def test_same_machine_offset_is_exactly_zero():
    # one clock: the host's reading falls inside the round trip
    off = estimate_offset([ClockSample(sent=100, host=180, received=300)])
    assert off.ns == 0
    assert off.same_domain


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no clock samples"):
        estimate_offset([])


@given(
    offset=st.integers(-(10**15), 10**15),
    sends=st.lists(st.integers(0, 10**12), min_size=1, max_size=8),
    legs=st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 10**6)), min_size=8, max_size=8),
)
def test_estimate_is_within_half_the_best_round_trip(offset, sends, legs):
    samples = [
        ClockSample(sent=t, host=t + out + offset, received=t + out + back)
        for t, (out, back) in zip(sends, legs, strict=False)
    ]
    est = estimate_offset(samples)
    if est.same_domain:
        assert abs(offset) <= est.rtt + est.rtt // 2 + 1
    else:
        assert abs(est.ns - offset) <= est.rtt // 2 + 1
