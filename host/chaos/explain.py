"""Explain every late timer: its lateness split along the virtualization path, and the
blocker named (issue 15; rtla timerlat's auto-analysis, for a vCPU).

Theory of operation
-------------------
:func:`explain` reads a history (``history.py``: the same per-event ids and records a
chaos run keeps; ``vtick run --explain`` records one per path) and follows every timer
callback back through the interrupt it ran in, by ids: the callback's ``irq`` names the
injection (its link number on that vCPU), the injection names the guest timer arming
whose device expiry raised it, and the host's timer record of that arming gives the
expiry the device asked for and the moment the host timer fired.  That gives seven
points in host ns, each clamped between its neighbours:

    E requested expiry -> H device expiry -> F host timer fired -> I injection sent
      -> A interrupt arrived -> S handler started -> R callback ran

and the lateness ``R - E`` is the sum of six parts (:data:`PARTS`):

``programmed late`` (E -> H)
    the device was programmed for later than asked: a relative delta gone stale while
    the vCPU was preempted before writing it (the ``clockevents.delta_to_device`` window);
``host timer`` (H -> F)
    host timer expiry lateness: the host's timer loop woke late (busy with another
    vCPU's exit, stopped, not scheduled);
``host handling`` (F -> I)
    from the host timer to the injection on the wire (the LAPIC held the vector while
    another was in service, timer advance);
``transit`` (I -> A)
    the injection's trip to the vCPU (nng, scheduling, a retransmission after a loss);
``guest until handler`` (A -> S)
    the vCPU busy elsewhere: in an exit, in another handler, stopped, preempted;
``handler`` (S -> R)
    the handler itself up to this callback (its EOI, earlier callbacks).

A callback that ran without an interrupt (the guest's own -ETIME path) has all its
lateness in ``guest until handler``.  For the worst events the largest part is
attributed to a *blocker* found in the history around it: a fault or a stall on that
vCPU or the host, the longest exit the vCPU or the host was busy with, a link fault.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any

from vtick.host.chaos.checkers import RunContext

__all__ = ["PARTS", "explain", "Recording", "WORST"]

PARTS = (
    "programmed late",
    "host timer",
    "host handling",
    "transit",
    "guest until handler",
    "handler",
)
#: worst events explained per run
WORST = 3
#: a transit this long is a retransmission (the link's RTO is 0.5 s)
RETRANSMIT_NS = 400_000_000

Event = dict[str, Any]


def _points(e: Event, chain: tuple[int, int, int, int, int] | None) -> list[int]:
    """E, H, F, I, A, S, R for one callback, clamped into order."""
    start, ran = e["value"]["expires_host"], e["time"]
    raw = [start, *(chain or (start, start, start, start, ran)), ran]
    points = [start]
    for x in raw[1:]:
        points.append(min(max(points[-1], x), ran))
    return points


def explain(history: list[Event], worst: int = WORST) -> dict[str, Any]:
    """The breakdown of every callback (means) and of the ``worst`` ones (with blockers).

    Returns ``{"events", "mean_ns": {part: ns}, "worst_mean_ns": {part: ns} (the worst
    1 %), "worst": [{"timer", "vcpu", "index", "late_ns", "parts": {part: ns},
    "points_ktime": [7 ns], "blocker"}]}``.
    """
    run = history[0]["value"] if history and history[0]["f"] == "run" else {}
    epoch = run.get("ktime_epoch") or 0
    last_fire: dict[tuple[int, str], Event] = {}
    chains: dict[tuple[int, int, int], tuple[int, int, int]] = {}
    arrivals: dict[tuple[int, int, int], Event] = {}
    rows: list[tuple[int, Event, list[int], bool]] = []
    for e in history:
        f = e["f"]
        if f == "host-timer-fire" and e["value"].get("timer"):
            last_fire[(e["vcpu"], e["value"]["timer"])] = e
        elif f == "inject":
            v = e["value"]
            fire = last_fire.get((e["vcpu"], v["timer"])) if v.get("timer") else None
            fired = fire["time"] if fire else e["time"]
            asked = (fire["value"].get("expiry") or fired) if fire else fired
            chains[(e["vcpu"], v["generation"], v["seq"])] = (asked, fired, e["time"])
        elif f == "irq":
            v = e["value"]
            arrivals[(e["vcpu"], v["generation"], v["seq"])] = e
        elif f == "timer-fire":
            v = e["value"]
            key = (e["vcpu"], v.get("generation", 0), v.get("irq") or 0)
            chain = chains.get(key)
            irq = arrivals.get(key)
            full = None
            if chain is not None and irq is not None:
                full = (*chain, irq["time"], irq["value"]["handled"] or e["time"])
            rows.append((v["late_ns"], e, _points(e, full), full is not None))
    if not rows:
        return {"events": 0, "mean_ns": {}, "worst_mean_ns": {}, "worst": []}
    rows.sort(key=lambda r: r[0], reverse=True)
    top = rows[: max(1, len(rows) // 100)]
    ctx = RunContext(history)
    index = _Index(history)
    explained: list[dict[str, Any]] = []
    out = {
        "events": len(rows),
        "mean_ns": _mean(rows),
        "worst_mean_ns": _mean(top),
        "worst": explained,
    }
    seen: set[tuple[int, Any]] = set()
    for late, e, points, chained in rows:
        if len(explained) >= worst:
            break
        interrupt = (e["vcpu"], e["value"].get("irq") or e["index"])
        if interrupt in seen:  # one event per interrupt: the others share its story
            continue
        seen.add(interrupt)
        parts = _parts(points, chained)
        explained.append(
            {
                "timer": e["value"]["timer"],
                "vcpu": e["vcpu"],
                "index": e["index"],
                "late_ns": late,
                "parts": parts,
                "points_ktime": [p - epoch for p in points],
                "blocker": _blocker(e, points, parts, chained, ctx, index),
            }
        )
    return out


def _parts(points: list[int], chained: bool) -> dict[str, int]:
    if not chained:
        return {p: (points[-1] - points[0] if p == "guest until handler" else 0) for p in PARTS}
    return {part: points[i + 1] - points[i] for i, part in enumerate(PARTS)}


def _mean(rows: list[tuple[int, Event, list[int], bool]]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for _, _, points, chained in rows:
        for part, ns in _parts(points, chained).items():
            total[part] += ns
    return {part: total[part] // len(rows) for part in PARTS}


class _Index:
    """Exits and handlers by vCPU, host exits, for the blockers of a few events."""

    def __init__(self, history: list[Event]) -> None:
        self.exits: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
        self.host: list[tuple[int, int, int, str]] = []
        self.handlers: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        self.link: dict[int, list[int]] = defaultdict(list)
        for e in history:
            f, v = e["f"], e["value"]
            if f == "exit" and v.get("rtt_ns"):
                self.exits[e["vcpu"]].append((e["time"], e["time"] + v["rtt_ns"], v["kind"]))
            elif f == "host-exit":
                self.host.append((e["time"], e["time"] + v["handling_ns"], e["vcpu"], v["kind"]))
            elif f == "irq" and v.get("handled"):
                self.handlers[e["vcpu"]].append((e["time"], v["handled"], v["vector"]))
            elif f == "link-fault":
                self.link[e["vcpu"]].append(e["time"])
        self.host_starts = [h[0] for h in self.host]
        self.exit_starts = {v: [x[0] for x in xs] for v, xs in self.exits.items()}

    def longest_exit(self, vcpu: int, a: int, b: int) -> tuple[int, str] | None:
        """The exit of ``vcpu`` overlapping [a, b] the longest (one is out at a time)."""
        xs = self.exits.get(vcpu, [])
        i = bisect.bisect_right(self.exit_starts.get(vcpu, []), b)
        best: tuple[int, str] | None = None
        while i > 0:
            i -= 1
            start, end, kind = xs[i]
            if end < a:
                break
            overlap = min(end, b) - max(start, a)
            if overlap > 0 and (best is None or overlap > best[0]):
                best = (overlap, kind)
        return best

    def busiest_host_exit(self, a: int, b: int) -> tuple[int, int, str] | None:
        i = bisect.bisect_right(self.host_starts, b)
        best: tuple[int, int, str] | None = None
        floor = a - 1_000_000_000
        while i > 0:
            i -= 1
            start, end, vcpu, kind = self.host[i]
            if start < floor:
                break
            overlap = min(end, b) - max(start, a)
            if overlap > 0 and (best is None or overlap > best[0]):
                best = (overlap, vcpu, kind)
        return best


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms" if ns >= 1_000_000 else f"{ns / 1e3:.0f} us"


def _blocker(
    e: Event,
    points: list[int],
    parts: dict[str, int],
    chained: bool,
    ctx: RunContext,
    index: _Index,
) -> str:
    vcpu = e["vcpu"]
    worst = max(PARTS, key=lambda p: parts[p])
    i = PARTS.index(worst)
    a, b = points[i], points[i + 1]
    faults = ctx.faults_on([vcpu], a, b)
    by_kind = {f.kind: f for f in faults}
    if not chained:
        return f"vCPU {vcpu} ran it without an interrupt, in its own programming path (-ETIME)"
    if worst == "programmed late":
        window = by_kind.get("window")
        where = f" at {window.pattern}" if window else ""
        return (
            f"vCPU {vcpu} was preempted{where} between computing the timer delta and "
            f"programming the device ({_ms(parts[worst])}): the relative delta went stale"
        )
    if worst == "host timer":
        if "host-stop" in by_kind:
            return f"the host was stopped ({_ms(parts[worst])})"
        busy = index.busiest_host_exit(a, b)
        if busy is not None and busy[0] >= parts[worst] // 4:
            return f"the host was busy with vCPU {busy[1]}'s {busy[2]} exit ({_ms(busy[0])})"
        return "the host's timer loop woke late (the host process was not scheduled)"
    if worst == "host handling":
        return "the host held the interrupt (its vector's class was in service, or timer advance)"
    if worst == "transit":
        if "link" in by_kind or any(a <= t <= b for t in index.link.get(vcpu, ())):
            return f"a link fault on vCPU {vcpu}'s link and its recovery ({_ms(parts[worst])})"
        if parts[worst] >= RETRANSMIT_NS:
            return f"a retransmission on vCPU {vcpu}'s link ({_ms(parts[worst])})"
        return f"the injection's trip to vCPU {vcpu} (nng and scheduling, {_ms(parts[worst])})"
    if worst == "guest until handler":
        for kind, what in (("stop", "stopped (SIGSTOP)"), ("crash", "restarting after a crash")):
            if kind in by_kind:
                return f"vCPU {vcpu} was {what} ({_ms(parts[worst])})"
        if "window" in by_kind:
            return f"vCPU {vcpu} was in a preemption window at {by_kind['window'].pattern}"
        if ctx.stalled(vcpu, a, b):
            return f"vCPU {vcpu}'s process was not scheduled ({_ms(parts[worst])})"
        own = index.longest_exit(vcpu, a, b)
        if own is not None and own[0] >= parts[worst] // 4:
            cause = ", under a link fault (a lost frame waits for its retransmission)"
            return f"vCPU {vcpu} was busy in a {own[1]} exit ({_ms(own[0])})" + (
                cause if "link" in by_kind else ""
            )
        others = [h for h in index.handlers.get(vcpu, []) if a <= h[0] and h[1] <= b]
        if others:
            return f"vCPU {vcpu} was in {len(others)} other interrupt handler(s) first"
        return f"vCPU {vcpu} was busy between instruction boundaries ({_ms(parts[worst])})"
    return f"the handler itself: its EOI and the callbacks before this one ({_ms(parts[worst])})"


# ---------------------------------------------------------------------- vtick run --explain


class Recording:
    """The event logs of one ``vtick run --explain`` path: an anonymous file per process
    (``vtick.proto.eventlog.anonymous_fd``; nothing in the run directory), handed down
    in ``$VTICK_CHAOS_PLAN``, read back by :meth:`explain`."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def _fd(self, name: str) -> int:
        from vtick.proto.eventlog import anonymous_fd

        fd = anonymous_fd(name)
        self.fds.append(fd)
        return fd

    def host(self) -> tuple[dict[str, str], tuple[int, ...]]:
        """(environment, descriptors to pass) for a host process: the one that starts
        the VM and, with ``--migrate-at`` (issue 13), the destination's, each with a log
        of its own (``build_history`` merges them onto one clock)."""
        import json

        from vtick.proto.eventlog import PLAN_ENV

        fd = self._fd("host")
        return {PLAN_ENV: json.dumps({"record_fd": fd})}, (fd,)

    def guests(self, vcpus: range) -> tuple[dict[str, str], tuple[int, ...]]:
        """(environment, descriptors to pass) for a process running ``vcpus``."""
        import json

        from vtick.proto.eventlog import PLAN_ENV

        fds = {str(v): self._fd(f"vcpu{v}") for v in vcpus}
        return {PLAN_ENV: json.dumps({"record_fds": fds})}, tuple(fds.values())

    def explain(self, config: dict[str, Any]) -> dict[str, Any]:
        """Read every log, explain the path's timers, release the files."""
        import os

        from vtick.host.chaos.history import build_history
        from vtick.host.chaos.orchestrator import ChaosOptions, Execution
        from vtick.proto.eventlog import read_log

        opts = ChaosOptions(
            seed=int(config.get("seed", 0)),
            mode=str(config.get("mode", "")),
            ipi=str(config.get("ipi") or ""),
            vcpus=int(config.get("vcpus", 0)),
            duration_s=float(config.get("duration_s", 0.0)),
        )
        ex = Execution(opts, [])
        for fd in self.fds:
            try:
                contents = read_log(fd)
            except (OSError, ValueError):
                continue  # a process that never opened its log
            finally:
                os.close(fd)
            if contents.header.get("role") == "host":
                ex.host_logs.append(contents)  # issue 13: the destination's too, merged
            else:
                ex.guest_logs.append(contents)
        self.fds = []
        return explain(build_history(ex))

    def close(self) -> None:
        import os

        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
