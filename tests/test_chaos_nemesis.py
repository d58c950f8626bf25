"""The nemesis schedule is a pure function of (seed, parameters) and keeps its rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtick.host.chaos.nemesis import (
    FAULT_KINDS,
    HOST_TARGET,
    STOP_LENGTHS_NS,
    STOP_SHARE,
    FaultOp,
    NemesisParams,
    guest_plan,
    plan_faults,
)
from vtick.proto.catalog import PREEMPTION_POINTS
from vtick.proto.eventlog import LINK_DIRECTIONS, LINK_FAULTS

S = 1_000_000_000


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    params = NemesisParams(4, 2 * S)
    assert plan_faults(7, params) == plan_faults(7, params)
    assert plan_faults(7, params) != plan_faults(8, params)


@given(
    seed=st.integers(0, 10_000),
    vcpus=st.integers(1, 8),
    duration=st.integers(1 * S, 6 * S),
    kinds=st.sets(st.sampled_from(FAULT_KINDS), min_size=1),
)
def test_every_schedule_keeps_the_rules(
    seed: int, vcpus: int, duration: int, kinds: set[str]
) -> None:
    params = NemesisParams(vcpus, duration, tuple(sorted(kinds)))
    ops = plan_faults(seed, params)
    lo, hi = params.warmup_ns, duration - params.tail_ns
    # every kind asked for happens, nothing else does
    assert {op.kind for op in ops} == kinds
    assert [op.id for op in ops] == list(range(1, len(ops) + 1))
    assert [op.start_ns for op in ops] == sorted(op.start_ns for op in ops)
    signalled = [op for op in ops if op.kind in ("stop", "host-stop", "crash")]
    for op in signalled:  # inside the active part of the run
        assert lo <= op.start_ns <= op.end_ns <= hi, op
        assert op.target == HOST_TARGET if op.kind == "host-stop" else 0 <= op.target < vcpus
    for a in signalled:  # a SIGCONT never ends another fault of the same process early
        for b in signalled:
            if a is not b and a.target == b.target:
                assert a.end_ns <= b.start_ns or b.end_ns <= a.start_ns, (a, b)
    stops = [op for op in ops if op.kind == "stop" and op.pattern == "rr"]
    assert sum(op.end_ns - op.start_ns for op in stops) <= STOP_SHARE * (hi - lo) + 1
    for op in stops:  # rr's log-spaced starvation lengths, or clipped by the end or budget
        assert 0 < op.end_ns - op.start_ns <= STOP_LENGTHS_NS[-1]
    for op in ops:
        if op.kind == "window":
            assert op.pattern in PREEMPTION_POINTS
            assert 8_000 <= op.end_ns - op.start_ns <= 8_192_000
        if op.kind == "link":
            assert op.pattern in LINK_FAULTS
            assert op.direction in LINK_DIRECTIONS
            assert 100 <= op.per_mille <= 500


def test_the_swizzle_stops_vcpus_one_by_one_and_resumes_them_in_another_order() -> None:
    for seed in range(50):
        ops = plan_faults(seed, NemesisParams(4, 3 * S, ("stop",)))
        swizzle = [op for op in ops if op.pattern == "swizzle"]
        if len(swizzle) == 3:
            break
    else:
        pytest.fail("no schedule in 50 seeds had a swizzle of 3 vCPUs")
    starts = [op.start_ns for op in swizzle]
    assert starts == sorted(starts)
    assert len(set(starts)) == 3
    assert len({op.target for op in swizzle}) == 3
    assert max(starts) < min(op.end_ns for op in swizzle)  # all stopped at once


def test_the_guest_plan_holds_only_that_vcpus_windows_and_link_faults() -> None:
    ops = [
        FaultOp(1, "window", 0, 10, 20, pattern=PREEMPTION_POINTS[0]),
        FaultOp(2, "window", 1, 30, 50, pattern=PREEMPTION_POINTS[1]),
        FaultOp(3, "link", 1, 100, 300, pattern="drop", direction="recv", per_mille=250),
        FaultOp(4, "stop", 1, 400, 500, pattern="rr"),
    ]
    plan = guest_plan(ops, 1)
    assert plan["windows"] == [{"at_ns": 30, "point": PREEMPTION_POINTS[1], "length_ns": 20}]
    assert plan["link"] == [
        {"start_ns": 100, "end_ns": 300, "fault": "drop", "direction": "recv",
         "per_mille": 250, "delay_ns": 0}
    ]  # fmt: skip


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        NemesisParams(2, 2 * S, ("nap",))
    with pytest.raises(ValueError, match="too short"):
        NemesisParams(2, S // 2)
