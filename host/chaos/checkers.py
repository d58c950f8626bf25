"""Checkers: pure functions over a chaos history, one per invariant, each linear in it.

Theory of operation
-------------------
A checker reads a history (``history.py``: a list of events in host-time order) and
nothing else, so a stored run is re-checked by ``vtick analyze`` and a checker is tested
on hand-written histories.  Each answers like Jepsen's: ``valid`` is ``True``, ``False``
or ``"unknown"`` (nothing could be concluded), with the number of operations checked,
the number of violations and the *first counterexample*: the event indices, the events
involved and one sentence ("timer 1.17 armed for 1.000200 s fired at 1.000150 s, 50 us
early").  Times in sentences are seconds of guest ktime (0 when the host started: every
vCPU reads the same clock), the axis a guest's expiries are in.

:class:`RunContext` is one pass over the history that gathers the few things every
checker asks about: the configuration, the run's start and end, every fault as an
interval on its target (``stop``, ``crash`` until the new process runs, ``window``,
``link`` widened by the link layer's recovery time, ``host-stop`` on every vCPU), the
processes the nemesis killed, the watchdog's stalls.  Then each checker makes one pass
of its own; the work per event is a dictionary operation or a scan of the few faults of
one vCPU, so the whole is linear in the history's length.

The invariants (``docs/design.md`` section 6; ``docs/chaos.md`` says which events each
reads):

==========================  =================================================================
``timer-not-early``         no callback runs before its expiry; no host timer fires before the
                            expiry its device asked for; in the absolute modes no timer
                            interrupt is injected before the guest's expiry (invariant 1)
``timer-once``              every armed, uncancelled timer fires exactly once unless the run
                            (or its process) ended first; a programming fires at most once
                            (invariant 2)
``cancelled-never-fires``   a cancelled or replaced timer never fires (invariant 2)
``ipi-once``                every IPI sent to a live target reaches its LAPIC and is handled
                            exactly once (invariant 3)
``call-completes``          every smp_call_function(wait) returns, or fails naming a target
                            that was stopped or crashed; each csd runs at most once
                            (invariants 4 and 7)
``lapic-consistent``        at the end: injections = EOIs + vectors in service, the LAPIC
                            cleared one ISR bit per EOI the guest did, nothing in service that
                            the guest handled (invariant 5)
``no-silent-loss``          every exit answered, every injection arrived, or a link error /
                            a replaced session said so (invariants 6 and 8)
``lateness-explained``      a timer later than the bound overlaps a fault or a stall on its
                            own vCPU or the host; the others are listed as unexplained
``coverage``                every fault kind asked for overlapped armed timers or in-flight
                            IPIs; if one did not, the run proved nothing about it: unknown
==========================  =================================================================
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHECKERS",
    "INVARIANTS",
    "CheckOptions",
    "RunContext",
    "Verdict",
    "check_history",
    "overall",
    "ABSOLUTE_MODES",
]

Event = dict[str, Any]
UNKNOWN = "unknown"
#: modes whose device expiry is the guest's absolute expiry (or later by construction)
ABSOLUTE_MODES = ("tsc-deadline", "vmi", "pv-ktime", "pv-delta", "pv-future")
#: how long after a link fault window the link layer may still be recovering: its
#: retransmission timeout (proto/link.py DEFAULT_RTO_NS) plus slack
LINK_RECOVERY_NS = 600_000_000
#: kvmclock conversion and TSC-deadline tick rounding: a few ns, never 1 us
EARLY_TOLERANCE_NS = 1_000
#: at most this many violations are kept as examples
EXAMPLES = 5
#: faults that can make a csd wait run out its timeout (smp.csd_lock_timeout, 5 s by
#: default; a window lasts at most 8 ms)
CALL_BLAME = ("stop", "crash", "host-stop", "link", "migration")
#: issue 13: a live migration's blackout, as a fault on the host (every vCPU) in
#: RunContext.faults: from the freeze to the last vCPU's resume on the destination (or,
#: when the move failed, to the moment the VM ran on at the source)
MIGRATION = "migration"


@dataclass(frozen=True)
class CheckOptions:
    """``late_bound_ns``: lateness beyond this must be explained by a fault or a stall
    (and an unfired timer that was due this long before its vCPU stopped is lost)."""

    late_bound_ns: int = 250_000_000


@dataclass
class Verdict:
    name: str
    invariant: str
    valid: bool | str = True
    checked: int = 0
    violations: int = 0
    first: dict[str, Any] | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: fault kind -> operations checked that overlapped a fault of that kind
    exposure: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)

    def violation(self, message: str, *events: Event | None) -> None:
        self.violations += 1
        self.valid = False
        if len(self.examples) >= EXAMPLES:
            return
        found = [e for e in events if e is not None]
        example = {
            "indices": [e["index"] for e in found],
            "ops": found,
            "message": message,
        }
        self.examples.append(example)
        if self.first is None:
            self.first = example

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "invariant": self.invariant,
            "valid": self.valid,
            "checked": self.checked,
            "violations": self.violations,
            "first": self.first,
            "examples": self.examples,
            "notes": self.notes,
            "exposure": dict(self.exposure),
            "counts": dict(self.counts),
        }


def _s(ns: int | None) -> str:
    return "?" if ns is None else f"{ns / 1e9:.6f} s"


def _us(ns: int) -> str:
    return f"{ns / 1000:.0f} us" if abs(ns) < 10_000_000 else f"{ns / 1e6:.1f} ms"


@dataclass
class _Fault:
    id: Any
    kind: str
    target: int  # -1: host
    start: int
    end: int
    pattern: str = ""
    pid: int | None = None


class RunContext:
    """What every checker asks about, from one pass over the history."""

    def __init__(self, events: list[Event]) -> None:
        run = events[0]["value"] if events and events[0]["f"] == "run" else {}
        self.config: dict[str, Any] = run.get("config", {})
        self.failure: str | None = run.get("failure")
        self.interrupted: str | None = run.get("interrupted")
        self.mode: str = self.config.get("mode", "")
        self.requested: list[str] = list(self.config.get("faults", []))
        self.vcpus: int = int(self.config.get("vcpus", 0))
        self.run_start: int | None = run.get("run_start")
        #: host time of guest ktime 0 (the host's start): the one time axis of messages
        self.epoch: int | None = run.get("ktime_epoch")
        self.run_end: int | None = None
        self.last: int = events[-1]["time"] if events else 0
        self.faults: list[_Fault] = []
        #: pids the nemesis killed, and when
        self.killed: dict[int, int] = {}
        self.stalls: dict[int | None, list[tuple[int, int]]] = defaultdict(list)
        #: (vcpu, incarnation) -> pid, workload start, workload end (None: never ended)
        self.pids: dict[tuple[int, int], int] = {}
        self.ended: dict[tuple[int, int], int] = {}
        self.link_errors: dict[int, list[int]] = defaultdict(list)
        self.failed_pids: set[int] = set()
        #: vcpu -> times of new sessions
        self.new_sessions: dict[int, list[int]] = defaultdict(list)
        self.last_event: dict[tuple[int, int], int] = {}
        #: issue 13: every migration's blackout (also in ``faults``, on the host)
        self.blackouts: list[_Fault] = []
        moving: dict[str, Any] | None = None  # the move under way: freeze, restore, resumes
        open_faults: dict[Any, Event] = {}
        for e in events:
            f = e["f"]
            if f == "migrate-out":
                moving = {"start": e["time"], "in": None, "back": {}}
            elif f == "migrate-in" and moving is not None:
                moving["in"] = e["time"]
            elif f == "migrate-failed" and moving is not None:
                self._add_blackout(moving["start"], e["time"], "failed")
                moving = None
            elif f == "session" and moving is not None and moving["in"] is not None:
                # a vCPU back on the destination: its session resumed (or a new process)
                moving["back"].setdefault(e["vcpu"], e["time"])
            if f == "fault":
                v = e["value"]
                key = (v.get("kind"), v.get("fault"))
                if e["type"] == "invoke":
                    open_faults[key] = e
                    if v.get("kind") == "crash" and v.get("pid"):
                        self.killed[v["pid"]] = e["time"]
                else:
                    start = open_faults.pop(key, e)
                    self._add_fault(v, start["time"], e["time"])
            elif f == "run-start":
                self.run_start = self.run_start or e["time"]
            elif f == "run-end":
                self.run_end = e["time"]
            elif f == "stall":
                self.stalls[e["vcpu"]].append((e["time"], e["value"]["end"]))
            elif f == "workload-start":
                self.pids[(e["vcpu"], e["value"]["incarnation"])] = e["value"]["pid"]
            elif f == "workload-end":
                self.ended[(e["vcpu"], e["value"]["incarnation"])] = e["time"]
            elif f == "link-error":
                self.link_errors[e["vcpu"]].append(e["time"])
            elif f == "process-exit":
                if e["value"]["status"] not in (0, None):
                    self.failed_pids.add(e["value"]["pid"])
            elif f == "session" and e["value"]["kind"] == "new":
                self.new_sessions[e["vcpu"]].append(e["time"])
        for start in open_faults.values():  # never ended: lasted to the end
            self._add_fault(start["value"], start["time"], self.last)
        if moving is not None:
            back = moving["back"]
            # a vCPU that never came back (stopped, killed) kept the blackout open for it
            # until the end; the VM's other vCPUs ran on, which the checks by vCPU see
            end = max(back.values()) if back and len(back) >= self.vcpus else self.last
            self._add_blackout(moving["start"], end, "moved")
        self._finish_crashes(events)
        self.faults.sort(key=lambda x: x.start)
        self._by_target: dict[int, list[_Fault]] = defaultdict(list)
        for fault in self.faults:
            self._by_target[fault.target].append(fault)
        self._starts = {t: [f.start for f in fs] for t, fs in self._by_target.items()}
        self._longest = {t: max(f.end - f.start for f in fs) for t, fs in self._by_target.items()}
        if self.run_start is None:
            self.run_start = events[0]["time"] if events else 0
        if self.run_end is None:
            self.run_end = self.last

    def _add_fault(self, v: dict[str, Any], start: int, end: int) -> None:
        kind = v.get("kind", "?")
        target = int(v.get("target", -1))
        if kind == "crash":
            end = self.last  # dead until its successor runs: widened below
        if kind == "link":
            end += LINK_RECOVERY_NS
        self.faults.append(_Fault(v.get("fault"), kind, target, start, end, v.get("pattern", "")))

    def _add_blackout(self, start: int, end: int, how: str) -> None:
        blackout = _Fault(f"migration-{len(self.blackouts)}", MIGRATION, -1, start, end, how)
        self.blackouts.append(blackout)
        self.faults.append(blackout)

    def _finish_crashes(self, events: list[Event]) -> None:
        """A crashed vCPU is down from the kill until its next process's workload starts."""
        restarts: dict[int, list[int]] = defaultdict(list)
        for e in events:
            if e["f"] == "workload-start" and e["value"]["incarnation"] > 0:
                restarts[e["vcpu"]].append(e["time"])
        for fault in self.faults:
            if fault.kind == "crash":
                later = [t for t in restarts.get(fault.target, []) if t > fault.start]
                fault.end = min(later) if later else self.last

    def rel(self, t: int | None) -> str:
        """A host time as seconds since the host started: guest ktime, the time axis of
        every message (a guest's expiries are in it too)."""
        if t is None:
            return "?"
        origin = self.epoch if self.epoch is not None else (self.run_start or 0)
        return f"{(t - origin) / 1e9:.6f} s"

    def faults_on(self, vcpus: Iterable[int | None], start: int, end: int) -> list[_Fault]:
        """Faults on these vCPUs or on the host overlapping [start, end]."""
        out: list[_Fault] = []
        for target in {*(v for v in vcpus if v is not None), -1}:
            faults = self._by_target.get(target)
            if not faults:
                continue
            starts = self._starts[target]
            i = bisect.bisect_right(starts, end)
            floor = start - self._longest[target]
            while i > 0:
                i -= 1
                fault = faults[i]
                if fault.start < floor:
                    break
                if fault.end >= start:
                    out.append(fault)
        return out

    def kinds(self, vcpus: Iterable[int | None], start: int, end: int) -> set[str]:
        return {f.kind for f in self.faults_on(vcpus, start, end)}

    def stalled(self, vcpu: int | None, start: int, end: int) -> bool:
        """Did the watchdog of ``vcpu``'s process, or the host's, see it not running?"""
        return any(
            s <= end and e >= start for who in (vcpu, None) for s, e in self.stalls.get(who, ())
        )

    def crashed(self, vcpu: int, incarnation: int) -> bool:
        pid = self.pids.get((vcpu, incarnation))
        if pid is None:  # killed before its workload started: the crash names its pid
            return any(f.kind == "crash" and f.target == vcpu for f in self.faults)
        return pid in self.killed

    def end_of(self, vcpu: int, incarnation: int) -> int:
        """When this process stopped running its workload (the run's end if it never
        said so)."""
        pid = self.pids.get((vcpu, incarnation))
        if pid is not None and pid in self.killed:
            return self.killed[pid]
        return self.ended.get((vcpu, incarnation), self.run_end or self.last)

    def cut_off(self, vcpu: int | None, due: int, end: int, bound: int) -> str | None:
        """Why an operation of ``vcpu`` due at ``due`` may still be open at ``end`` (its
        process's end): the run ended (the host sent its shutdown) before it was due
        plus the lateness bound, or a fault or a watchdog stall on that vCPU or the host
        delayed it past the end, as ``lateness-explained`` would accept.  None: no
        excuse."""
        if due + bound >= min(end, self.run_end or self.last):
            return "the run ended first"
        # a migration's blackout ends when the VM runs again: one over well before the
        # end delayed nothing past it (a timer armed on the source must fire after it)
        held = [
            f
            for f in self.faults_on([vcpu], due, end)
            if f.kind != MIGRATION or f.end + bound >= end
        ]
        if held or self.stalled(vcpu, due, end):
            return "delayed by a fault or a stall, then the run ended"
        return None


def _exposure(v: Verdict, ctx: RunContext, vcpus: Iterable[int | None], a: int, b: int) -> None:
    kinds = ctx.kinds(vcpus, a, b)
    for kind in kinds:
        v.exposure[kind] += 1
    if not kinds:
        v.exposure["none"] += 1


# ------------------------------------------------------------------------- checkers


def check_timer_not_early(events: list[Event], ctx: RunContext, opts: CheckOptions) -> Verdict:
    v = Verdict("timer-not-early", "no timer callback runs before its requested expiry")
    arms: dict[str, Event] = {}
    host_arms: dict[tuple[int, int], Event] = {}
    absolute = ctx.mode in ABSOLUTE_MODES
    for e in events:
        f = e["f"]
        if f == "timer-arm":
            arms[e["value"]["timer"]] = e
        elif f == "timer-fire":
            val = e["value"]
            v.checked += 1
            arm = arms.get(val["timer"])
            _exposure(v, ctx, [e["vcpu"]], arm["time"] if arm else e["time"], e["time"])
            if val["late_ns"] < 0:
                v.violation(
                    f"timer {val['timer']} armed for {_s(val['expires'])} fired at "
                    f"{_s(val['ran'])}, {_us(-val['late_ns'])} early",
                    arm,
                    e,
                )
        elif f == "host-timer-arm":
            host_arms[(e["vcpu"], e["value"]["origin"])] = e
        elif f == "host-timer-fire":
            val = e["value"]
            v.checked += 1
            if val["expiry"] and e["time"] < val["expiry"]:
                v.violation(
                    f"vCPU {e['vcpu']}'s host timer for timer {val['timer']} (armed by exit "
                    f"{val['origin']} for {ctx.rel(val['expiry'])}) fired at {ctx.rel(e['time'])}, "
                    f"{_us(val['expiry'] - e['time'])} early",
                    host_arms.get((e["vcpu"], val["origin"])),
                    e,
                )
        elif f == "inject" and absolute and e["value"].get("timer"):
            arm = arms.get(e["value"]["timer"])
            if arm is None:
                continue
            due = arm["value"]["expires_host"]
            if e["time"] + EARLY_TOLERANCE_NS < due:
                v.violation(
                    f"timer {e['value']['timer']}'s interrupt was injected at "
                    f"{ctx.rel(e['time'])}, {_us(due - e['time'])} before its expiry "
                    f"({_s(arm['value']['expires'])} guest time)",
                    arm,
                    e,
                )
    return v


def check_timer_once(events: list[Event], ctx: RunContext, opts: CheckOptions) -> Verdict:
    v = Verdict(
        "timer-once",
        "every armed, uncancelled timer fires exactly once, unless the run ended first",
    )
    open_timers: dict[str, Event] = {}
    fired: dict[str, Event] = {}
    programmed: Counter[str] = Counter()
    injected: dict[str, list[Event]] = defaultdict(list)
    periodic = ctx.mode == "lapic-periodic"
    for e in events:
        f = e["f"]
        if f == "timer-arm":
            open_timers[e["value"]["timer"]] = e
        elif f == "timer-cancel":
            arm = open_timers.pop(e["value"]["timer"], None)
            if arm is not None:
                v.checked += 1
                v.counts["cancelled"] += 1
                _exposure(v, ctx, [e["vcpu"]], arm["time"], e["time"])
        elif f == "timer-fire":
            timer = e["value"]["timer"]
            arm = open_timers.pop(timer, None)
            if timer in fired:
                v.violation(
                    f"timer {timer} fired twice, at {_s(fired[timer]['value']['ran'])} and "
                    f"{_s(e['value']['ran'])}",
                    arm,
                    fired[timer],
                    e,
                )
            fired[timer] = e
            if arm is not None:
                v.checked += 1
                v.counts["fired"] += 1
                _exposure(v, ctx, [e["vcpu"]], arm["time"], e["time"])
        elif f == "exit" and e["value"].get("timer"):
            programmed[e["value"]["timer"]] += 1
        elif f == "inject" and e["value"].get("timer") and not periodic:
            timer = e["value"]["timer"]
            injected[timer].append(e)
            if len(injected[timer]) > programmed[timer]:
                v.violation(
                    f"timer {timer} was programmed {programmed[timer]} time(s) and its interrupt "
                    f"was injected {len(injected[timer])} times on vCPU {e['vcpu']} (at "
                    + ", ".join(ctx.rel(i["time"]) for i in injected[timer])
                    + ")",
                    *injected[timer],
                )
    for timer, arm in open_timers.items():
        vcpu, inc = arm["vcpu"], arm["value"].get("incarnation", 0)
        v.checked += 1
        if ctx.crashed(vcpu, inc) and arm["time"] <= ctx.end_of(vcpu, inc):
            v.counts["crashed (accounted for)"] += 1
            continue
        end = ctx.end_of(vcpu, inc)
        why = ctx.cut_off(vcpu, arm["value"]["expires_host"], end, opts.late_bound_ns)
        if why is not None:
            v.counts[why] += 1
            continue
        _exposure(v, ctx, [vcpu], arm["time"], end)
        v.violation(
            f"timer {timer} armed for {_s(arm['value']['expires'])} never fired; vCPU {vcpu} "
            f"ran its workload until {ctx.rel(end)} ({_us(end - arm['value']['expires_host'])} "
            "after the expiry)",
            arm,
        )
    return v


def check_cancelled_never_fires(
    events: list[Event], ctx: RunContext, opts: CheckOptions
) -> Verdict:
    v = Verdict("cancelled-never-fires", "a cancelled (or replaced) timer never fires")
    cancelled: dict[str, Event] = {}
    armed: dict[str, int] = {}
    for e in events:
        f = e["f"]
        if f == "timer-arm":
            armed[e["value"]["timer"]] = e["time"]
        elif f == "timer-cancel":
            cancelled[e["value"]["timer"]] = e
            v.checked += 1
            v.counts[e["value"]["reason"]] += 1
            start = armed.pop(e["value"]["timer"], e["time"])
            _exposure(v, ctx, [e["vcpu"]], start, e["time"])
        elif f == "timer-fire":
            cancel = cancelled.get(e["value"]["timer"])
            if cancel is not None:
                v.violation(
                    f"timer {e['value']['timer']} was {cancel['value']['reason']} at "
                    f"{ctx.rel(cancel['time'])} and fired at {_s(e['value']['ran'])}",
                    cancel,
                    e,
                )
    return v


def check_ipi_once(events: list[Event], ctx: RunContext, opts: CheckOptions) -> Verdict:
    v = Verdict("ipi-once", "every IPI sent to a live target is handled exactly once")
    sends: dict[str, Event] = {}
    unanswered: set[str] = set()
    delivered: dict[tuple[str, int], list[Event]] = defaultdict(list)
    injects: dict[tuple[str, int], list[Event]] = defaultdict(list)
    handled: dict[tuple[str, int], list[Event]] = defaultdict(list)
    irr_end: dict[int, list[int]] = {}
    arrived: dict[tuple[int, int, int], int] = {}
    for e in events:
        f = e["f"]
        if f == "irq":
            arrived[(e["vcpu"], e["value"]["generation"], e["value"]["seq"])] = e["time"]
        elif f == "ipi-send":
            sends[e["value"]["ipi"]] = e
        elif f == "exit" and e["value"].get("ipi") and e["value"]["rtt_ns"] is None:
            unanswered.add(e["value"]["ipi"])
        elif f == "ipi-deliver" and e["value"].get("ipi"):
            delivered[(e["value"]["ipi"], e["vcpu"])].append(e)
        elif f == "inject":
            for ipi in e["value"].get("ipis") or ():
                injects[(ipi, e["vcpu"])].append(e)
        elif f == "ipi-handle":
            handled[(e["value"]["ipi"], e["vcpu"])].append(e)
        elif f == "lapic-end":
            irr_end[e["vcpu"]] = e["value"].get("irr", [])
    run_end = ctx.run_end or ctx.last
    for ipi, send in sends.items():
        src = send["vcpu"]
        vector = send["value"]["vector"]
        for target in send["value"]["targets"]:
            if target == src:
                continue
            v.checked += 1
            key = (ipi, target)
            dels, injs, hands = delivered.get(key, []), injects.get(key, []), handled.get(key, [])
            end = (hands or injs or dels or [send])[-1]["time"]
            _exposure(v, ctx, [src, target], send["time"], end)
            what = f"IPI {ipi} (vector {vector:#x}) from vCPU {src} to vCPU {target}"
            src_gone = ipi in unanswered or any(
                f.kind == "crash" and f.target == src and f.start >= send["time"]
                for f in ctx.faults_on([src], send["time"], run_end)
            )
            target_down = [
                f for f in ctx.faults_on([target], send["time"], run_end) if f.kind == "crash"
            ]
            if not dels:
                if src_gone or send["time"] >= run_end:
                    v.counts["sender gone or run over"] += 1
                    continue
                v.violation(
                    f"{what}, sent at {ctx.rel(send['time'])}, reached no LAPIC although the "
                    "host answered the exit that sent it",
                    send,
                )
                continue
            accepted = [d for d in dels if d["value"]["outcome"] != "not accepted"]
            if not accepted:
                if target_down or any(f.kind == "crash" and f.target == target for f in ctx.faults):
                    v.counts["target not running (crashed)"] += 1
                    continue
                v.violation(
                    f"{what} was not accepted by vCPU {target}'s LAPIC at "
                    f"{ctx.rel(dels[0]['time'])} (APIC disabled) though vCPU {target} was live",
                    send,
                    *dels,
                )
                continue
            if len(injs) > 1:
                v.violation(
                    f"{what} was injected {len(injs)} times (messages "
                    + ", ".join(str(i["value"]["seq"]) for i in injs)
                    + ")",
                    send,
                    *injs,
                )
                continue
            if not injs:
                late = ctx.cut_off(target, accepted[0]["time"], run_end, opts.late_bound_ns)
                if late or target_down or vector in irr_end.get(target, []):
                    v.counts["pending at the end or target crashed"] += 1
                    continue
                v.violation(
                    f"{what} was accepted by vCPU {target}'s LAPIC at "
                    f"{ctx.rel(accepted[0]['time'])} and never injected",
                    send,
                    *accepted,
                )
                continue
            if len(hands) > 1:
                v.violation(f"{what} was handled {len(hands)} times", send, *hands)
                continue
            if not hands:
                inj = injs[0]
                gone = [f for f in target_down if f.end >= inj["time"]]  # dead then or later
                came = arrived.get((target, inj["value"]["generation"], inj["value"]["seq"]))
                finished = [t for (vc, _), t in ctx.ended.items() if vc == target]
                ended = ctx.cut_off(  # it came as the run ended, or was held up until then
                    target, came or inj["time"], max(finished, default=run_end), opts.late_bound_ns
                )
                if gone or ended or inj["time"] >= run_end or target in ctx.link_errors:
                    v.counts["injected as the run or the target ended"] += 1
                    continue
                v.violation(
                    f"{what} was injected as message {inj['value']['seq']} at "
                    f"{ctx.rel(inj['time'])} and never handled by the live vCPU {target}",
                    send,
                    inj,
                )
                continue
            v.counts["handled once"] += 1
    return v


def check_call_completes(events: list[Event], ctx: RunContext, opts: CheckOptions) -> Verdict:
    v = Verdict(
        "call-completes",
        "every smp_call_function(wait) completes, or fails naming a stopped, crashed or "
        "dead target; each csd runs at most once",
    )
    queued: dict[str, Event] = {}
    runs: dict[str, Event] = {}
    waited: set[str] = set()
    for e in events:
        f = e["f"]
        if f == "csd-queue":
            queued[e["value"]["csd"]] = e
        elif f == "csd-run":
            csd = e["value"]["csd"]
            if csd in runs:
                v.violation(
                    f"csd {csd} ran twice on vCPU {e['vcpu']}, at {ctx.rel(runs[csd]['time'])} "
                    f"and {ctx.rel(e['time'])}",
                    queued.get(csd),
                    runs[csd],
                    e,
                )
            runs[csd] = e
        elif f == "csd-wait":
            csd = e["value"]["csd"]
            waited.add(csd)
            queue = queued.get(csd)
            v.checked += 1
            start = queue["time"] if queue else e["time"]
            target = e["value"]["target"]
            _exposure(v, ctx, [e["vcpu"], target], start, e["time"])
            outcome = e["value"]["outcome"]
            v.counts[outcome] += 1
            if outcome != "error":
                continue
            blamed = [
                f
                for f in ctx.faults_on([target, e["vcpu"]], start, e["time"])
                if f.kind in CALL_BLAME
            ]
            if blamed or ctx.stalled(target, start, e["time"]):
                v.counts["failed with its target (or itself) stopped or crashed"] += 1
                continue
            v.violation(
                f"smp_call_function csd {csd} from vCPU {e['vcpu']} to vCPU {target} "
                f"(queued at {ctx.rel(start)}) failed at {ctx.rel(e['time'])} though neither "
                "vCPU nor the host was stopped, crashed or disturbed",
                queue,
                runs.get(csd),
                e,
            )
    for csd, queue in queued.items():
        if csd in waited or not queue["value"]["wait"]:
            continue
        vcpu = queue["vcpu"]
        inc = _incarnation_of(ctx, vcpu, queue["time"])
        v.checked += 1
        if ctx.crashed(vcpu, inc) or vcpu in ctx.link_errors:
            v.counts["sender crashed"] += 1
            continue
        v.violation(
            f"smp_call_function csd {csd} from vCPU {vcpu} to vCPU {queue['value']['target']}, "
            f"queued at {ctx.rel(queue['time'])}, never returned",
            queue,
            runs.get(csd),
        )
    return v


def _incarnation_of(ctx: RunContext, vcpu: int, t: int) -> int:
    """The incarnation of ``vcpu`` running at ``t`` (ids of later ones start at 1e9)."""
    crashes = sorted(f.start for f in ctx.faults if f.kind == "crash" and f.target == vcpu)
    return bisect.bisect_left(crashes, t)


def check_lapic_consistent(events: list[Event], ctx: RunContext, opts: CheckOptions) -> Verdict:
    v = Verdict(
        "lapic-consistent",
        "at the end no vector is left in service, and injections = EOIs + vectors pending",
    )
    base: dict[int, Event] = {}
    session_pid: dict[int, int] = {}
    ends: dict[int, Event] = {}
    lapic_end: dict[int, Event] = {}
    for e in events:
        f = e["f"]
        if f == "session" and e["value"]["kind"] == "new":
            session_pid[e["vcpu"]] = e["value"]["pid"]
        elif f == "lapic-base":
            base[e["vcpu"]] = e
        elif f == "workload-end":
            ends[e["value"]["pid"]] = e
        elif f == "lapic-end":
            lapic_end[e["vcpu"]] = e
    for vcpu, end in sorted(lapic_end.items()):
        pid = session_pid.get(vcpu)
        done = ends.get(pid) if pid is not None else None
        if done is None or vcpu not in base or end["value"]["eois"] is None:
            v.notes.append(
                f"vCPU {vcpu} not checked: its last process (pid {pid}) did not finish its "
                "workload (crashed, hung or refused)"
            )
            continue
        v.checked += 1
        _exposure(v, ctx, [vcpu], ctx.run_start or 0, end["time"])
        val = end["value"]
        eois = val["eois"] - base[vcpu]["value"]["eois"]
        injected = val["injected"] - base[vcpu]["value"]["injected"]
        isr = val["isr"]
        where = f"vCPU {vcpu}"
        if injected != eois + len(isr):
            v.violation(
                f"{where}: {injected} interrupts injected but {eois} EOIs and "
                f"{len(isr)} vector(s) in service ({', '.join(hex(x) for x in isr) or 'none'})",
                base[vcpu],
                end,
            )
            continue
        guest = done["value"]
        guest_eois = guest["eois"] - guest["pv_eoi_unreported"]
        if guest_eois != eois:
            v.violation(
                f"{where}: the guest performed {guest_eois} EOIs but its LAPIC cleared "
                f"{eois} in-service bit(s): {guest_eois - eois} EOI(s) lost; in service at the "
                f"end: {', '.join(hex(x) for x in isr) or 'nothing'}",
                done,
                end,
            )
            continue
        # with (a) and (b), what is still in service is exactly what the guest never
        # handled (it arrived as the run ended, or was injected after its goodbye)
        v.counts["vectors in service at the end (never handled)"] += len(isr)
    if not v.checked:
        v.valid = UNKNOWN if v.valid is True else v.valid
        v.notes.append("no vCPU's final LAPIC state could be checked")
    return v


def check_no_silent_loss(events: list[Event], ctx: RunContext, opts: CheckOptions) -> Verdict:
    v = Verdict(
        "no-silent-loss",
        "nothing sequenced is lost without a report: every exit answered, every "
        "injection arrived, or a link error / replaced session says so",
    )
    injects: dict[tuple[int, int, int], Event] = {}
    arrived: set[tuple[int, int, int]] = set()
    generation_at_end: dict[int, int] = {}
    last_gen_change: dict[tuple[int, int], int] = {}
    for e in events:
        f = e["f"]
        if f == "exit":
            v.checked += 1
            val = e["value"]
            if val["rtt_ns"] is not None:
                _exposure(v, ctx, [e["vcpu"]], e["time"], e["time"] + val["rtt_ns"])
                continue
            vcpu, inc = e["vcpu"], val.get("incarnation", 0)
            pid = ctx.pids.get((vcpu, inc))
            if ctx.crashed(vcpu, inc) or (pid is not None and pid in ctx.failed_pids):
                v.counts["unanswered: process crashed or failed"] += 1
                continue
            if any(t >= e["time"] for t in ctx.link_errors.get(vcpu, ())):
                v.counts["unanswered: link error reported"] += 1
                continue
            v.violation(
                f"exit {val['seq']} ({val['kind']}) of vCPU {vcpu}, sent at "
                f"{ctx.rel(e['time'])}, was never answered and no link error was reported",
                e,
            )
        elif f == "inject":
            v.checked += 1
            key = (e["vcpu"], e["value"]["generation"], e["value"]["seq"])
            injects[key] = e
        elif f == "irq":
            arrived.add((e["vcpu"], e["value"]["generation"], e["value"]["seq"]))
        elif f == "session" and e["value"]["kind"] == "new":
            generation_at_end[e["vcpu"]] = e["value"]["generation"]
            last_gen_change[(e["vcpu"], e["value"]["generation"])] = e["time"]
            if e["value"]["lost"]:
                lo, hi = e["value"]["lost"]
                v.notes.append(
                    f"reported: vCPU {e['vcpu']}'s replaced session lost host messages "
                    f"{lo}..{hi} (recorded as a link error)"
                )
        elif f == "link-end":
            link = e["value"].get("link") or {}
            for name in ("gaps", "retransmitted", "duplicates", "resends_requested"):
                v.counts[f"link {name}"] += int(link.get(name) or 0)
    run_end = ctx.run_end or ctx.last
    for (vcpu, gen, seq), e in injects.items():
        if (vcpu, gen, seq) in arrived:
            continue
        ended = [t for (vc, _), t in ctx.ended.items() if vc == vcpu]
        last = max(ended, default=run_end)
        if (
            gen != generation_at_end.get(vcpu, gen)  # that session was replaced
            or ctx.cut_off(vcpu, e["time"], last, opts.late_bound_ns)
            or any(e["time"] >= t for t in ended)
            or any(t >= e["time"] for t in ctx.link_errors.get(vcpu, ()))
            or any(  # the process was dead then, or died before it could take it
                f.kind == "crash" and f.target == vcpu and f.end >= e["time"] for f in ctx.faults
            )
        ):
            v.counts["not arrived: session or run ended"] += 1
            continue
        v.violation(
            f"injection {seq} (vector {e['value']['vector']:#x}) to vCPU {vcpu}, sent at "
            f"{ctx.rel(e['time'])}, never arrived and no link error was reported",
            e,
        )
    return v


def check_lateness_explained(events: list[Event], ctx: RunContext, opts: CheckOptions) -> Verdict:
    bound = opts.late_bound_ns
    v = Verdict(
        "lateness-explained",
        f"a timer later than {_us(bound)} overlaps a fault or a stall on its own vCPU or the host",
    )
    for e in events:
        if e["f"] != "timer-fire" or e["value"]["late_ns"] <= bound:
            continue
        v.checked += 1
        vcpu = e["vcpu"]
        start = e["value"]["expires_host"]
        # a migration's blackout explains a timer due during it or in flight across it,
        # which fires at the resume: late by the blackout and the bound at most, not more
        faults = [
            f
            for f in ctx.faults_on([vcpu], start, e["time"])
            if f.kind != MIGRATION or e["time"] <= f.end + bound
        ]
        _exposure(v, ctx, [vcpu], start, e["time"])
        if faults:
            for kind in {f.kind for f in faults}:
                v.counts[f"explained by {kind}"] += 1
            continue
        if ctx.stalled(vcpu, start, e["time"]):
            v.counts["explained by a stall (process not scheduled)"] += 1
            continue
        v.violation(
            f"timer {e['value']['timer']} on vCPU {vcpu} ran {_us(e['value']['late_ns'])} late "
            f"(due {_s(e['value']['expires'])}) with no fault or stall on vCPU {vcpu} or the host",
            e,
        )
    return v


def check_coverage(events: list[Event], ctx: RunContext, opts: CheckOptions) -> Verdict:
    v = Verdict(
        "coverage",
        "every fault kind asked for overlapped armed timers or in-flight IPIs",
    )
    open_timers: Counter[int] = Counter()
    timer_vcpu: dict[str, int] = {}
    in_flight: Counter[int] = Counter()
    ipi_targets: dict[str, list[int]] = {}
    active: dict[Any, tuple[str, int]] = {}
    covered: set[Any] = set()
    seen: Counter[str] = Counter()
    hit: Counter[str] = Counter()

    def touches(target: int, vcpu: int | None) -> bool:
        return target < 0 or target == vcpu

    for e in events:
        f = e["f"]
        vcpu = e["vcpu"]
        if f == "timer-arm":
            open_timers[vcpu] += 1
            timer_vcpu[e["value"]["timer"]] = vcpu
            for key, (_, target) in active.items():
                if touches(target, vcpu):
                    covered.add(key)
        elif f in ("timer-fire", "timer-cancel"):
            if timer_vcpu.pop(e["value"]["timer"], None) is not None:
                open_timers[vcpu] -= 1
        elif f == "ipi-send":
            targets = [t for t in e["value"]["targets"] if t != vcpu]
            ipi_targets[e["value"]["ipi"]] = targets
            for t in targets:
                in_flight[t] += 1
            for key, (_, target) in active.items():
                if target < 0 or target == vcpu or target in targets:
                    covered.add(key)
        elif f == "ipi-handle":
            targets = ipi_targets.get(e["value"]["ipi"]) or []
            if vcpu in targets:
                targets.remove(vcpu)
                in_flight[vcpu] -= 1
        elif f == "fault":
            val = e["value"]
            key = (val.get("kind"), val.get("fault"))
            target = int(val.get("target", -1))
            if e["type"] == "invoke":
                active[key] = (val.get("kind", "?"), target)
                seen[val.get("kind", "?")] += 1
                busy = (
                    sum(open_timers.values()) + sum(in_flight.values())
                    if target < 0
                    else open_timers[target] + in_flight[target]
                )
                if busy > 0:
                    covered.add(key)
            else:
                kind, _ = active.pop(key, (val.get("kind", "?"), target))
                if key in covered:
                    hit[kind] += 1
    for key, (kind, _) in active.items():
        if key in covered:
            hit[kind] += 1
    for kind in ctx.requested:
        v.checked += 1
        v.counts[f"{kind}: faults"] = seen[kind]
        v.counts[f"{kind}: overlapping timers or IPIs"] = hit[kind]
        v.exposure[kind] = hit[kind]
        if not hit[kind]:
            v.valid = UNKNOWN
            why = "never happened" if not seen[kind] else "never overlapped an armed timer or IPI"
            v.notes.append(f"fault kind {kind} {why}: the run proves nothing about it")
            if v.first is None:
                v.first = {"indices": [], "ops": [], "message": v.notes[-1]}
    return v


#: every checker, in report order
CHECKERS: dict[str, Callable[[list[Event], RunContext, CheckOptions], Verdict]] = {
    "timer-not-early": check_timer_not_early,
    "timer-once": check_timer_once,
    "cancelled-never-fires": check_cancelled_never_fires,
    "ipi-once": check_ipi_once,
    "call-completes": check_call_completes,
    "lapic-consistent": check_lapic_consistent,
    "no-silent-loss": check_no_silent_loss,
    "lateness-explained": check_lateness_explained,
    "coverage": check_coverage,
}
INVARIANTS = tuple(CHECKERS)


def check_history(
    events: list[Event], opts: CheckOptions | None = None, only: Iterable[str] | None = None
) -> dict[str, Verdict]:
    """Run every checker (or those named in ``only``) over one history."""
    opts = opts or CheckOptions()
    ctx = RunContext(events)
    names = list(only) if only is not None else list(CHECKERS)
    verdicts = {name: CHECKERS[name](events, ctx, opts) for name in names}
    if ctx.failure or ctx.interrupted:
        for verdict in verdicts.values():
            if verdict.valid is True:
                verdict.valid = UNKNOWN
                why = ctx.failure or f"interrupted by {ctx.interrupted}"
                verdict.notes.append(f"the run did not complete: {why}")
    return verdicts


def overall(verdicts: dict[str, Verdict]) -> bool | str:
    """invalid if any checker is, else unknown if any is, else valid."""
    values = [v.valid for v in verdicts.values()]
    if any(x is False for x in values):
        return False
    if any(x == UNKNOWN for x in values):
        return UNKNOWN
    return True
