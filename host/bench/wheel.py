"""``vtick bench wheel``: the host hrtimer wheel against a heapq queue, on one workload.

The workload is the normal life of host hrtimers, generated once from ``seed`` and
replayed on both queues in the same run:

* ``timers`` timers, each with its own handle, armed at simulated times about 1 us apart
  (exponential gaps), each for a delay drawn log-uniformly from 1 us to 100 ms;
* half of them are touched before they expire, at a uniformly drawn moment before their
  expiry: half of those are cancelled, half re-armed for a fresh log-uniform delay;
* an exact event loop drives the queue as the host's timer loop does: ask
  ``next_expiry()``, then either perform the next arm/cancel/re-arm (if it comes first)
  or ``expire(next_expiry)``: time advances straight to each expiry.

Both queues must fire the same ``(handle, expiry)`` sequence, and that sequence must be
the one the workload implies (every surviving timer exactly once, exactly at its final
expiry, by expiry then arming order); anything else raises ``AssertionError``, whatever
the interpreter's ``-O``.  ``ops`` counts API calls (``arm``, ``cancel``,
``next_expiry``, ``expire``); the seconds include the replay loop itself, identical for
both queues, with the cyclic garbage collector paused while a queue is timed.  Each queue
replays the workload twice (by default), alternating with the other, and its faster
replay is shown: one replay each is at the mercy of a noisy neighbour.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import random
import time
from array import array
from collections.abc import Callable, Hashable
from typing import Protocol

from vtick.host.hrtimer import HrtimerQueue

__all__ = ["HeapTimerQueue", "Workload", "make_workload", "replay", "run_wheel_bench"]

MIN_DELAY_NS = 1_000  # 1 us
MAX_DELAY_NS = 100_000_000  # 100 ms
MEAN_GAP_NS = 1_000  # between successive new timers
START_NS = 1_000_000_000_000  # an arbitrary monotonic-clock origin (about 17 min of uptime)

ARM, CANCEL = 0, 1


class TimerQueue(Protocol):
    def arm(self, handle: Hashable, expiry: int) -> None: ...
    def cancel(self, handle: Hashable) -> bool: ...
    def next_expiry(self) -> int | None: ...
    def expire(self, now: int) -> list[Hashable]: ...
    def __len__(self) -> int: ...


class HeapTimerQueue:
    """The baseline: a binary heap with lazy deletion (as SimPy and trio keep theirs).

    Same API and semantics as :class:`~vtick.host.hrtimer.HrtimerQueue`.  Cancel and
    re-arm leave the old heap entry behind; it is skipped when it reaches the top.  With
    ``compact`` the heap is rebuilt from its live entries (one C ``heapify``) whenever
    stale entries outnumber live ones, which bounds its memory at about twice the armed
    timers for O(1) amortised extra work per operation.
    """

    def __init__(self, compact: bool = False) -> None:
        self._heap: list[tuple[int, int, Hashable]] = []
        self._armed: dict[Hashable, tuple[int, int, Hashable]] = {}
        self._order = itertools.count()
        self._limit = 64 if compact else -1
        #: the most entries the heap ever held (live and stale): its memory
        self.peak = 0

    def __len__(self) -> int:
        return len(self._armed)

    def arm(self, handle: Hashable, expiry: int) -> None:
        entry = (expiry, next(self._order), handle)
        self._armed[handle] = entry
        heap = self._heap
        heapq.heappush(heap, entry)
        n = len(heap)
        if n > self.peak:
            self.peak = n
        if 0 <= self._limit < n > 2 * len(self._armed):
            armed = self._armed
            heap[:] = [e for e in heap if armed.get(e[2]) is e]
            heapq.heapify(heap)

    def cancel(self, handle: Hashable) -> bool:
        return self._armed.pop(handle, None) is not None

    def expiry(self, handle: Hashable) -> int | None:
        entry = self._armed.get(handle)
        return None if entry is None else entry[0]

    def next_expiry(self) -> int | None:
        heap, armed = self._heap, self._armed
        while heap:
            entry = heap[0]
            if armed.get(entry[2]) is entry:
                return entry[0]
            heapq.heappop(heap)
        return None

    def expire(self, now: int) -> list[Hashable]:
        fired: list[Hashable] = []
        heap, armed = self._heap, self._armed
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if armed.get(entry[2]) is entry:
                del armed[entry[2]]
                fired.append(entry[2])
        return fired


class Workload:
    """Operations in time order, as flat arrays: ``kinds[i]`` on ``handles[i]`` at ``times[i]``."""

    def __init__(self, timers: int) -> None:
        self.timers = timers
        self.times = array("q")
        self.kinds = bytearray()
        self.handles = array("q")
        self.expiries = array("q")  # for ARM: the expiry; for CANCEL: unused (0)
        self.touched = 0  # timers cancelled or re-armed before expiry
        self.cancelled = 0
        self.mean_armed = 0.0  # timers armed at once, averaged over the simulated time
        #: what must fire, in order (by expiry, then arming order), and when
        self.expected_handles = array("q")
        self.expected_expiries = array("q")


def make_workload(timers: int, seed: int) -> Workload:
    """The deterministic workload for ``timers`` timers (see the module doc)."""
    rng = random.Random(seed)
    lo, hi = math.log(MIN_DELAY_NS), math.log(MAX_DELAY_NS)
    exp, uniform, rand, expovariate = math.exp, rng.uniform, rng.random, rng.expovariate

    def delay() -> int:
        return int(exp(uniform(lo, hi)))

    arm_at, arm_expiry = array("q"), array("q")  # by handle; handles are armed in order
    touches: list[tuple[int, int, int]] = []  # (time, handle, new expiry or -1 to cancel)
    now = START_NS
    for _ in range(timers):
        now += 1 + int(expovariate(1.0 / MEAN_GAP_NS))
        expiry = now + delay()
        arm_at.append(now)
        arm_expiry.append(expiry)
        if rand() < 0.5:
            at = now + 1 + int(rand() * (expiry - now - 1))  # strictly between arm and expiry
            if rand() < 0.5:
                touches.append((at, len(arm_at) - 1, -1))
            else:
                touches.append((at, len(arm_at) - 1, at + delay()))
    touches.sort()
    touches.append((2**63 - 1, -1, -1))  # a sentinel after every arm
    w = Workload(timers)
    w.touched = len(touches) - 1
    final_expiry = array("q", [-1]) * timers  # -1: cancelled
    final_op = array("q", [0]) * timers  # the op index of the last arming
    armed_ns = 0  # total armed time over all timers
    nxt = 0  # next touch
    for handle in range(timers):
        at = arm_at[handle]
        while touches[nxt][0] < at:  # at equal times, the arm comes first
            t_at, t_handle, t_expiry = touches[nxt]
            nxt += 1
            armed_ns -= final_expiry[t_handle] - t_at  # count up to now, not to expiry
            w.times.append(t_at)
            w.handles.append(t_handle)
            if t_expiry < 0:
                w.kinds.append(CANCEL)
                w.expiries.append(0)
                w.cancelled += 1
                final_expiry[t_handle] = -1
            else:
                w.kinds.append(ARM)
                w.expiries.append(t_expiry)
                final_expiry[t_handle] = t_expiry
                final_op[t_handle] = len(w.times) - 1
                armed_ns += t_expiry - t_at
        w.times.append(at)
        w.handles.append(handle)
        w.kinds.append(ARM)
        w.expiries.append(arm_expiry[handle])
        final_expiry[handle] = arm_expiry[handle]
        final_op[handle] = len(w.times) - 1
        armed_ns += arm_expiry[handle] - at
    for t_at, t_handle, t_expiry in touches[nxt:-1]:  # after the last arm
        armed_ns -= final_expiry[t_handle] - t_at
        w.times.append(t_at)
        w.handles.append(t_handle)
        w.kinds.append(CANCEL if t_expiry < 0 else ARM)
        w.expiries.append(max(t_expiry, 0))
        final_expiry[t_handle] = t_expiry
        final_op[t_handle] = len(w.times) - 1
        if t_expiry < 0:
            w.cancelled += 1
        else:
            armed_ns += t_expiry - t_at
    ops = len(w.times)
    survivors = sorted(
        (h for h in range(timers) if final_expiry[h] >= 0),
        key=lambda h: final_expiry[h] * ops + final_op[h],  # by expiry, then arming order
    )
    w.expected_handles = array("q", survivors)
    w.expected_expiries = array("q", (final_expiry[h] for h in survivors))
    if survivors:
        w.mean_armed = armed_ns / (w.expected_expiries[-1] - START_NS)
    return w


#: the watchdog shape: every timer is armed 1..5 s ahead and pushed back REARMS times
#: before it could fire (a host with hundreds of vCPUs whose PV timers and watchdogs are
#: re-armed on every event: many armed, most never fire where first armed)
WATCHDOG_MIN_NS = 1_000_000_000
WATCHDOG_MAX_NS = 5_000_000_000
REARMS = 16


def make_watchdog_workload(timers: int, seed: int) -> Workload:
    """``timers`` timers, each armed then re-armed ``REARMS`` times, each re-arm strictly
    before the current expiry and for 1..5 s after it; every timer fires once, at its last
    expiry."""
    rng = random.Random(seed)
    ops: list[tuple[int, int, int, int]] = []  # (time, generation order, handle, expiry)
    gap = max(1, (WATCHDOG_MIN_NS // 4) // timers)  # all armed within a quarter second
    for handle in range(timers):
        at = START_NS + handle * gap
        expiry = at + rng.randrange(WATCHDOG_MIN_NS, WATCHDOG_MAX_NS)
        ops.append((at, len(ops), handle, expiry))
        for _ in range(REARMS):
            at += 1 + rng.randrange(max(1, (expiry - at) // 8))
            expiry = at + rng.randrange(WATCHDOG_MIN_NS, WATCHDOG_MAX_NS)
            ops.append((at, len(ops), handle, expiry))
    ops.sort()
    w = Workload(timers)
    final: dict[int, tuple[int, int]] = {}
    for index, (at, _, handle, expiry) in enumerate(ops):
        w.times.append(at)
        w.kinds.append(ARM)
        w.handles.append(handle)
        w.expiries.append(expiry)
        final[handle] = (expiry, index)
    w.touched = timers
    order = sorted(final, key=lambda h: final[h])
    w.expected_handles = array("q", order)
    w.expected_expiries = array("q", (final[h][0] for h in order))
    w.mean_armed = float(timers)
    return w


def replay(q: TimerQueue, w: Workload) -> tuple[float, int, list[Hashable], list[int]]:
    """Drive ``q`` through ``w`` with an exact event loop.

    Returns (seconds, API calls, fired handles in order, the ``now`` each one fired at).
    """
    arm, cancel, next_expiry, expire = q.arm, q.cancel, q.next_expiry, q.expire
    times, kinds, handles, expiries = w.times, w.kinds, w.handles, w.expiries
    n = len(times)
    fired: list[Hashable] = []
    fired_at: list[int] = []
    extend_fired, extend_at = fired.extend, fired_at.extend
    i = calls = 0
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        while True:
            nxt = next_expiry()
            calls += 1
            if i < n and (nxt is None or times[i] < nxt):
                if kinds[i] == ARM:
                    arm(handles[i], expiries[i])
                elif not cancel(handles[i]):
                    raise AssertionError(f"cancel of armed timer {handles[i]} returned False")
                i += 1
            elif nxt is None:
                break
            else:
                due = expire(nxt)
                extend_fired(due)
                extend_at([nxt] * len(due))
            calls += 1
        seconds = time.perf_counter() - t0
    finally:
        gc.enable()
    return seconds, calls, fired, fired_at


def _check(name: str, fired: list[Hashable], fired_at: list[int], w: Workload) -> None:
    handles, expiries = w.expected_handles, w.expected_expiries
    if len(fired) != len(handles):
        raise AssertionError(f"{name}: fired {len(fired)} timers, expected {len(handles)}")
    for k, (handle, expiry, h, at) in enumerate(
        zip(handles, expiries, fired, fired_at, strict=True)
    ):
        if h != handle or at != expiry:
            raise AssertionError(
                f"{name}: firing #{k} was {h!r} at {at}, expected {handle!r} at {expiry}"
            )


def run_wheel_bench(
    timers: int = 1_000_000, seed: int = 1, *, rounds: int = 2, shape: str = "hrtimer"
) -> int:
    """Generate the workload, time the queues on it, verify them, print the table; 0.

    Each queue replays the workload ``rounds`` times, alternating with the others (a
    fresh queue each time); the table shows each queue's fastest replay and the most
    entries it held (its memory: a lazy-deletion heap keeps every stale entry until it
    surfaces).  ``shape``: ``hrtimer`` (the normal life of host hrtimers, see the module
    doc) or ``watchdog`` (every timer pushed back ``REARMS`` times before it fires).
    """
    if timers < 1 or rounds < 1:
        raise ValueError("timers and rounds must be >= 1")
    if shape == "watchdog":
        w = make_watchdog_workload(timers, seed)
    elif shape == "hrtimer":
        w = make_workload(timers, seed)
    else:
        raise ValueError(f"unknown shape {shape!r}: hrtimer or watchdog")
    makers: dict[str, Callable[[], TimerQueue]] = {
        "hrtimer wheel": HrtimerQueue,
        "heapq lazy deletion": HeapTimerQueue,
        "heapq + compaction": lambda: HeapTimerQueue(compact=True),
    }
    best: dict[str, tuple[float, int]] = {}
    peak: dict[str, int | None] = {}
    firings: dict[str, tuple[list[Hashable], list[int]]] = {}
    for _ in range(rounds):
        for name, make in makers.items():
            queue = make()
            seconds, calls, fired, fired_at = replay(queue, w)
            _check(name, fired, fired_at, w)
            if len(queue) != 0:
                raise AssertionError(f"{name}: {len(queue)} timers left armed")
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, calls)
            # the wheel keeps no stale entries on the wheel (only its small near heap can)
            peak[name] = getattr(queue, "peak", None)
            firings[name] = (fired, fired_at)
    reference = next(iter(firings.values()))
    calls_seen = {calls for _, calls in best.values()}
    if any(f != reference for f in firings.values()) or len(calls_seen) != 1:
        raise AssertionError("the queues fired different sequences")
    print(
        f"vtick bench wheel ({shape}): {timers:,} timers, {len(w.times):,} arm/cancel "
        f"operations, {w.touched:,} timers cancelled or re-armed before expiry, seed {seed}"
    )
    if shape == "hrtimer":
        print(
            f"  delays 1 us..100 ms log-uniform, a new timer every ~{MEAN_GAP_NS / 1000:g} us, "
            f"~{w.mean_armed:,.0f} armed at once; best of {rounds} alternating replays"
        )
    else:
        print(
            f"  each timer armed 1..5 s ahead and pushed back {REARMS} times before it "
            f"fires; best of {rounds} alternating replays"
        )
    print(f"{'queue':<22}{'API calls':>12}{'seconds':>10}{'ops/s':>14}{'peak entries':>14}")
    for name, (seconds, calls) in best.items():
        held = "-" if peak[name] is None else f"{peak[name]:,}"
        print(f"{name:<22}{calls:>12,}{seconds:>10.2f}{calls / seconds:>14,.0f}{held:>14}")
    wheel_s = best["hrtimer wheel"][0]
    print(f"ratio (wheel ops/s / heapq ops/s): {best['heapq lazy deletion'][0] / wheel_s:.2f}")
    print(
        f"ratio (wheel ops/s / compacting heapq ops/s): "
        f"{best['heapq + compaction'][0] / wheel_s:.2f}"
    )
    print(
        f"verified: every queue fired the same {len(reference[0]):,} (handle, expiry) pairs, "
        "each exactly at its expiry, by expiry then arming order"
    )
    return 0
