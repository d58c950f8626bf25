"""kvmclock as the host publishes it and the guest reads it; host time for a guest expiry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtick.proto import codec
from vtick.proto import messages as m
from vtick.proto.pvclock import (
    PVCLOCK_COUNTS_FROM_ZERO,
    PVCLOCK_TSC_STABLE_BIT,
    PvclockInfo,
    TscModel,
)

SLOW_KHZ = st.integers(1_000, 99_999)  # 1 MHz .. 100 MHz: one TSC tick is 10..1000 ns
FAST_KHZ = st.integers(100_000, 5_000_000)  # 100 MHz .. 5 GHz


@st.composite
def published(draw, khz=FAST_KHZ | SLOW_KHZ):
    """(model, info, publish host ns) with arbitrary epochs, published some time after boot."""
    tsc_khz = draw(khz)
    tsc_epoch = draw(st.integers(0, 10**13))
    ktime_epoch = tsc_epoch + draw(st.integers(0, 10**10))
    pub = ktime_epoch + draw(st.integers(0, 10**12))
    model = TscModel(tsc_khz, tsc_epoch, ktime_epoch)
    return model, model.publish(pub, version=draw(st.integers(0, 2**31).map(lambda v: 2 * v))), pub


def tick_ns(model: TscModel) -> int:
    """Host ns per guest TSC tick, rounded up."""
    return -(-1_000_000 // model.tsc_khz)


def test_publish_fields():
    """publish() carries the version, the TSC and ktime at that instant, KVM's scale and flags."""
    model = TscModel(tsc_khz=2_500_000, tsc_epoch=1_000, ktime_epoch=5_000)
    info = model.publish(1_000_005_000, version=4)
    assert info == PvclockInfo(
        version=4,
        tsc_timestamp=2_500_010_000,
        system_time=1_000_000_000,
        tsc_to_system_mul=0xCCCCCCCC,
        tsc_shift=-1,
        flags=PVCLOCK_TSC_STABLE_BIT | PVCLOCK_COUNTS_FROM_ZERO,
    )
    assert PvclockInfo.from_wire(info.to_wire()) == info
    # the wire form is a valid pvclock message
    wire = codec.encode(m.Pvclock(info=info.to_wire()), 1, 0)
    assert PvclockInfo.from_wire(codec.decode(wire).msg.info) == info


@settings(max_examples=300)
@given(p=published(), elapsed=st.integers(0, 1_000_000))
def test_ktime_tracks_host_time_after_publish(p, elapsed):
    """Right after publish the guest's ktime equals host time since ktime_epoch.

    Exact at the publication instant; within one TSC tick (the TSC is host time rounded
    down to ticks) plus 2 ns of mul rounding during the following millisecond.
    """
    model, info, pub = p
    assert info.ktime(model.tsc(pub)) == pub - model.ktime_epoch
    t = pub + elapsed
    err = info.ktime(model.tsc(t)) - (t - model.ktime_epoch)
    assert abs(err) <= tick_ns(model) + 2, err
    if model.tsc_khz >= 1_000_000:
        assert abs(err) <= 2  # a couple of ns at >= 1 GHz


@given(p=published(), a=st.integers(0, 10**10), b=st.integers(0, 10**10))
def test_ktime_monotonic_after_publish(p, a, b):
    """Guest ktime never goes backwards while host time moves forward from the publication."""
    model, info, pub = p
    lo, hi = sorted((a, b))
    assert info.ktime(model.tsc(pub + lo)) <= info.ktime(model.tsc(pub + hi))


def _check_earliest(model: TscModel, info: PvclockInfo, target: int) -> None:
    """host_ns_for_ktime(target) reaches target and the nanosecond before it does not."""
    t = model.host_ns_for_ktime(info, target)
    reached = info.ktime(model.tsc(t))
    assert reached >= target, f"t={t} reads {reached} < {target}: the timer would fire early"
    assert model.tsc(t - 1) >= info.tsc_timestamp, "walked back before the publication"
    before = info.ktime(model.tsc(t - 1))
    assert before < target, f"t-1={t - 1} already reads {before} >= {target}: not the earliest"


@settings(max_examples=300)
@given(p=published(khz=FAST_KHZ), offset=st.integers(1, 10**12))
def test_host_ns_for_ktime_earliest_fast_tsc(p, offset):
    """At 100 MHz..5 GHz the host time for a guest expiry is the earliest one that reaches it."""
    model, info, _ = p
    _check_earliest(model, info, info.system_time + offset)


@settings(max_examples=300)
@given(p=published(khz=SLOW_KHZ), offset=st.integers(1, 10**12))
def test_host_ns_for_ktime_earliest_slow_tsc(p, offset):
    """Same contract when one TSC tick spans many ns (1..100 MHz): never early, never late."""
    model, info, _ = p
    _check_earliest(model, info, info.system_time + offset)


@pytest.mark.parametrize(
    ("target", "expected"),
    [(1, 1000), (500, 1000), (999, 1000), (1000, 1000), (1001, 2000), (5_000_001, 5_001_000)],
)
def test_host_ns_for_ktime_1mhz_exact(target, expected):
    """1 MHz TSC, published at 0: ktime(t) = t rounded down to us, so the answer is the next us."""
    model = TscModel(tsc_khz=1000, tsc_epoch=0, ktime_epoch=0)
    info = model.publish(0, version=2)
    assert [info.ktime(model.tsc(t)) for t in (0, 999, 1000, 1999, 2000)] == [
        0,
        0,
        1000,
        1000,
        2000,
    ]
    assert model.host_ns_for_ktime(info, target) == expected


@given(p=published())
def test_host_ns_for_ktime_at_publication_point(p):
    """A target equal to system_time is reached at (or just before) the publication instant.

    The answer must stay where the guest can read through ``info`` (TSC >= tsc_timestamp);
    before it the unsigned delta wraps and ktime reads as ~2**64 ns.
    """
    model, info, pub = p
    t = model.host_ns_for_ktime(info, info.system_time)
    assert pub - tick_ns(model) <= t <= pub
    assert model.tsc(t) == info.tsc_timestamp
