"""The nemesis: a seeded schedule of faults, a pure function of (seed, run parameters).

Theory of operation
-------------------
:func:`plan_faults` draws every fault of one chaos run from ``random.Random(seed)``
before any process starts, so a failing run's schedule is reproduced by its seed (the
interleaving of real processes is not: the history records what really happened).  A
:class:`FaultOp` says what, on whom, from when to when; times are ns after the run's
start for the faults the orchestrator applies (``stop``, ``host-stop``, ``crash``), and
after the vCPU's workload start for those its vCPU process applies itself (``window``,
``link``), as those processes cannot know the run's start.  Every fault lies inside
``[warmup_ns, duration_ns - tail_ns]``, so boot is left alone and every stopped process
is running again before the run ends.

The fault kinds (``--faults``):

``stop``
    rr's chaos mode, as a SIGSTOP/SIGCONT nemesis (rr: "Deeper into chaos", 2016): at
    each decision point (every :data:`DECISION_NS`) with probability
    :data:`STOP_PROBABILITY` one victim vCPU is starved for a length drawn uniformly
    from 1, 2, 4 ... 2048 ms (short ones often enough to hit narrow windows, long ones
    for starvation), one victim at a time, the total capped at :data:`STOP_SHARE` of
    the active time.  Plus once per run the *swizzle* (FoundationDB's
    swizzle-clogging): up to three vCPUs stopped one by one, then resumed in a random
    order.
``host-stop``
    the host process stopped (every exit of every vCPU stalls), 1 .. 512 ms, at most
    two per run, capped at :data:`HOST_STOP_SHARE` of the active time.
``window``
    injected delays at the guest's named preemption points
    (``vtick.proto.catalog.PREEMPTION_POINTS``), 8 us .. 8 ms log-spaced, about
    :data:`WINDOWS_PER_S` per vCPU per second; each is taken by the first pass through
    its point after its time.
``crash``
    one vCPU process SIGKILLed and a new one started for the same vCPU after 20 ..
    200 ms: a new session on a reset vCPU.
``link``
    one to three windows per vCPU of 50 .. 300 ms in which the link fault shim
    (``proto/faultshim.py``) drops, duplicates, delays or reorders frames in one
    direction, or closes the pipe.

Faults of one vCPU that the orchestrator applies never overlap each other (a SIGCONT
must not end a second stop early, a crash must not meet a stop).  Every kind asked for
happens at least once, so coverage has a chance.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

from vtick.proto.catalog import PREEMPTION_POINTS
from vtick.proto.eventlog import LINK_DIRECTIONS, LINK_FAULTS

__all__ = [
    "FAULT_KINDS",
    "FaultOp",
    "NemesisParams",
    "plan_faults",
    "guest_plan",
    "HOST_TARGET",
]

FAULT_KINDS = ("stop", "host-stop", "window", "crash", "link")
#: the target of a host fault
HOST_TARGET = -1

MS = 1_000_000
DECISION_NS = 50 * MS
STOP_PROBABILITY = 0.3
#: rr chaos mode's cap on starvation: a share of the run
STOP_SHARE = 0.2
STOP_LENGTHS_NS = tuple((1 << k) * MS for k in range(12))  # 1 ms .. 2048 ms
HOST_STOP_LENGTHS_NS = tuple((1 << k) * MS for k in range(10))  # 1 ms .. 512 ms
HOST_STOP_SHARE = 0.1
WINDOW_LENGTHS_NS = tuple((1 << k) * 1000 for k in range(3, 14))  # 8 us .. 8 ms
WINDOWS_PER_S = 6
CRASH_RESTART_NS = (20 * MS, 200 * MS)
LINK_WINDOW_NS = (50 * MS, 300 * MS)
SWIZZLE_SPACING_NS = 20 * MS
SWIZZLE_HOLD_NS = (50 * MS, 200 * MS)


@dataclass(frozen=True, slots=True)
class FaultOp:
    """One fault.  ``target`` is a vCPU, or :data:`HOST_TARGET`.

    ``pattern``: stop: ``rr`` or ``swizzle``; window: the preemption point; link: the
    link fault (``drop``, ``duplicate``, ``delay``, ``reorder``, ``close``).
    """

    id: int
    kind: str
    target: int
    start_ns: int
    end_ns: int
    pattern: str = ""
    direction: str = ""
    per_mille: int = 0
    delay_ns: int = 0

    def as_dict(self) -> dict[str, int | str]:
        return {k: v for k, v in asdict(self).items() if v != "" or k == "pattern"}


@dataclass(frozen=True, slots=True)
class NemesisParams:
    vcpus: int
    duration_ns: int
    faults: tuple[str, ...] = FAULT_KINDS
    warmup_ns: int = 300 * MS
    tail_ns: int = 300 * MS

    def __post_init__(self) -> None:
        unknown = [f for f in self.faults if f not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind {unknown[0]!r}")
        if self.vcpus < 1 or self.duration_ns <= self.warmup_ns + self.tail_ns:
            raise ValueError("the run is too short for faults after warm-up and before the tail")


class _Busy:
    """Per-target intervals already taken by orchestrator faults."""

    def __init__(self) -> None:
        self.taken: dict[int, list[tuple[int, int]]] = {}

    def free(self, target: int, start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e in self.taken.get(target, []))

    def take(self, target: int, start: int, end: int) -> None:
        self.taken.setdefault(target, []).append((start, end))


def plan_faults(seed: int, params: NemesisParams) -> list[FaultOp]:
    """Every fault of one run, in start order (ids in that order too)."""
    rng = random.Random(f"vtick-nemesis-{seed}")
    lo, hi = params.warmup_ns, params.duration_ns - params.tail_ns
    active = hi - lo
    busy = _Busy()
    ops: list[tuple[str, int, int, int, dict[str, int | str]]] = []

    def add(kind: str, target: int, start: int, end: int, **detail: int | str) -> None:
        ops.append((kind, target, start, end, detail))

    if "crash" in params.faults:
        # first, so stops plan around it; late enough to crash a running workload, early
        # enough for the new process to boot and run before the end
        # (a new interpreter takes the best part of a second to start on a loaded machine)
        latest = max(lo + 1, hi - 1000 * MS)
        start = rng.randrange(lo, latest)
        end = min(start + rng.randrange(*CRASH_RESTART_NS), hi)
        target = rng.randrange(params.vcpus)
        busy.take(target, start, end)
        add("crash", target, start, end)
    if "stop" in params.faults:
        budget = int(STOP_SHARE * active)
        t = lo
        while t < hi:
            if rng.random() < STOP_PROBABILITY:
                length = min(rng.choice(STOP_LENGTHS_NS), hi - t, budget)
                victim = rng.randrange(params.vcpus)
                if length > 0 and busy.free(victim, t, t + length):
                    busy.take(victim, t, t + length)
                    add("stop", victim, t, t + length, pattern="rr")
                    budget -= length
                    t += length
            t += DECISION_NS
        if params.vcpus >= 2:
            victims = rng.sample(range(params.vcpus), min(3, params.vcpus))
            span = SWIZZLE_SPACING_NS * 2 * len(victims) + SWIZZLE_HOLD_NS[1]
            if active > span:
                start = rng.randrange(lo, hi - span)
                hold = rng.randrange(*SWIZZLE_HOLD_NS)
                resumed = rng.sample(victims, len(victims))
                last_stop = start + SWIZZLE_SPACING_NS * (len(victims) - 1)
                windows = [
                    (
                        v,
                        start + SWIZZLE_SPACING_NS * i,
                        last_stop + hold + SWIZZLE_SPACING_NS * resumed.index(v),
                    )
                    for i, v in enumerate(victims)
                ]
                if all(busy.free(v, s, e) for v, s, e in windows):
                    for v, s, e in windows:
                        busy.take(v, s, e)
                        add("stop", v, s, e, pattern="swizzle")
        if not any(op[0] == "stop" for op in ops):
            lengths = tuple(n for n in STOP_LENGTHS_NS if n <= int(STOP_SHARE * active))
            _force(rng, busy, params, add, "stop", lengths or STOP_LENGTHS_NS[:1], lo, hi)
    if "host-stop" in params.faults:
        budget = int(HOST_STOP_SHARE * active)
        for _ in range(rng.randrange(1, 3)):
            length = min(rng.choice(HOST_STOP_LENGTHS_NS), budget)
            start = rng.randrange(lo, hi - length)
            if length > 0 and busy.free(HOST_TARGET, start, start + length):
                busy.take(HOST_TARGET, start, start + length)
                add("host-stop", HOST_TARGET, start, start + length)
                budget -= length
    if "window" in params.faults:
        count = max(1, round(WINDOWS_PER_S * active / 1e9))
        for vcpu in range(params.vcpus):
            for _ in range(count):
                at = rng.randrange(0, active)
                length = rng.choice(WINDOW_LENGTHS_NS)
                add("window", vcpu, at, at + length, pattern=rng.choice(PREEMPTION_POINTS))
    if "link" in params.faults:
        for vcpu in range(params.vcpus):
            for _ in range(rng.randrange(1, 4)):
                length = rng.randrange(*LINK_WINDOW_NS)
                at = rng.randrange(0, max(1, active - length))
                fault = rng.choice(LINK_FAULTS)
                add(
                    "link", vcpu, at, at + length,
                    pattern=fault,
                    direction=rng.choice(LINK_DIRECTIONS),
                    per_mille=rng.randrange(100, 501),
                    delay_ns=rng.randrange(1, 21) * MS if fault in ("delay", "reorder") else 0,
                )  # fmt: skip
    ops.sort(key=lambda op: (op[2], op[0], op[1]))
    return [
        FaultOp(
            i + 1,
            kind,
            target,
            start,
            end,
            pattern=str(detail.get("pattern", "")),
            direction=str(detail.get("direction", "")),
            per_mille=int(detail.get("per_mille", 0)),
            delay_ns=int(detail.get("delay_ns", 0)),
        )  # fmt: skip
        for i, (kind, target, start, end, detail) in enumerate(ops)
    ]


def _force(
    rng: random.Random,
    busy: _Busy,
    params: NemesisParams,
    add: Callable[..., None],
    kind: str,
    lengths: tuple[int, ...],
    lo: int,
    hi: int,
) -> None:
    """One fault of ``kind`` where the draws gave none (coverage needs one): the first
    free place, from a random vCPU and time on, the length drawn, else 1 ms."""
    step = 10 * MS
    first_victim = rng.randrange(params.vcpus)
    first_start = rng.randrange(lo, hi)
    for length in (rng.choice(lengths), lengths[0]):
        for v in range(params.vcpus):
            victim = (first_victim + v) % params.vcpus
            for k in range((hi - lo) // step + 1):
                start = lo + (first_start - lo + k * step) % (hi - lo)
                end = min(start + length, hi)
                if end > start and busy.free(victim, start, end):
                    busy.take(victim, start, end)
                    add(kind, victim, start, end, pattern="rr")
                    return


def guest_plan(ops: list[FaultOp], vcpu: int) -> dict[str, list[dict[str, int | str]]]:
    """The part of the schedule vCPU ``vcpu``'s process applies itself (its plan's
    ``windows`` and ``link``; times after its workload start)."""
    windows: list[dict[str, int | str]] = [
        {"at_ns": op.start_ns, "point": op.pattern, "length_ns": op.end_ns - op.start_ns}
        for op in ops
        if op.kind == "window" and op.target == vcpu
    ]
    link: list[dict[str, int | str]] = [
        {
            "start_ns": op.start_ns,
            "end_ns": op.end_ns,
            "fault": op.pattern,
            "direction": op.direction,
            "per_mille": op.per_mille,
            "delay_ns": op.delay_ns,
        }
        for op in ops
        if op.kind == "link" and op.target == vcpu
    ]
    return {"windows": windows, "link": link}
